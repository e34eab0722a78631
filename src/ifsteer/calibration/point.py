"""A point: one way to steer, as both calibration plans vary it, and the steerings it makes.

The staged search varies layers, mode, positions and a *scale* relative to each vector; the
paper's sweep varies one layer and an *absolute* weight. One type holds both, so one choice
rule, one result type and one function (`steerings_for`) serve both plans. Torch-free until
`steerings_for` runs, so the grid and the report read points without a model stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from ifsteer.errors import InvalidSteering
from ifsteer.instructions import Mode

if TYPE_CHECKING:
    from ifsteer.steering import Positions, Steering
    from ifsteer.vectors import SteeringVector

__all__ = ["FILE_WEIGHT", "Point", "projection_target", "steerings_for"]

# A sweep point's weight that is each vector file's own (`SteeringVector.weight`).
FILE_WEIGHT: Final = "file"


@dataclass(frozen=True)
class Point:
    """The layers (none: no steering), mode, how hard, and the positions steered.

    How hard is `scale`, relative to each vector (the staged search): a projection target
    c̄ + (scale − 1)·‖u‖, an additive weight scale·‖u‖ split evenly over the layers; unless
    `weight` gives it outright (the paper's sweep): that weight for every vector, as `Steering`
    reads it, or `FILE_WEIGHT` for each file's own. `mode` None is each file's own mode; it
    needs an outright weight."""

    layers: tuple[int, ...] = ()
    mode: Mode | None = "projection"
    scale: float = 1.0
    positions: Positions = "all"
    weight: float | Literal["file"] | None = None

    def __post_init__(self) -> None:
        if self.mode is None and self.weight is None:
            raise InvalidSteering("a point in each file's own mode needs a weight")

    @classmethod
    def swept(
        cls, layer: int | None, weight: float | None = None, mode: Mode | None = None
    ) -> Point:
        """A point of the paper's sweep: one layer (None: no steering) at `weight` (None: each
        file's own), in `mode` (None: each file's own)."""
        if layer is None:
            return cls()
        return cls((layer,), mode, weight=FILE_WEIGHT if weight is None else weight)

    @property
    def steered(self) -> bool:
        return bool(self.layers)

    @property
    def coordinates(self) -> tuple[int | None, float | None]:
        """(layer, weight) as the paper's sweep names a point in its files and answer log:
        layer None is no steering, weight None each file's own."""
        if not self.layers:
            return None, None
        if len(self.layers) != 1 or self.weight is None:
            raise InvalidSteering(f"point {self.key} is not a point of the paper's sweep")
        return self.layers[0], None if self.weight == FILE_WEIGHT else self.weight

    @property
    def key(self) -> str:
        if not self.layers:
            return "none"
        layers = "+".join(map(str, self.layers))
        if self.weight is None:
            how = f"{self.scale:g}"
        elif self.weight == FILE_WEIGHT:
            how = f"w={FILE_WEIGHT}"
        else:
            how = f"w={self.weight:g}"
        return f"L{layers}:{self.mode or 'file'}:{how}:{self.positions}"

    def rank(self) -> tuple[Any, ...]:
        """Simplicity, for ties: fewer layers, all positions, lower layer, projection, the scale
        closest to the paper's, then the smaller |weight| (a sweep's points differ only in
        layer and weight, so theirs is lower layer, then smaller |weight|)."""
        paper_scale = 1.0 if self.mode == "projection" else 0.0
        weight = 0.0 if self.weight is None or self.weight == FILE_WEIGHT else abs(self.weight)
        return (
            len(self.layers),
            self.positions != "all",
            self.layers,
            self.mode != "projection",
            abs(self.scale - paper_scale),
            weight,
        )


def projection_target(vector: SteeringVector, scale: float) -> float:
    """c̄ + (scale − 1)·‖u‖: scale 1 is the paper's target, larger is more of the instruction."""
    return vector.target + (scale - 1.0) * vector.norm


def steerings_for(
    point: Point, vectors: Mapping[int, SteeringVector], *, negate: bool = False
) -> list[Steering]:
    """The steerings that apply `point` with one file's vectors, by layer (none for "no
    steering"); `negate` flips every weight (a forbidden word steered by its inclusion vector)."""
    from ifsteer.steering import Steering

    missing = [layer for layer in point.layers if layer not in vectors]
    if missing:
        raise InvalidSteering(f"no vector at layer(s) {missing} for point {point.key}")
    sign = -1.0 if negate else 1.0
    steerings = []
    for layer in point.layers:
        v = vectors[layer]
        if point.weight is not None:
            weight = v.weight if point.weight == FILE_WEIGHT else float(point.weight)
            mode, applied = point.mode, sign * weight
        elif point.mode == "projection":
            v = replace(v, target=projection_target(v, point.scale))
            mode, applied = "projection", sign
        else:
            mode, applied = "additive", sign * point.scale * v.norm / len(point.layers)
        steerings.append(Steering(v, mode=mode, weight=applied, positions=point.positions))
    return steerings
