"""How many rows to decode at once, from the model's size and the memory that is free.

Two limits, the smaller wins. Memory: each row holds a KV cache of up to `max_tokens` columns
and one row of logits; rows may take half of the free memory (the rest is for activations and
for whatever else runs). Throughput: a decode step reads every weight once for the whole batch,
so larger batches are cheaper per token until the step becomes compute-bound. On a CPU that
happens early and sooner for larger models (measured on SmolLM2-135M, 2 cores: batch 8 → 42
tok/s, 32 → 103, 64 → 124), so the CPU cap is 64 rows for a ~135M model, scaled down with the
parameter count; an accelerator's cap is 256 rows.
"""

from __future__ import annotations

import os

import torch

from ifsteer.models import LoadedModel

CPU_ROWS = 64
ACCELERATOR_ROWS = 256
_CPU_REFERENCE_PARAMS = 150e6  # models up to this size get the full CPU cap
_MEMORY_SHARE = 0.5


def auto_batch_size(
    lm: LoadedModel, *, max_tokens: int = 512, free_bytes: int | None = None
) -> int:
    """Rows to decode together for sequences of up to `max_tokens` (prompt + answer)."""
    on_cpu = lm.device.type == "cpu"
    free = free_memory(lm.device) if free_bytes is None else free_bytes
    by_memory = int(free * _MEMORY_SHARE // row_bytes(lm, max_tokens))
    if on_cpu:
        params = sum(p.numel() for p in lm.model.parameters())
        cap = int(CPU_ROWS * min(1.0, _CPU_REFERENCE_PARAMS / params))
    else:
        cap = ACCELERATOR_ROWS
    return max(1, min(cap, by_memory))


def row_bytes(lm: LoadedModel, max_tokens: int) -> int:
    """One row's KV cache at `max_tokens` columns plus its logits, in bytes."""
    config = lm.model.config.get_text_config()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or lm.hidden_size // heads)
    element = torch.finfo(lm.dtype).bits // 8
    kv = 2 * lm.n_layers * kv_heads * head_dim * element * max_tokens
    return kv + int(config.vocab_size) * 4


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the accelerator's free memory, or the system's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
