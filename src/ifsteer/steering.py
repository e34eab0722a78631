"""The one hook every face of ifsteer steers through.

`steer()` installs forward hooks on the output of decoder layers and removes them on exit, also
when the body raises, so a model is never left steered by accident. Each row of a batch can
carry its own vectors (or none): the server batches unrelated requests, and evaluation runs
the steered and unsteered settings side by side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache

from ifsteer.errors import InvalidSteering
from ifsteer.models import LoadedModel
from ifsteer.vectors import MODES, Mode, SteeringVector

Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[Positions, ...] = ("all", "prompt", "generated")


@dataclass(frozen=True)
class Steering:
    """A vector and how to apply it; mode and weight default to those stored in the vector."""

    vector: SteeringVector
    mode: Mode | None = None
    weight: float | None = None
    positions: Positions = "all"

    @property
    def effective_mode(self) -> Mode:
        return self.vector.mode if self.mode is None else self.mode

    @property
    def effective_weight(self) -> float:
        return self.vector.weight if self.weight is None else float(self.weight)

    def validate(self) -> None:
        if self.effective_mode not in MODES:
            raise InvalidSteering(
                f"unknown mode {self.effective_mode!r}; choose projection or additive"
            )
        if not math.isfinite(self.effective_weight):
            raise InvalidSteering(f"weight must be a finite number, got {self.effective_weight}")
        if self.positions not in POSITIONS:
            raise InvalidSteering(
                f"unknown positions {self.positions!r}; choose all, prompt or generated"
            )


@dataclass(frozen=True)
class _Applied:
    """A steering resolved to tensors on the model's device, ready for the hot path."""

    direction: torch.Tensor  # float32, unit
    mode: Mode
    weight: float
    target: float
    positions: Positions

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "additive":
            return hidden + (self.weight * self.direction).to(hidden.dtype)
        # Projection in float32 so bf16 models land on the target as closely as fp32 ones.
        h = hidden.float()
        component = h @ self.direction
        shifted = h + (self.weight * self.target - component).unsqueeze(-1) * self.direction
        return shifted.to(hidden.dtype)


class SteeringHandle:
    """What `steer` yields: knows whether the model is reading the prompt or generating."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self.phase: Literal["prompt", "generated"] = "prompt"

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _track_phase(self, _module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        # A forward with an empty (or no) cache reads a prompt; any later one extends it.
        # Found by type: transformers renamed the argument (past_key_values, then cache).
        cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)
        filled = cache is not None and cache.get_seq_length() > 0
        self.phase = "generated" if filled else "prompt"


def check_steering(
    lm: LoadedModel, steering: Sequence[Steering], *, allow_transfer: bool = False
) -> None:
    """Refuse what cannot be applied to `lm`, before any work is spent on it."""
    for s in steering:
        s.validate()
        s.vector.check_fits(lm.model_id, lm.hidden_size, lm.n_layers, allow_transfer=allow_transfer)


# Rows of the batch a group applies to (None: all rows) and what is applied to them, in order.
_Group = tuple[torch.Tensor | None, list[_Applied]]


@contextmanager
def steer(
    lm: LoadedModel,
    steering: Sequence[Steering] = (),
    *,
    per_row: Sequence[Sequence[Steering]] | None = None,
    allow_transfer: bool = False,
) -> Iterator[SteeringHandle]:
    """Steer `lm` inside the block: `steering` for every row, or `per_row[i]` for row i.

    Several steerings at one layer stack in the order given; steerings at different layers
    compose. Vectors that do not fit the model are refused before any hook is installed.
    """
    if per_row is not None and steering:
        raise InvalidSteering("give either steering for all rows or per_row, not both")
    rows: Sequence[Sequence[Steering]] = [steering] if per_row is None else per_row
    for row in rows:
        check_steering(lm, row, allow_transfer=allow_transfer)
    groups = _group_by_layer(rows, per_row is not None, lm.device)
    handle = SteeringHandle()
    try:
        if groups:
            handle._handles.append(
                lm.model.register_forward_pre_hook(handle._track_phase, with_kwargs=True)
            )
            for layer, layer_groups in groups.items():
                hook = _make_hook(layer_groups, handle, len(rows) if per_row is not None else None)
                handle._handles.append(lm.layers[layer].register_forward_hook(hook))
        yield handle
    finally:
        handle.remove()


def _group_by_layer(
    rows: Sequence[Sequence[Steering]], per_row: bool, device: torch.device
) -> dict[int, list[_Group]]:
    """Rows that share the same steerings at a layer are steered in one indexed operation."""
    by_layer: dict[int, dict[tuple[int, ...], list[int]]] = {}
    resolved: dict[int, _Applied] = {}
    for row_index, row in enumerate(rows):
        per_layer: dict[int, list[int]] = {}
        for s in row:
            if id(s) not in resolved:
                resolved[id(s)] = _resolve(s, device)
            per_layer.setdefault(s.vector.layer, []).append(id(s))
        for layer, keys in per_layer.items():
            by_layer.setdefault(layer, {}).setdefault(tuple(keys), []).append(row_index)
    groups: dict[int, list[_Group]] = {}
    for layer, by_keys in by_layer.items():
        groups[layer] = [
            (
                torch.tensor(row_ids, device=device) if per_row else None,
                [resolved[k] for k in keys],
            )
            for keys, row_ids in by_keys.items()
        ]
    return groups


def _resolve(s: Steering, device: torch.device) -> _Applied:
    return _Applied(
        direction=s.vector.direction.to(device=device, dtype=torch.float32),
        mode=s.effective_mode,
        weight=s.effective_weight,
        target=s.vector.target,
        positions=s.positions,
    )


def _make_hook(groups: list[_Group], handle: SteeringHandle, batch_rows: int | None) -> Any:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if batch_rows is not None and hidden.shape[0] != batch_rows:
            raise InvalidSteering(
                f"per_row has {batch_rows} rows but the batch has {hidden.shape[0]}"
            )
        for rows, applied in groups:
            active = [a for a in applied if a.positions in ("all", handle.phase)]
            if not active:
                continue
            part = hidden if rows is None else hidden.index_select(0, rows)
            for a in active:
                part = a.apply(part)
            hidden = part if rows is None else hidden.index_copy(0, rows, part)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook
