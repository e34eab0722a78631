"""A steering vector as a value: one instruction's direction at one layer, with its algebra.

A vector is the mean difference of residual-stream activations at the last prompt token, at the
output of one decoder layer, between prompts with and without an instruction (docs/method.md §1).
We keep it as a unit direction û plus its norm, and the mean with-instruction projection c̄ that
projection steering sets every position to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ifsteer import __version__
from ifsteer.errors import InvalidSteering, VectorMismatch
from ifsteer.instructions import MODES, Mode


@dataclass(frozen=True)
class SteeringVector:
    """One instruction's direction at one layer, and how to apply it by default.

    `weight` scales what is applied: the added amount `weight·û` in additive mode, the target
    projection `weight·c̄` in projection mode (1 reproduces the paper). Algebra acts on weight,
    so `v * 20` applied is the same as `v` applied with weight 20.
    """

    direction: torch.Tensor
    norm: float
    layer: int
    target: float
    model_id: str
    hidden_size: int
    instruction: str
    instruction_id: str
    phrasings: tuple[str, ...] = ()
    n_pairs: int = 0
    mode: Mode = "projection"
    weight: float = 1.0
    version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction.ndim != 1 or self.direction.shape[0] != self.hidden_size:
            raise VectorMismatch(
                f"direction has shape {tuple(self.direction.shape)}, expected ({self.hidden_size},)"
            )
        if self.mode not in MODES:
            raise InvalidSteering(f"unknown mode {self.mode!r}; choose projection or additive")
        if not math.isfinite(self.weight):
            raise InvalidSteering(f"weight must be a finite number, got {self.weight}")

    @property
    def value(self) -> torch.Tensor:
        """The displacement additive steering adds: weight·û."""
        return self.weight * self.direction

    def with_defaults(
        self, *, mode: Mode | None = None, weight: float | None = None
    ) -> SteeringVector:
        return replace(
            self,
            mode=self.mode if mode is None else mode,
            weight=self.weight if weight is None else float(weight),
        )

    def __mul__(self, scale: float) -> SteeringVector:
        return replace(self, weight=self.weight * float(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __add__(self, other: SteeringVector) -> SteeringVector:
        """Sum of the two additive displacements, as one additive vector at their layer.

        Projection vectors do not add (each sets its own component); compose those by passing
        both to `steer`.
        """
        if not isinstance(other, SteeringVector):
            return NotImplemented
        _check_compatible(self, other)
        total = self.value + other.value
        norm = float(total.norm())
        direction = total / norm if norm > 0 else total
        return replace(
            self,
            direction=direction,
            norm=norm,
            target=0.0,
            instruction=f"{self.instruction} + {other.instruction}",
            instruction_id=f"{self.instruction_id}+{other.instruction_id}",
            phrasings=self.phrasings + other.phrasings,
            n_pairs=self.n_pairs + other.n_pairs,
            mode="additive",
            weight=norm,
        )

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def check_fits(
        self, model_id: str, hidden_size: int, n_layers: int, *, allow_transfer: bool = False
    ) -> None:
        """Refuse a vector that cannot mean anything on this model, with one line that says why."""
        if self.hidden_size != hidden_size:
            raise VectorMismatch(
                f"vector {self.instruction_id!r} has hidden size {self.hidden_size} "
                f"(model {self.model_id}), this model has {hidden_size}"
            )
        if not 0 <= self.layer < n_layers:
            raise VectorMismatch(
                f"vector {self.instruction_id!r} is for layer {self.layer}, "
                f"this model has layers 0..{n_layers - 1}"
            )
        if self.model_id != model_id and not allow_transfer:
            raise VectorMismatch(
                f"vector {self.instruction_id!r} was extracted from {self.model_id!r}, not "
                f"{model_id!r}; pass allow_transfer (--allow-transfer) to apply it anyway"
            )


def _check_compatible(a: SteeringVector, b: SteeringVector) -> None:
    if a.hidden_size != b.hidden_size or a.layer != b.layer:
        raise VectorMismatch(
            f"cannot add vectors at layer {a.layer} (hidden {a.hidden_size}) and layer "
            f"{b.layer} (hidden {b.hidden_size}); steer with both instead"
        )
    if a.mode == "projection" and a.weight and b.mode == "projection" and b.weight:
        raise InvalidSteering(
            "projection vectors do not add; pass both to steer(), or switch them to additive"
        )
