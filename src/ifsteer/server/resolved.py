"""What a request's steering entry became: the `Steering`s it applies and what the response's
`steering` echo says about it (which vector, layer(s), mode, weight; for an instruction, which
point: `shipped`, `group` (unverified) or `extracted` (uncalibrated)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ifsteer.instructions import Mode
from ifsteer.shipped import ShippedVector
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector

from .schema import SteeringSpec


@dataclass(frozen=True)
class Resolved:
    """A steering entry turned into what `steer` applies (one steering, or a point's several),
    with where it came from and, for an instruction, which point it is."""

    steerings: tuple[Steering, ...]
    source: str
    point: Mapping[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        first = self.steerings[0]
        described: dict[str, Any] = {
            "source": self.source,
            "instruction_id": first.vector.instruction_id,
        }
        if len(self.steerings) == 1:  # a point of several layers lists them below
            described["layer"] = first.vector.layer
        described["mode"] = first.effective_mode
        if len(self.steerings) == 1:
            described["weight"] = first.effective_weight
        if self.point is not None:
            described |= self.point
            if "layers" in self.point:  # what was applied, overrides included
                described["weights"] = [s.effective_weight for s in self.steerings]
        if first.positions != "all":  # shown only where the request or the point narrowed it
            described["positions"] = first.positions
        return described


def kind_of(point: ShippedVector) -> str:
    """`group` for an id with no file, steered at its group's point; else `shipped`."""
    return "group" if point.calibration.group else "shipped"


def point_echo(point: ShippedVector, kind: str) -> dict[str, Any]:
    """`shipped` or `group` (an id with no file, at its group's point: status `unverified`)."""
    info = point.describe()
    echo = {"point": kind, "status": info["status"], "recommended": info["recommended"]}
    echo |= {"method": info["method"], "layers": info["layers"]}
    if "group_of" in info:
        echo["group_of"] = info["group_of"]
    return echo


EXTRACTED = {"point": "extracted", "status": "uncalibrated"}


def natural_weight(vector: SteeringVector, mode: Mode) -> float:
    """The vector's own weight in its own mode; otherwise that mode's default weight."""
    if mode == vector.mode:
        return vector.weight
    return vector.norm if mode == "additive" else 1.0


def overridden(steering: Steering, spec: SteeringSpec) -> Steering:
    """A request's mode, weight and positions over an entry's own (each layer of a point):
    a mode switched without a weight takes that mode's natural weight."""
    vector = steering.vector
    mode: Mode = spec.mode or steering.effective_mode
    if spec.weight is not None:
        weight = spec.weight
    elif mode != steering.effective_mode:
        weight = natural_weight(vector, mode)
    else:
        weight = steering.effective_weight
    return Steering(
        vector, mode=mode, weight=weight, positions=spec.positions or steering.positions
    )
