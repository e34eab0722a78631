#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, CPU, offline): answer
# prompts that do not ask for a format, unsteered and steered by a calibrated vector that ships
# with ifsteer (no extraction), each answer marked with its IFEval verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ifsteer generate --instruction-id detectable_format:title --check --max-new-tokens 40 \
    --prompt "How do I clean a cast iron pan properly?"
ifsteer generate --instruction-id language:response_language:de --check --max-new-tokens 40 \
    --prompt "Write an email welcoming a new volunteer to our animal shelter."
