#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, CPU, offline): answer
# prompts that do not ask for a title, unsteered and steered by the calibrated title vector
# that ships with ifsteer (no extraction), each answer marked with its IFEval verdict.
# `ifsteer vectors list` shows every shipped vector and how it did on validation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ifsteer generate --instruction-id detectable_format:title --check --max-new-tokens 40 \
    --prompt "How do I clean a cast iron pan properly?" \
    --prompt "Describe the smells and sounds of a bakery early in the morning."
