#!/usr/bin/env bash
# The vLLM adapter on one CUDA GPU with vLLM's defaults (torch.compile, CUDA graphs), in under
# five minutes: the CUDA tier (steered answers against the HF backend and against an eager
# engine, mixed batches, prefix cache) and the overhead benchmark (ifsteer steered against
# stock vLLM compiled and eager, one run). Needs vllm==0.32.0 with CUDA and the embedded
# model's converted cache (or IFSTEER_VLLM_MODEL); writes vllm_overhead.json to $OUT or /tmp.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
python -c 'import torch, vllm; assert torch.cuda.is_available(), "no CUDA device"; print("vllm", vllm.__version__, "on", torch.cuda.get_device_name())'
status=0
timeout 150 python -m pytest -q -p no:cacheprovider -rs tests/gpu/test_vllm.py || status=$?
timeout 140 python benchmarks/vllm_overhead.py --repeats 1 --json "${OUT:-/tmp}/vllm_overhead.json" \
    || status=$?
exit "$status"
