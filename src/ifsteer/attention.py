"""Decode-step attention on a CPU without copying the KV cache for every query head.

transformers' SDPA path lets `scaled_dot_product_attention` share key/value heads among query
heads (`enable_gqa`) only when no attention mask is given; with one, which every left-padded or
continuously batched decode step has, it first repeats each key/value head once per query head
(`repeat_kv`), copying the whole cache of every layer at every step. On SmolLM2-135M (9 query,
3 key/value heads), batch 64 at 300 columns, that copy was 64% of a decode step. On a CPU the
kernel takes the mask and `enable_gqa` together and gives the same numbers, so decode steps
there go straight to it; prompts (several query positions, where transformers picks the causal
kernel) and accelerators (where a mask with `enable_gqa` falls back to the slow math kernel)
keep transformers' own path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "ifsteer_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or query.shape[2] != 1
        or groups == 1
        or kwargs.get("position_bias") is not None
        or isinstance(kwargs.get("cache"), PagedAttentionCache)  # updated before attending
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_grouped_attention(model: PreTrainedModel) -> None:
    """Switch a model that attends with SDPA to `grouped_sdpa`; a model loaded with another
    implementation (eager, flash kernels) keeps it: that was its owner's choice."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
