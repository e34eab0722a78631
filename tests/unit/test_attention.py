"""Decode-step attention that shares key/value heads against transformers' own SDPA path."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import ifsteer.attention as attention
from tests.conftest import make_tiny
from tests.unit.test_models import CONFIGS

PROMPTS = ["Describe a forest at dawn.", "Name a colour."]


def padded_decode(model, tokenizer, steps: int) -> list[torch.Tensor]:
    """Logits of a left-padded batch: the prompt step, then `steps` greedy decode steps."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    cache = DynamicCache()
    logits = []
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
    return logits


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_grouped_decode_equals_transformers_sdpa(arch, tiny_tokenizer, monkeypatch):
    # SDPA asked for by name: which implementation transformers picks by default for an
    # architecture changes between releases. Where a release has no SDPA path at all for one
    # (Gemma 2 from 5.24, for its logit soft-capping), the model attends eagerly and nothing of
    # ours runs, so there is nothing to compare.
    config = CONFIGS[arch]()
    if not AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa:
        pytest.skip(f"transformers {transformers.__version__} has no SDPA path for {arch}")
    config._attn_implementation = "sdpa"
    lm = make_tiny(config, tiny_tokenizer, model_id=arch)
    assert lm.model.config._attn_implementation == attention.NAME
    reference = copy.deepcopy(lm.model)
    reference.set_attn_implementation("sdpa")
    grouped_steps = []
    real = attention.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        grouped_steps.append(kwargs.get("enable_gqa", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    ours = padded_decode(lm.model, tiny_tokenizer, steps=3)
    monkeypatch.undo()
    expected = padded_decode(reference, tiny_tokenizer, steps=3)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    config = lm.model.config
    grouped = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    # with grouped heads, every decode step of every layer shares them in the kernel
    assert sum(grouped_steps) == (3 * lm.n_layers if grouped else 0)


def test_a_model_loaded_with_another_implementation_keeps_it(tiny_tokenizer):
    config = CONFIGS["llama"]()
    config._attn_implementation = "eager"
    lm = make_tiny(config, tiny_tokenizer)
    assert lm.model.config._attn_implementation == "eager"
