"""The worker side of the vLLM adapter: a vector bank and the hooks that steer flattened batches.

vLLM runs the model in worker processes and flattens the tokens of all scheduled requests into
one `[num_tokens, hidden]` batch. `SteeringWorkerExtension` is mixed into vLLM's worker class
(`worker_extension_cls`); the front end calls its methods on every worker with `collective_rpc`:

- `ifsteer_install()` checks the runner can be steered correctly and hooks the decoder layers;
- `ifsteer_register(entries)` appends vectors to the bank, a `[n, hidden]` float32 tensor kept
  on the worker's device, so a request carries a short key instead of a vector.

Each step, the runner's `execute_model(scheduler_output)` is wrapped to keep how many tokens
each request has in this step; a forward pre-hook on the model turns that, the runner's batch
order, each request's prompt length and its `SamplingParams.extra_args["ifsteer"]` into a
`Plan`: per steered layer, per token, which bank row, which weight, which mode, which
positions. The layer hooks apply it with a handful of batched tensor operations, the same
arithmetic as `ifsteer.steering` (projection in float32, `h += (w·c̄ − h·û)û`; additive
`h += w·û`). After the step, the wrapper checks every planned layer hook ran: a runner that
skips module hooks (compiled graphs) fails loudly instead of serving unsteered text.

Targets vLLM 0.32.0's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, which the CPU
runner subclasses); the attributes read here (`input_batch.req_ids`, `input_batch.num_reqs`,
`requests[id].sampling_params`, `requests[id].num_prompt_tokens`) are internal and change
between releases. Nothing in this module imports vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("ifsteer.backends.vllm")
EXTRA_ARGS_KEY = "ifsteer"
# Which tokens of a request a steering acts on, as a per-token code in a Slot.
POSITION_CODES = {"all": 0, "prompt": 1, "generated": 2}


@dataclass(frozen=True)
class Entry:
    """One steering of one request, as it travels in `extra_args`: key, mode, weight, positions.

    `positions` is left out on the wire when it is "all", so most requests carry three fields.
    """

    key: str
    mode: str
    weight: float
    positions: str = "all"

    @classmethod
    def parse(cls, raw: Any) -> Entry:
        positions = str(raw.get("positions", "all"))
        if positions not in POSITION_CODES:
            raise ValueError(f"unknown positions {positions!r}")
        return cls(str(raw["key"]), str(raw["mode"]), float(raw["weight"]), positions)


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
    """The k-th steering at one layer of every token: bank row (-1: none), weight, mode and
    positions code (`POSITION_CODES`)."""

    rows: torch.Tensor  # [num_tokens] long
    weights: torch.Tensor  # [num_tokens] float32
    projection: torch.Tensor  # [num_tokens] bool
    positions: torch.Tensor  # [num_tokens] int8


@dataclass
class Plan:
    """What the layer hooks apply during one forward pass. `prompt_lengths` holds, per token,
    its request's prompt length: a token at a position past it is a generated one."""

    slots: dict[int, list[Slot]] = field(default_factory=dict)
    prompt_lengths: torch.Tensor | None = None  # [num_tokens] long


def build_plan(
    requests: Sequence[tuple[int, Sequence[Entry]]],
    bank: VectorBank,
    num_tokens: int,
    prompt_lengths: Sequence[int] | None = None,
) -> Plan:
    """Per-token steering for one step, from (scheduled tokens, entries) per request in batch
    order; tokens past the requests (padding) are left alone."""
    per_layer: dict[int, list[list[tuple[int, int, Entry]]]] = {}
    spans = []
    start = 0
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
            slots[k].append((request_index, row, entry))
    plan = Plan()
    for layer, slots in per_layer.items():
        plan.slots[layer] = [_slot(spans, items, num_tokens, bank.device) for items in slots]
    if prompt_lengths is not None:
        lengths = torch.zeros(num_tokens, dtype=torch.long)
        for (begin, end), length in zip(spans, prompt_lengths, strict=True):
            lengths[begin:end] = length
        plan.prompt_lengths = lengths.to(bank.device)
    return plan


def _slot(
    spans: Sequence[tuple[int, int]],
    items: Sequence[tuple[int, int, Entry]],
    num_tokens: int,
    device: torch.device,
) -> Slot:
    rows = torch.full((num_tokens,), -1, dtype=torch.long)
    weights = torch.zeros(num_tokens, dtype=torch.float32)
    projection = torch.zeros(num_tokens, dtype=torch.bool)
    positions = torch.zeros(num_tokens, dtype=torch.int8)
    for request_index, row, entry in items:
        begin, end = spans[request_index]
        rows[begin:end] = row
        weights[begin:end] = entry.weight
        projection[begin:end] = entry.mode == "projection"
        positions[begin:end] = POSITION_CODES[entry.positions]
    return Slot(*(t.to(device, non_blocking=True) for t in (rows, weights, projection, positions)))


def generated_mask(plan: Plan, positions: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """Which of the batch's tokens are generated ones (position at or past the prompt)."""
    mask = torch.zeros(num_tokens, dtype=torch.bool, device=plan_device(plan))
    if plan.prompt_lengths is None or positions is None:
        return mask
    if positions.dim() > 1:  # M-RoPE keeps (sections, tokens); text positions agree in all
        positions = positions[0]
    n = min(num_tokens, plan.prompt_lengths.shape[0], positions.shape[0])
    mask[:n] = positions[:n].to(mask.device) >= plan.prompt_lengths[:n]
    return mask


def plan_device(plan: Plan) -> torch.device:
    if plan.prompt_lengths is not None:
        return plan.prompt_lengths.device
    first = next((slots[0] for slots in plan.slots.values() if slots), None)
    return first.rows.device if first is not None else torch.device("cpu")


def steering_delta(
    stream: torch.Tensor,
    slots: Sequence[Slot],
    bank: VectorBank,
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """What to add to the residual stream `[num_tokens, hidden]` so that every token gets its
    request's steerings, in order; float32, zero for unsteered tokens. `generated` marks the
    tokens past their prompt (None: none are)."""
    h = stream.float()
    total = torch.zeros_like(h)
    if generated is None:
        generated = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    for slot in slots:
        at_position = (slot.positions == POSITION_CODES["all"]) | torch.where(
            generated,
            slot.positions == POSITION_CODES["generated"],
            slot.positions == POSITION_CODES["prompt"],
        )
        active = (slot.rows >= 0) & at_position
        directions = bank.directions[slot.rows.clamp(min=0)]  # [T, H]
        component = (h * directions).sum(-1)
        target = slot.weights * bank.targets[slot.rows.clamp(min=0)]
        coefficient = torch.where(slot.projection, target - component, slot.weights)
        delta = (coefficient * active).unsqueeze(-1) * directions
        h = h + delta
        total = total + delta
    return total


def apply_plan(
    output: Any, slots: Sequence[Slot], bank: VectorBank, generated: torch.Tensor | None = None
) -> Any:
    """Steer a vLLM decoder layer's output.

    Llama-style layers return `(hidden, residual)` and leave the residual add to the next
    layer's fused norm, so the stream after the layer is their sum: the delta is computed on
    the sum (projection reads the component of the whole stream) and goes into the residual.
    Layers that return one tensor get it added directly.
    """
    if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
        hidden, residual = output
        delta = steering_delta(hidden.float() + residual.float(), slots, bank, generated)
        return hidden, residual + delta.to(residual.dtype)
    hidden = output[0] if isinstance(output, tuple) else output
    steered = hidden + steering_delta(hidden, slots, bank, generated).to(hidden.dtype)
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


class _State:
    """Per-worker state of the extension: the bank and this step's plan."""

    def __init__(self, bank: VectorBank) -> None:
        self.bank = bank
        self.scheduled: Mapping[str, int] | None = None
        self.plan = Plan()
        self.plan_key: tuple[Any, ...] | None = None
        self.generated: torch.Tensor | None = None
        self.pending: set[int] = set()  # planned layers whose hook has not run this step
        self.steered_steps = 0
        self.handles: list[Any] = []


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; its methods run on every worker via `collective_rpc`.

    `self` is the vLLM worker: `self.model_runner` is its (GPU or CPU) V1 model runner.
    """

    def ifsteer_install(self) -> dict[str, Any]:
        from ifsteer.models import find_decoder_layers

        if getattr(self, "_ifsteer", None) is not None:
            return self._ifsteer_info()
        runner = self.model_runner  # type: ignore[attr-defined]
        refuse_unsupported(runner)
        model = runner.get_model()
        layers = find_decoder_layers(model)
        hidden = int(runner.model_config.get_hidden_size())
        state = _State(VectorBank(hidden, next(model.parameters()).device))
        self._ifsteer = state
        original = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            state.scheduled = dict(scheduler_output.num_scheduled_tokens)
            try:
                result = original(scheduler_output, *args, **kwargs)
            finally:
                state.scheduled = None
            if state.pending:
                missed, state.pending = sorted(state.pending), set()
                raise RuntimeError(
                    f"ifsteer: the steering hooks of layers {missed} did not run in this step; "
                    "this runner skips module hooks (compiled or graph-captured model), so "
                    "steering cannot be applied"
                )
            return result

        runner.execute_model = execute_model
        state.handles.append(
            model.register_forward_pre_hook(
                lambda _m, args, kwargs: self._ifsteer_plan(args, kwargs), with_kwargs=True
            )
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

    def ifsteer_info(self) -> dict[str, Any]:
        return self._ifsteer_info()

    def _ifsteer_info(self) -> dict[str, Any]:
        state: _State = self._ifsteer  # type: ignore[attr-defined]
        runner = self.model_runner  # type: ignore[attr-defined]
        return {
            "hidden_size": state.bank.hidden_size,
            "vectors": len(state.bank.layers),
            "steered_steps": state.steered_steps,
            "runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
        }

    def _ifsteer_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the whole model: build this step's plan (or none)."""
        state: _State = self._ifsteer  # type: ignore[attr-defined]
        scheduled = state.scheduled
        if scheduled is None:  # profiling and warm-up runs: nothing to steer
            state.plan, state.plan_key, state.generated = Plan(), None, None
            return
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: batch.num_reqs])
        key = tuple((rid, scheduled.get(rid, 0)) for rid in req_ids)
        if key != state.plan_key:  # decode steps of the same requests reuse the plan
            requests, lengths = [], []
            for rid in req_ids:
                request = runner.requests[rid]
                params = request.sampling_params
                raw = ((params.extra_args or {}) if params is not None else {}).get(EXTRA_ARGS_KEY)
                requests.append((scheduled.get(rid, 0), [Entry.parse(e) for e in raw or ()]))
                lengths.append(int(request.num_prompt_tokens))
            steered = any(entries for _, entries in requests)
            total = sum(count for count, _ in requests)
            state.plan = build_plan(requests, state.bank, total, lengths) if steered else Plan()
            state.plan_key = key
        if not state.plan.slots:
            state.generated = None
            return
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        n = state.plan.prompt_lengths.shape[0] if state.plan.prompt_lengths is not None else 0
        state.generated = generated_mask(state.plan, positions, n)
        state.pending = set(state.plan.slots)
        state.steered_steps += 1


def _layer_hook(state: _State, index: int) -> Any:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        slots = state.plan.slots.get(index)
        if not slots:
            return None
        state.pending.discard(index)
        hidden = output[0] if isinstance(output, tuple) else output
        generated = state.generated
        if hidden.shape[0] != slots[0].rows.shape[0]:  # padded batch: pad the plan
            slots = [_pad(slot, hidden.shape[0]) for slot in slots]
            if generated is not None:
                generated = _pad_tensor(generated, hidden.shape[0], False)
        return apply_plan(output, slots, state.bank, generated)

    return hook


def _pad_tensor(t: torch.Tensor, num_tokens: int, value: Any) -> torch.Tensor:
    extra = num_tokens - t.shape[0]
    if extra < 0:
        raise RuntimeError(f"steering plan covers {t.shape[0]} tokens, the batch has {num_tokens}")
    return torch.nn.functional.pad(t, (0, extra), value=value)


def _pad(slot: Slot, num_tokens: int) -> Slot:
    return Slot(
        _pad_tensor(slot.rows, num_tokens, -1),
        _pad_tensor(slot.weights, num_tokens, 0.0),
        _pad_tensor(slot.projection, num_tokens, False),
        _pad_tensor(slot.positions, num_tokens, 0),
    )


def refuse_unsupported(runner: Any) -> None:
    """Refuse, with the setting to change, every runner configuration the hooks cannot steer
    correctly: Model Runner V2 (another batch layout), torch.compile or CUDA graphs (hooks with
    data-dependent indexing are not traced or replayed), speculative decoding (draft tokens
    would be steered as if accepted, and the drafter is not steered)."""
    config = runner.vllm_config
    if getattr(config, "use_v2_model_runner", False) or not hasattr(runner, "input_batch"):
        raise RuntimeError(
            "ifsteer steering needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    compilation = config.compilation_config
    mode = int(getattr(compilation, "mode", 0) or 0)
    graphs = getattr(compilation, "cudagraph_mode", None)
    graphs_on = graphs is not None and getattr(graphs, "name", "NONE") != "NONE"
    if not runner.model_config.enforce_eager or mode != 0 or graphs_on:
        raise RuntimeError(
            "ifsteer steering needs enforce_eager=True (no torch.compile, no CUDA graphs); got "
            f"compilation mode {mode}, cudagraph mode {graphs}"
        )
    if getattr(config, "speculative_config", None) is not None:
        raise RuntimeError("ifsteer steering does not support speculative decoding")
