#!/usr/bin/env bash
# Record the versions installed now as the ones setup.sh installs: run it after the suite passed
# on an environment set up with `setup.sh --latest` (or after changing a dependency).
#   scripts/freeze.sh           -> scripts/constraints/core.txt
#   scripts/freeze.sh --vllm    -> scripts/constraints/vllm.txt (an environment with vLLM)
set -euo pipefail
cd "$(dirname "$0")/.."
name=core
[ "${1:-}" = "--vllm" ] && name=vllm
out=scripts/constraints/$name.txt
{
    echo "# The exact versions the test suite passed with (scripts/setup.sh installs them; --latest skips"
    echo "# this file). Regenerate after a green run: scripts/freeze.sh"
    # ifsteer itself is the editable checkout; torch's local label (+cpu) names the wheel, not
    # the version a constraint needs.
    python -m pip freeze --disable-pip-version-check --exclude-editable \
        | grep -v '^ifsteer' | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
