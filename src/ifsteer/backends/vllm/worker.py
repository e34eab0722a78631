"""The worker side of the vLLM adapter: a vector bank and the hooks that steer flattened batches.

vLLM runs the model in worker processes (one per GPU, on every node) and flattens the tokens of
all scheduled requests into one `[num_tokens, hidden]` batch. `SteeringWorkerExtension` is mixed
into vLLM's GPU worker (`worker_extension_cls`); the front end calls its methods on every
worker with `collective_rpc`:

- `ifsteer_install()` hooks the decoder layers once;
- `ifsteer_register(entries)` appends vectors to the bank, a `[n, hidden]` float32 tensor kept
  on the worker's GPU, so a request carries a short key instead of a vector.

Each step, the worker's `execute_model(scheduler_output)` is wrapped to keep how many tokens
each request has in this step; a forward pre-hook on the model turns that, the runner's batch
order and each request's `SamplingParams.extra_args["ifsteer"]` into a `Plan`: per steered
layer, per token, which bank row, which weight, which mode. The layer hooks then apply it with
a handful of batched tensor operations, the same arithmetic as `ifsteer.steering` (projection
in float32, `h += (w·c̄ − h·û)û`; additive `h += w·û`).

Targets vLLM 0.11.0 (V1 engine, `vllm/v1/worker/gpu_model_runner.py`); the runner attributes
read here (`input_batch.req_ids`, `input_batch.num_reqs`, `requests[id].sampling_params`) are
internal and change between vLLM releases. Nothing in this module imports vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("ifsteer.backends.vllm")
EXTRA_ARGS_KEY = "ifsteer"


@dataclass(frozen=True)
class Entry:
    """One steering of one request, as it travels in `extra_args`: bank key, mode, weight."""

    key: str
    mode: str
    weight: float

    @classmethod
    def parse(cls, raw: Any) -> Entry:
        return cls(str(raw["key"]), str(raw["mode"]), float(raw["weight"]))


class VectorBank:
    """Directions registered on one worker, one row each, plus their layers and targets."""

    def __init__(self, hidden_size: int, device: torch.device | str = "cpu") -> None:
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.rows: dict[str, int] = {}
        self.layers: list[int] = []
        self.directions = torch.empty(0, hidden_size, dtype=torch.float32, device=self.device)
        self.targets = torch.empty(0, dtype=torch.float32, device=self.device)

    def register(self, entries: Sequence[Mapping[str, Any]]) -> int:
        """Add `{"key", "layer", "target", "direction"}` entries; known keys are skipped."""
        new = [e for e in entries if e["key"] not in self.rows]
        if new:
            directions = torch.tensor(
                [list(e["direction"]) for e in new], dtype=torch.float32, device=self.device
            )
            if directions.shape[1] != self.hidden_size:
                raise ValueError(
                    f"vector of size {directions.shape[1]} on a model of hidden size "
                    f"{self.hidden_size}"
                )
            targets = torch.tensor(
                [float(e["target"]) for e in new], dtype=torch.float32, device=self.device
            )
            for e in new:
                self.rows[str(e["key"])] = len(self.layers)
                self.layers.append(int(e["layer"]))
            self.directions = torch.cat([self.directions, directions])
            self.targets = torch.cat([self.targets, targets])
        return len(self.layers)


@dataclass(frozen=True)
class Slot:
    """The k-th steering at one layer of every token: bank row (-1: none), weight, mode."""

    rows: torch.Tensor  # [num_tokens] long
    weights: torch.Tensor  # [num_tokens] float32
    projection: torch.Tensor  # [num_tokens] bool


@dataclass
class Plan:
    """What the layer hooks apply during one forward pass."""

    slots: dict[int, list[Slot]] = field(default_factory=dict)


def build_plan(
    requests: Sequence[tuple[int, Sequence[Entry]]],
    bank: VectorBank,
    num_tokens: int,
) -> Plan:
    """Per-token steering for one step, from (scheduled tokens, entries) per request in batch
    order; tokens past the requests (CUDA-graph padding) are left alone."""
    per_layer: dict[int, list[list[tuple[int, int, float, bool]]]] = {}
    start = 0
    spans = []
    for count, _ in requests:
        spans.append((start, start + count))
        start += count
    if start > num_tokens:
        raise ValueError(f"{start} scheduled tokens but the batch has {num_tokens}")
    for request_index, (_, entries) in enumerate(requests):
        depth: dict[int, int] = {}
        for entry in entries:
            if entry.key not in bank.rows:
                raise KeyError(f"steering vector {entry.key} is not registered on this worker")
            row = bank.rows[entry.key]
            layer = bank.layers[row]
            k = depth.get(layer, 0)
            depth[layer] = k + 1
            slots = per_layer.setdefault(layer, [])
            while len(slots) <= k:
                slots.append([])
            slots[k].append((request_index, row, entry.weight, entry.mode == "projection"))
    plan = Plan()
    for layer, slots in per_layer.items():
        plan.slots[layer] = [_slot(spans, items, num_tokens, bank.device) for items in slots]
    return plan


def _slot(
    spans: Sequence[tuple[int, int]], items: Sequence[tuple[int, int, float, bool]],
    num_tokens: int, device: torch.device,
) -> Slot:
    rows = torch.full((num_tokens,), -1, dtype=torch.long)
    weights = torch.zeros(num_tokens, dtype=torch.float32)
    projection = torch.zeros(num_tokens, dtype=torch.bool)
    for request_index, row, weight, is_projection in items:
        begin, end = spans[request_index]
        rows[begin:end] = row
        weights[begin:end] = weight
        projection[begin:end] = is_projection
    return Slot(
        rows.to(device, non_blocking=True),
        weights.to(device, non_blocking=True),
        projection.to(device, non_blocking=True),
    )


def steering_delta(stream: torch.Tensor, slots: Sequence[Slot], bank: VectorBank) -> torch.Tensor:
    """What to add to the residual stream `[num_tokens, hidden]` so that every token gets its
    request's steerings, in order; float32, zero for unsteered tokens."""
    h = stream.float()
    total = torch.zeros_like(h)
    for slot in slots:
        active = slot.rows >= 0
        directions = bank.directions[slot.rows.clamp(min=0)]  # [T, H]
        component = (h * directions).sum(-1)
        target = slot.weights * bank.targets[slot.rows.clamp(min=0)]
        coefficient = torch.where(slot.projection, target - component, slot.weights)
        delta = (coefficient * active).unsqueeze(-1) * directions
        h = h + delta
        total = total + delta
    return total


def apply_plan(output: Any, slots: Sequence[Slot], bank: VectorBank) -> Any:
    """Steer a vLLM decoder layer's output.

    Llama-style layers return `(hidden, residual)` and leave the residual add to the next
    layer's fused norm, so the stream after the layer is their sum; the delta goes into the
    residual. Layers that return one tensor get it added directly.
    """
    if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
        hidden, residual = output
        delta = steering_delta(hidden.float() + residual.float(), slots, bank)
        return hidden, residual + delta.to(residual.dtype)
    hidden = output[0] if isinstance(output, tuple) else output
    steered = hidden + steering_delta(hidden, slots, bank).to(hidden.dtype)
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


class _State:
    """Per-worker state of the extension."""

    def __init__(self, bank: VectorBank) -> None:
        self.bank = bank
        self.scheduled: Mapping[str, int] | None = None
        self.plan = Plan()
        self.plan_key: tuple[Any, ...] | None = None
        self.handles: list[Any] = []


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; its methods run on every worker via `collective_rpc`.

    `self` is the vLLM worker: `self.model_runner` is its GPUModelRunner.
    """

    def ifsteer_install(self) -> dict[str, Any]:
        from ifsteer.models import find_decoder_layers

        state: _State | None = getattr(self, "_ifsteer", None)
        if state is not None:
            return self._ifsteer_info()
        runner = self.model_runner  # type: ignore[attr-defined]
        _require_eager(runner)
        model = runner.get_model()
        layers = find_decoder_layers(model)
        hidden = int(runner.model_config.get_hidden_size())
        state = _State(VectorBank(hidden, next(model.parameters()).device))
        self._ifsteer = state

        original = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            state.scheduled = dict(scheduler_output.num_scheduled_tokens)
            try:
                return original(scheduler_output, *args, **kwargs)
            finally:
                state.scheduled = None

        runner.execute_model = execute_model
        state.handles.append(
            model.register_forward_pre_hook(lambda _m, _a: self._ifsteer_plan(), with_kwargs=False)
        )
        for index, layer in enumerate(layers):
            if type(layer).__name__ == "PPMissingLayer":  # owned by another pipeline stage
                continue
            state.handles.append(layer.register_forward_hook(_layer_hook(state, index)))
        return self._ifsteer_info()

    def ifsteer_register(self, entries: list[dict[str, Any]]) -> int:
        return self._ifsteer.bank.register(entries)  # type: ignore[attr-defined]

    def ifsteer_uninstall(self) -> None:
        state: _State | None = getattr(self, "_ifsteer", None)
        if state is not None:
            for handle in state.handles:
                handle.remove()
            self._ifsteer = None

    def _ifsteer_info(self) -> dict[str, Any]:
        state: _State = self._ifsteer  # type: ignore[attr-defined]
        return {"hidden_size": state.bank.hidden_size, "vectors": len(state.bank.layers)}

    def _ifsteer_plan(self) -> None:
        """Forward pre-hook of the whole model: build this step's plan (or none)."""
        state: _State = self._ifsteer  # type: ignore[attr-defined]
        scheduled = state.scheduled
        if scheduled is None:  # profiling and warm-up runs: nothing to steer
            state.plan, state.plan_key = Plan(), None
            return
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: batch.num_reqs])
        key = tuple((rid, scheduled.get(rid, 0)) for rid in req_ids)
        if key == state.plan_key:  # decode steps of the same requests: reuse the plan
            return
        requests = []
        for rid in req_ids:
            params = runner.requests[rid].sampling_params
            raw = ((params.extra_args or {}) if params is not None else {}).get(EXTRA_ARGS_KEY)
            requests.append((scheduled.get(rid, 0), [Entry.parse(e) for e in raw or ()]))
        total = sum(count for count, _ in requests)
        state.plan = (
            build_plan(requests, state.bank, total)
            if any(entries for _, entries in requests) else Plan()
        )
        state.plan_key = key


def _layer_hook(state: _State, index: int) -> Any:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        slots = state.plan.slots.get(index)
        if not slots:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        n = slots[0].rows.shape[0]
        if hidden.shape[0] != n:  # padded batch: steer the scheduled tokens, pad the plan
            slots = [_pad(slot, hidden.shape[0]) for slot in slots]
        return apply_plan(output, slots, state.bank)

    return hook


def _pad(slot: Slot, num_tokens: int) -> Slot:
    extra = num_tokens - slot.rows.shape[0]
    if extra < 0:
        raise RuntimeError(
            f"steering plan covers {slot.rows.shape[0]} tokens, the batch has {num_tokens}"
        )
    return Slot(
        torch.nn.functional.pad(slot.rows, (0, extra), value=-1),
        torch.nn.functional.pad(slot.weights, (0, extra)),
        torch.nn.functional.pad(slot.projection, (0, extra)),
    )


def _require_eager(runner: Any) -> None:
    """Hooks with data-dependent indexing are neither traced by torch.compile nor replayed by
    CUDA graphs; the adapter runs vLLM in eager mode and refuses anything else."""
    if not runner.model_config.enforce_eager:
        raise RuntimeError("ifsteer steering needs enforce_eager=True (no CUDA graphs)")
    compilation = runner.vllm_config.compilation_config
    level = getattr(compilation, "level", None) or getattr(compilation, "mode", None) or 0
    if int(level) != 0:
        raise RuntimeError(
            f"ifsteer steering needs torch.compile off (compilation level 0, got {level})"
        )
