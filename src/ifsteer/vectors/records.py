"""What calibration records in a vector file's metadata: the one reader and writer of it.

Two records, under two keys of `extra`, because they describe two kinds of file:

- `extra["calibration"]`: a *calibrated point* (the staged search, a trained vector's
  competition, a group's point, a pending file). The file holds only the point's layers, each
  with the weight and mode it is applied at, so the file *is* the point (`Calibration`); a
  keyword file whose trained vector won inclusion also holds, at other layers, the paper's
  vector that excludes the word (`exclusion`);
- `extra["sweep"]` (`extra["sweep_with_instruction"]` for a sweep with the instruction in the
  prompt): a paper's sweep's choice written into a file that keeps every extracted layer. The
  file still serves any layer (`--layer`, another sweep); the record says which one won and
  whether steering beat "no steering" at all (`SweepChoice`).

Every other module reads these through `Calibration` and `sweep_choice`, and writes them through
`write_calibration` and `write_sweep_choice`, so their keys are spelled here only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ifsteer.errors import IfsteerError
from ifsteer.instructions import Mode
from ifsteer.vectors.files import VectorFile, save_vectors, update_defaults

if TYPE_CHECKING:
    from ifsteer.steering import Positions, Steering

__all__ = [
    "Calibration",
    "SweepChoice",
    "calibration_of",
    "point_record",
    "sweep_choice",
    "sweep_recommends",
    "write_calibration",
    "write_sweep_choice",
]

CALIBRATION = "calibration"


class Calibration(Mapping[str, Any]):
    """A file's `extra["calibration"]` (empty where none was written), read by name.

    Still a mapping, so a record written by an older build (or with keys added since) reads
    whole; the properties are what the library itself reads, with the defaults of files
    written before each key existed."""

    def __init__(self, record: Mapping[str, Any] | None = None) -> None:
        self._record = dict(record or {})

    def __getitem__(self, key: str) -> Any:
        return self._record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record)

    def __len__(self) -> int:
        return len(self._record)

    def __repr__(self) -> str:
        return f"Calibration({self._record!r})"

    @property
    def status(self) -> str:
        """`searched`, `verified`, `pending`, or `unverified` (a group's point)."""
        return str(self._record.get("status", "searched"))

    @property
    def recommended(self) -> bool:
        return bool(self._record.get("recommended", False))

    @property
    def method(self) -> str:
        """How the vectors were made: "mean_difference" (the paper's) or "trained"."""
        return str(self._record.get("method", "mean_difference"))

    @property
    def point(self) -> str:
        """The point's key (`calibration.Point.key`), "" where none was recorded."""
        return str(self._record.get("point", ""))

    @property
    def mode(self) -> Mode | None:
        return cast("Mode | None", self._record.get("mode"))

    @property
    def scale(self) -> float | None:
        scale = self._record.get("scale")
        return None if scale is None else float(scale)

    @property
    def layers(self) -> tuple[int, ...] | None:
        """The layers the file applies (None: the file's default layer alone)."""
        layers = self._record.get("layers")
        return None if layers is None else tuple(int(layer) for layer in layers)

    def weight(self, layer: int) -> float | None:
        found = self._record.get("weights", {}).get(str(layer))
        return None if found is None else float(found)

    @property
    def positions(self) -> Positions:
        return cast("Positions", str(self._record.get("positions", "all")))

    @property
    def validation(self) -> Mapping[str, Any]:
        """Scores on validation prompts (`score`, `no_steering_score`, ...); empty if none."""
        return self._record.get("validation") or {}

    def paper_target(self, layer: int) -> float | None:
        """The paper's c̄ at `layer`, before a target scale moved it (None: not recorded)."""
        found = self._record.get("paper_targets", {}).get(str(layer))
        return None if found is None else float(found)

    @property
    def group(self) -> Mapping[str, Any] | None:
        """For a group's point: its `donor` file and the donor's `point`."""
        return self._record.get("group") or None

    @property
    def fluency(self) -> Mapping[str, Any] | None:
        """The fluency thresholds the point was judged by."""
        return self._record.get("fluency")

    @property
    def seed(self) -> int:
        return int(self._record.get("seed", 0))

    @property
    def competition(self) -> Mapping[str, Any] | None:
        """The paper's vector against a trained one (`training.compete`), where held."""
        return self._record.get("competition")

    @property
    def exclusion(self) -> Mapping[str, Any] | None:
        """Where a forbidden word is not excluded by the point's own vectors negated: the
        layers and weights of the vectors the file keeps for that (`write_calibration`)."""
        return self._record.get("exclusion") or None

    def updated(self, **changes: Any) -> dict[str, Any]:
        """The record with `changes`, to write back (`write_calibration`)."""
        return {**self._record, **changes}


def calibration_of(file: VectorFile) -> Calibration:
    return Calibration(file.default.extra.get(CALIBRATION))


def point_record(
    *,
    status: str,
    recommended: bool,
    point: str,
    mode: str | None,
    scale: float | None,
    validation: Mapping[str, Any] | None,
    paper_targets: Mapping[int, float],
    **more: Any,
) -> dict[str, Any]:
    """A calibrated point's record, for `write_calibration`; `more` adds what one maker
    records besides (the search's grid, a group's donor, a competition...)."""
    return {
        "status": status,
        "recommended": recommended,
        "point": point,
        "mode": mode,
        "scale": scale,
        "validation": None if validation is None else dict(validation),
        "paper_targets": {str(layer): float(t) for layer, t in paper_targets.items()},
        **more,
    }


def write_calibration(
    path: Path,
    steerings: Sequence[Steering],
    record: Mapping[str, Any],
    exclusion: Sequence[Steering] = (),
) -> Path:
    """One file from the steerings of a chosen point (each at its own layer) and its record;
    the layers, per-layer weights and positions applied are added to the record.

    `exclusion`: the steerings (positive weights) that exclude a forbidden word where that is
    not the point's own vectors negated; `record["exclusion"]` may say which point they are.
    A keyword's trained vector won on inclusion only, and negated it breaks answers
    (docs/shipped.md), so the file keeps the paper's vector for exclusion. One file holds one
    vector per layer, so the two must not share a layer."""
    if not steerings:
        raise IfsteerError("a calibrated file needs at least one steering")
    clash = {s.vector.layer for s in steerings} & {s.vector.layer for s in exclusion}
    if clash:
        raise IfsteerError(
            f"{path.name}: the exclusion vector and the point both sit at layer "
            f"{sorted(clash)[0]}; a file holds one vector per layer"
        )
    written = {
        **{k: v for k, v in record.items() if k != "exclusion"},
        **_applied(steerings),
        "paper_targets": dict(record.get("paper_targets", {})),
    }
    if exclusion:
        # What the record says of the exclusion's point (its key, scale, validation) stays;
        # where it is applied comes from its steerings. A file keeps one mode for all its
        # layers, so the exclusion's is recorded with it.
        written["exclusion"] = {
            **record.get("exclusion", {}),
            **_applied(exclusion),
            "mode": exclusion[0].effective_mode,
        }
    vectors = [
        replace(
            s.vector,
            mode=s.effective_mode,
            weight=s.effective_weight,
            extra={**s.vector.extra, CALIBRATION: written},
        )
        for s in (*steerings, *exclusion)
    ]
    return save_vectors(path, vectors, default=vectors[0].layer)


def _applied(steerings: Sequence[Steering]) -> dict[str, Any]:
    return {
        "layers": [s.vector.layer for s in steerings],
        "weights": {str(s.vector.layer): s.effective_weight for s in steerings},
        "positions": steerings[0].positions,
    }


def _sweep_key(with_instruction: bool) -> str:
    return "sweep_with_instruction" if with_instruction else "sweep"


@dataclass(frozen=True)
class SweepChoice:
    """A sweep's choice as written into a file: the chosen layer and weight (None where "no
    steering" won, or the file's own weight), whether steering won, and the rest as measured
    (`best_layer`, `no_steering_score`, `n_prompts`, ...)."""

    layer: int | None
    weight: float | None
    score: float | None
    recommended: bool
    measured: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "weight": self.weight,
            "score": self.score,
            "recommended": self.recommended,
            **self.measured,
        }


def sweep_choice(file: VectorFile, with_instruction: bool = False) -> SweepChoice | None:
    """The choice a sweep of this setting wrote into the file, or None where none did."""
    record = file.default.extra.get(_sweep_key(with_instruction))
    if not isinstance(record, Mapping):
        return None
    head = ("layer", "weight", "score", "recommended")
    return SweepChoice(
        layer=record.get("layer"),
        weight=record.get("weight"),
        score=record.get("score"),
        # A record without the flag predates it: it was written for a steered winner.
        recommended=record.get("recommended") is not False,
        measured={k: v for k, v in record.items() if k not in head},
    )


def sweep_recommends(file: VectorFile, with_instruction: bool = False) -> bool:
    """Whether a file may steer after its sweep: False only where a sweep (of the same
    setting) recorded that "no steering" won; a file no sweep wrote into may steer."""
    choice = sweep_choice(file, with_instruction)
    return choice is None or choice.recommended


def write_sweep_choice(
    path: Path, choice: SweepChoice, *, with_instruction: bool, set_default: bool
) -> Path:
    """Record a sweep's choice in a file; with `set_default`, a winning layer (and weight)
    becomes the file's default. Where "no steering" won, the default layer stays."""
    write = set_default and choice.recommended
    key = _sweep_key(with_instruction)
    return update_defaults(
        path,
        layer=choice.layer if write else None,
        weight=choice.weight if write else None,
        extra={key: choice.to_json()},
    )
