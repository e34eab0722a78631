#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, CPU, offline): answer
# prompts that ask for nothing in particular, unsteered and steered by three calibrated vectors
# that ship with ifsteer (no extraction), each answer marked with its IFEval verdict:
#   - detectable_format:title   (a title in <<double angular brackets>>; layer 26)
#   - length:extremely_concise  (fewer than 3 sentences; a trained vector, layer 18)
#   - change_case:english_lowercase (no capital letter; a trained vector, layer 18)
# `ifsteer vectors list` shows every shipped vector and how it did on validation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ifsteer generate --instruction-id detectable_format:title --check --max-new-tokens 40 \
    --prompt "How do I clean a cast iron pan properly?" \
    --prompt "Describe the smells and sounds of a bakery early in the morning."
ifsteer generate --instruction-id length:extremely_concise --check --max-new-tokens 128 \
    --prompt "How does a refrigerator keep food cold?" \
    --prompt "What should I know before adopting a cat?" \
    --prompt "Why is the ocean salty?"
ifsteer generate --instruction-id change_case:english_lowercase --check --max-new-tokens 60 \
    --prompt "What makes a good cup of coffee?" \
    --prompt "Explain how a bicycle stays upright."
