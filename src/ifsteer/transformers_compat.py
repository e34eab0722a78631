"""What the batcher needs from transformers and that moves between its releases, in one place."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ifsteer.slots import filled_layers


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which this model's forward takes its KV cache.

    transformers renamed `past_key_values` to `cache` (5.2x); an unknown keyword is swallowed
    by `**kwargs`, so passing the wrong one silently decodes every step without the cache.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep (and repeat) the cache's `rows`, in place."""
    for layer in filled_layers(cache):
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
