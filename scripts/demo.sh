#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, CPU, offline): extract a
# lowercase vector, then answer a prompt that does not ask for lowercase, unsteered and steered.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
mkdir -p runs
ifsteer extract --instruction "Write your whole answer in lowercase letters." \
    --instruction-id change_case:english_lowercase --out runs/lowercase.safetensors
ifsteer generate --prompt "Describe the city of Paris." --vector runs/lowercase.safetensors \
    --max-new-tokens 64
