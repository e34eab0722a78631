"""Steering a flattened vLLM batch, as tensors: the vector bank, the per-token plan, the delta.

vLLM runs every scheduled request's tokens as one `[num_tokens, hidden]` batch. Steering it
must give each token exactly what `ifsteer.steering` gives its request's row, and it must do
so inside compiled graphs and CUDA graphs, which replay kernels on fixed addresses and run no
Python. So everything a step's steering reads lives in tensors allocated once, at their
largest (`VectorBank`: the directions; `PlanBuffers`: per layer, per slot and per token, the
bank row, weight and mode), and each step only writes into them; the arithmetic
(`steering_delta`) is a fixed sequence of batched tensor operations whatever the plan holds.

Pure torch, no vLLM: the worker (`worker.py`) feeds these from vLLM's runner, the op
(`op.py`) applies them, and the unit tests check them against the HF hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

EXTRA_ARGS_KEY = "ifsteer"
# Which tokens of a request a steering acts on, as a per-token code.
POSITION_CODES = {"all": 0, "prompt": 1, "generated": 2}
# Steerings of one request at one layer; the plan is allocated for this many, and a request
# with more is refused before it reaches a worker (`check_slots`).
SLOTS_PER_LAYER = 4
# Vectors a worker's bank holds; registering more is refused (restart the engine).
BANK_CAPACITY = 256


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


def check_slots(layers: Sequence[int]) -> None:
    """Refuse a request stacking more steerings at one layer than the plan has slots for."""
    for layer in set(layers):
        if layers.count(layer) > SLOTS_PER_LAYER:
            raise ValueError(
                f"{layers.count(layer)} steerings at layer {layer}: the vLLM backend applies "
                f"at most {SLOTS_PER_LAYER} per layer (add the vectors into one: v1 + v2)"
            )


class VectorBank:
    """Directions registered on one worker, one row each, with their layers and targets.

    The tensors are allocated at `capacity` rows and filled in place, so a graph captured
    before a registration reads the new rows too."""

    def __init__(
        self,
        hidden_size: int,
        device: torch.device | str = "cpu",
        capacity: int = BANK_CAPACITY,
    ) -> None:
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.capacity = capacity
        self.rows: dict[str, int] = {}
        self.layers: list[int] = []
        self.directions = torch.zeros(capacity, hidden_size, device=self.device)
        self.targets = torch.zeros(capacity, device=self.device)

    def register(self, entries: Sequence[Mapping[str, Any]]) -> int:
        """Add `{"key", "layer", "target", "direction"}` entries; known keys are skipped."""
        new = [e for e in entries if e["key"] not in self.rows]
        if not new:
            return len(self.layers)
        directions = torch.tensor([list(e["direction"]) for e in new], dtype=torch.float32)
        if directions.shape[1] != self.hidden_size:
            raise ValueError(
                f"vector of size {directions.shape[1]} on a model of hidden size {self.hidden_size}"
            )
        start, end = len(self.layers), len(self.layers) + len(new)
        if end > self.capacity:
            raise ValueError(
                f"the worker's vector bank holds {self.capacity} vectors; restart the engine "
                "to serve others"
            )
        self.directions[start:end] = directions.to(self.device)
        self.targets[start:end] = torch.tensor([float(e["target"]) for e in new]).to(self.device)
        for e in new:
            self.rows[str(e["key"])] = len(self.layers)
            self.layers.append(int(e["layer"]))
        return len(self.layers)


@dataclass(frozen=True)
class Plan:
    """One step's steering, built on the host: for each steered layer, `[slots, tokens]`
    tensors of bank rows (-1: none), weights, projection flags and positions codes, plus each
    token's prompt length (a token at a position past it is a generated one)."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    prompt_lengths: torch.Tensor  # [num_tokens] long
    num_tokens: int
    depth: int  # slots in use at the most stacked layer


def build_plan(
    requests: Sequence[tuple[int, Sequence[Entry]]],
    bank: VectorBank,
    prompt_lengths: Sequence[int],
) -> Plan:
    """The plan of one step, from (scheduled tokens, entries) per request in batch order; the
    k-th steering a request has at a layer takes slot k there, so several stack in order."""
    total = sum(count for count, _ in requests)
    layers: dict[int, tuple[torch.Tensor, ...]] = {}
    deepest = 0
    lengths = torch.zeros(total, dtype=torch.long)
    start = 0
    for (count, entries), length in zip(requests, prompt_lengths, strict=True):
        span = slice(start, start + count)
        lengths[span] = length
        depth: dict[int, int] = {}
        for entry in entries:
            if entry.key not in bank.rows:
                raise KeyError(f"steering vector {entry.key} is not registered on this worker")
            row = bank.rows[entry.key]
            layer = bank.layers[row]
            slot = depth.get(layer, 0)
            if slot >= SLOTS_PER_LAYER:
                raise ValueError(f"more than {SLOTS_PER_LAYER} steerings at layer {layer}")
            depth[layer] = slot + 1
            deepest = max(deepest, slot + 1)
            if layer not in layers:
                layers[layer] = (
                    torch.full((SLOTS_PER_LAYER, total), -1, dtype=torch.long),
                    torch.zeros(SLOTS_PER_LAYER, total),
                    torch.zeros(SLOTS_PER_LAYER, total, dtype=torch.bool),
                    torch.zeros(SLOTS_PER_LAYER, total, dtype=torch.int8),
                )
            rows, weights, projection, positions = layers[layer]
            rows[slot, span] = row
            weights[slot, span] = entry.weight
            projection[slot, span] = entry.mode == "projection"
            positions[slot, span] = POSITION_CODES[entry.positions]
        start += count
    return Plan(layers, lengths, total, deepest)  # type: ignore[arg-type]


class PlanBuffers:
    """The plan as the op reads it: `[layers, slots, max_tokens]` tensors allocated once.

    `load` writes a step's plan in place and resolves positions against the step's token
    positions, so the op needs no more than a row, a weight and a flag per slot and token: a
    steering that does not act on a token has weight 0 there and no projection. Slots and
    tokens outside the plan stay at that, so padding tokens are never steered."""

    def __init__(self, n_layers: int, max_tokens: int, bank: VectorBank) -> None:
        shape = (n_layers, SLOTS_PER_LAYER, max_tokens)
        self.bank = bank
        self.max_tokens = max_tokens
        self.rows = torch.zeros(shape, dtype=torch.long, device=bank.device)
        self.weights = torch.zeros(shape, device=bank.device)
        self.projection = torch.zeros(shape, dtype=torch.bool, device=bank.device)
        # How many times each layer's op ran since `clear_tally` (a device count: replayed
        # graphs run no Python), and its copy on the host, taken by `record`.
        self.tally = torch.zeros(n_layers, dtype=torch.int32, device=bank.device)
        self._host_tally = torch.zeros(
            n_layers, dtype=torch.int32, pin_memory=bank.device.type == "cuda"
        )
        self._recorded: tuple[frozenset[int], torch.cuda.Event | None] | None = None
        self.planned: frozenset[int] = frozenset()
        self.depth = 0  # slots in use this step
        self._written = 0  # tokens the last plan wrote, in every planned layer
        # The last plan's tensors on the device: decode steps reuse one plan, copied once.
        self._on_device: tuple[Plan, dict[int, tuple[torch.Tensor, ...]]] | None = None

    def load(self, plan: Plan | None, positions: torch.Tensor | None) -> None:
        """Make `plan` (None: nothing steered) the one the op applies, for tokens at
        `positions` (the model's position ids, `[num_tokens]` or M-RoPE's `[3, num_tokens]`)."""
        for layer in self.planned:
            self.weights[layer, :, : self._written] = 0.0
            self.projection[layer, :, : self._written] = False
        self.planned, self.depth, self._written = frozenset(), 0, 0
        if plan is None or not plan.layers:
            return
        n = plan.num_tokens
        if n > self.max_tokens:
            raise RuntimeError(f"a step of {n} tokens, the plan holds {self.max_tokens}")
        generated = torch.zeros(n, dtype=torch.bool, device=self.bank.device)
        if positions is not None:
            if positions.dim() > 1:  # M-RoPE: text positions agree in every section
                positions = positions[0]
            lengths = plan.prompt_lengths.to(self.bank.device, non_blocking=True)
            generated = positions[:n].to(self.bank.device) >= lengths
        if self._on_device is None or self._on_device[0] is not plan:
            device = self.bank.device
            layers = {k: tuple(t.to(device) for t in host) for k, host in plan.layers.items()}
            self._on_device = (plan, layers)
        for layer, (rows, weights, projection, codes) in self._on_device[1].items():
            active = (rows >= 0) & (
                (codes == POSITION_CODES["all"])
                | torch.where(
                    generated,
                    codes == POSITION_CODES["generated"],
                    codes == POSITION_CODES["prompt"],
                )
            )
            self.rows[layer, :, :n] = rows.clamp(min=0)
            self.weights[layer, :, :n] = torch.where(active, weights, 0.0)
            self.projection[layer, :, :n] = projection & active
        self.planned, self.depth, self._written = frozenset(plan.layers), plan.depth, n

    def clear_tally(self) -> None:
        self.tally.zero_()

    def record(self) -> None:
        """Copy the tally of the step just run to the host for `missed`, without waiting for
        the device (on GPUs vLLM prepares the next step while this one runs)."""
        self._recorded = None
        if self.planned:
            self._host_tally.copy_(self.tally, non_blocking=True)
            event = torch.cuda.Event() if self.tally.is_cuda else None
            if event is not None:
                event.record()
            self._recorded = (self.planned, event)

    def missed(self) -> list[int]:
        """Planned layers of the recorded step whose op did not run (once per record)."""
        if self._recorded is None:
            return []
        (planned, event), self._recorded = self._recorded, None
        if event is not None:
            event.synchronize()
        counts = self._host_tally.tolist()
        return sorted(layer for layer in planned if counts[layer] == 0)


def steering_delta(
    stream: torch.Tensor,
    buffers: PlanBuffers,
    layer: int,
    slots: int = SLOTS_PER_LAYER,
) -> torch.Tensor:
    """What to add to the residual stream `[num_tokens, hidden]` at `layer` so that every token
    gets its request's steerings in order (projection `(w·c̄ − h·û)û` on the stream as the
    earlier slots left it, additive `w·û`); float32, zero where nothing acts. The same
    operations run whatever the plan holds, so a captured graph serves every plan."""
    n = stream.shape[0]
    if n > buffers.max_tokens:
        raise RuntimeError(f"a step of {n} tokens, the plan holds {buffers.max_tokens}")
    bank = buffers.bank
    h = stream.float()
    total = torch.zeros_like(h)
    for slot in range(slots):
        rows = buffers.rows[layer, slot, :n]
        weights = buffers.weights[layer, slot, :n]
        directions = bank.directions[rows]  # [n, hidden]
        component = (h * directions).sum(-1)
        coefficient = torch.where(
            buffers.projection[layer, slot, :n], weights * bank.targets[rows] - component, weights
        )
        delta = coefficient.unsqueeze(-1) * directions
        h = h + delta
        total = total + delta
    return total
