"""Calibrated vectors that ship inside the package, one folder per model.

Extraction is cheap but calibration is not (it generates hundreds of answers per instruction),
so the embedded model's vectors come already calibrated: `ifsteer generate --instruction-id ID`
steers with no extraction and no sweep. Each file holds only the layer(s) the search chose and
records, in its metadata (`extra["calibration"]`, read and written by `ifsteer.vectors.records`),
the chosen point, its validation scores and
those of "no steering". A file is shipped also when "no steering" won its search, with
`recommended: false`: the user sees that steering did not help on validation instead of
finding no file.

The search's projection *target scale* is stored as the target itself (`c̄ + (s−1)·‖u‖`, see
`ifsteer.calibration.search`), with the paper's c̄ per layer kept in `paper_targets`; so code
that loads the file with `ifsteer.vectors.load_vector` and steers with it applies the
calibrated point at its first layer. Several chosen layers keep their per-layer weights in
`weights`, and `applied` (or `file_steerings`) gives the whole point.

`ifsteer vectors build` rebuilds the files (`shipped/build.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ifsteer.errors import IfsteerError, MalformedVectorFile
from ifsteer.instructions import Mode
from ifsteer.models import DEFAULT_MODEL
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector, VectorFile, read_vector_file
from ifsteer.vectors.records import Calibration, calibration_of
from ifsteer.vectors.records import write_calibration as write_calibrated

__all__ = [
    "NotShipped",
    "ShippedVector",
    "applied",
    "calibrated",
    "file_name",
    "file_steerings",
    "is_calibrated",
    "listing",
    "load_shipped",
    "recommended_files",
    "shipped_dir",
    "shipped_ids",
    "write_calibrated",
]


class NotShipped(IfsteerError):
    """No calibrated vector ships for this instruction and model."""


@dataclass(frozen=True)
class ShippedVector:
    """A calibrated vector file: the vectors of its chosen layers and how to apply them."""

    path: Path
    vectors: tuple[SteeringVector, ...]
    weights: tuple[float, ...]
    positions: str
    calibration: Calibration
    exclusion: ShippedVector | None = None
    """The paper's point a trained keyword file keeps for excluding the word (`excluding`)."""

    @property
    def instruction_id(self) -> str:
        return self.vectors[0].instruction_id

    @property
    def recommended(self) -> bool:
        return self.calibration.recommended

    @property
    def method(self) -> str:
        """How the vectors were made: "mean_difference" (the paper's) or "trained"."""
        return self.calibration.method

    @property
    def status(self) -> str:
        """`searched`, `verified`, `pending`, or `unverified`: no validation ran (a group's
        point, `points`; layers `ifsteer train` fitted jointly)."""
        return self.calibration.status

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(v.layer for v in self.vectors)

    def describe(self) -> dict[str, Any]:
        """Where and how the point steers, and how sure we are of it: what the CLI and the
        server show next to a steered answer."""
        described: dict[str, Any] = {
            "status": self.status,
            "recommended": self.recommended,
            "method": self.method,
            "point": self.calibration.point,
            "layers": list(self.layers),
            "mode": self.vectors[0].mode,
            "weights": list(self.weights),
            "positions": self.positions,
        }
        group = self.calibration.group
        if group:
            described["group_of"] = group.get("donor")
        if self.exclusion is not None:
            described["exclusion_layers"] = list(self.exclusion.layers)
        return described

    def steerings(self) -> list[Steering]:
        """What `steer` needs to follow the instruction."""
        return [
            Steering(v, mode=v.mode, weight=w, positions=self.positions)  # type: ignore[arg-type]
            for v, w in zip(self.vectors, self.weights, strict=True)
        ]

    def excluding(self) -> list[Steering]:
        """What excludes a forbidden word: the inclusion vectors with their weights negated
        (PAPER.md §2), the point the file keeps for exclusion where it has one."""
        kept = self.exclusion or self
        return [replace(s, weight=-s.effective_weight) for s in kept.steerings()]

    def kept_point(self) -> ShippedVector | None:
        """The paper's calibrated point a trained file keeps for exclusion (what a group lends
        an id with no file, `shipped.points`); None where it keeps none, or did not record
        which point it was."""
        if self.exclusion is None or not self.exclusion.calibration.point:
            return None
        return self.exclusion

    def rewrite(self, record: Mapping[str, Any]) -> Path:
        """The file again with a new record, its point and its exclusion point unchanged."""
        kept = () if self.exclusion is None else self.exclusion.steerings()
        return write_calibrated(self.path, self.steerings(), record, kept)


def shipped_dir(model_id: str = DEFAULT_MODEL) -> Path:
    return Path(str(resources.files("ifsteer") / "shipped" / model_id))


def file_name(instruction_id: str) -> str:
    return instruction_id.replace(":", "__").replace("/", "_") + ".safetensors"


def shipped_ids(model_id: str = DEFAULT_MODEL, directory: Path | None = None) -> list[str]:
    folder = directory or shipped_dir(model_id)
    if not folder.is_dir():
        return []
    return sorted(
        p.name[: -len(".safetensors")].replace("__", ":") for p in folder.glob("*.safetensors")
    )


def load_shipped(
    instruction_id: str, model_id: str = DEFAULT_MODEL, directory: Path | None = None
) -> ShippedVector:
    path = (directory or shipped_dir(model_id)) / file_name(instruction_id)
    if not path.is_file():
        raise NotShipped(
            f"no calibrated vector ships for {instruction_id!r} on {model_id!r}: "
            "`ifsteer vectors list` shows those that do, `ifsteer extract` makes one"
        )
    return read_calibrated(path)


def recommended_files(
    model_id: str = DEFAULT_MODEL, directory: Path | None = None
) -> dict[str, Path]:
    """The shipped files whose search found steering better than none, by instruction id.

    What an evaluation of the shipped vectors steers with: a file where no steering won
    holds its best steered point for inspection, not for use."""
    folder = directory or shipped_dir(model_id)
    if not folder.is_dir():
        raise NotShipped(
            f"no calibrated vectors ship for {model_id!r}: `ifsteer vectors list` shows the "
            "models that have them, `ifsteer vectors build` builds them for yours"
        )
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        shipped = read_calibrated(path)
        if shipped.recommended:
            files[shipped.instruction_id] = path
    return files


def read_calibrated(path: Path) -> ShippedVector:
    return calibrated(read_vector_file(path))


def is_calibrated(file: VectorFile) -> bool:
    """Whether a vector file records a calibrated point (`write_calibrated` wrote it)."""
    return bool(calibration_of(file))


def calibrated(file: VectorFile) -> ShippedVector:
    """A file read once, as its calibrated point: the one reader of calibration metadata, so
    generate, eval, the server and vLLM apply a point alike (layers, weights, positions)."""
    calibration = calibration_of(file)
    kept = calibration.exclusion
    exclusion = None
    if kept is not None:
        # The kept point is the paper's searched point, recorded beside the file's own; the
        # file stores one mode, so the kept point's is read from its record.
        record = {**kept, "status": "searched", "method": "mean_difference"}
        exclusion = _point(file, Calibration(record), "exclusion record", kept.get("mode"))
    return replace(_point(file, calibration, "calibration record"), exclusion=exclusion)


def applied(
    file: VectorFile, layer: int | None = None, plain: bool = False
) -> SteeringVector | ShippedVector:
    """What steering with a file applies, wherever a file is given by path (generate, eval,
    the server, the GGUF export): a calibrated file is its whole point, so a vector trained at
    three layers jointly steers at the three, as it was validated. Choosing a layer, or a mode
    or weight of one's own (`plain`), steers the one vector at that layer instead."""
    if layer is None and not plain and is_calibrated(file):
        return calibrated(file)
    return file.at(layer)


def file_steerings(
    path: str | Path,
    layer: int | None = None,
    mode: Mode | None = None,
    weight: float | None = None,
) -> list[Steering]:
    """A vector file given by path as `steer` takes it (`applied`); `mode` and `weight`
    override the file's own."""
    item = applied(read_vector_file(path), layer, plain=mode is not None or weight is not None)
    if isinstance(item, ShippedVector):
        return item.steerings()
    return [Steering(item, mode=mode, weight=weight)]


def _point(
    file: VectorFile, calibration: Calibration, what: str, mode: Mode | None = None
) -> ShippedVector:
    try:
        chosen = tuple(
            file.layers[layer].with_defaults(mode=mode, weight=calibration.weight(layer))
            for layer in calibration.layers or [file.default_layer]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedVectorFile(f"{file.path}: the {what} is incomplete ({exc})") from None
    return ShippedVector(
        path=file.path,
        vectors=chosen,
        weights=tuple(v.weight for v in chosen),
        positions=calibration.positions,
        calibration=calibration,
    )


def listing(model_id: str = DEFAULT_MODEL, directory: Path | None = None) -> list[dict[str, Any]]:
    """One row per shipped file: where it steers and how it did on validation."""
    rows = []
    folder = directory or shipped_dir(model_id)
    for instruction_id in shipped_ids(model_id, folder):
        shipped = read_calibrated(folder / file_name(instruction_id))
        validation = shipped.calibration.validation
        rows.append(
            {
                "instruction_id": instruction_id,
                "status": shipped.status,
                "recommended": shipped.recommended,
                "point": shipped.calibration.point,
                "method": shipped.method,
                "layers": list(shipped.layers),
                "score": validation.get("score"),
                "no_steering_score": validation.get("no_steering_score"),
                "n_prompts": validation.get("n_prompts"),
            }
        )
    return rows
