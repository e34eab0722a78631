#!/usr/bin/env bash
# The test command: unit tests (tiny random models) and integration tests (embedded model).
# Nothing may reach the Hugging Face hub.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"
