"""What a sweep runs: its rows, its vector files and its points (`Point.swept`: a layer and a
weight).

A request is plain data (`SweepRequest`); `layer_request` and `weight_request` build the
paper's grids from the layers the vector files hold, and `validation_groups` picks each
group's rows. `sweep.sweeps` runs requests.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer.calibration.point import Point
from ifsteer.errors import InvalidSteering, VectorMismatch
from ifsteer.models import LoadedModel
from ifsteer.rows import Row, group_of
from ifsteer.vectors import (
    Mode,
    SteeringVector,
    VectorFile,
    default_layers,
    load_vector_directory,
    read_vector_file,
)

__all__ = [
    "SweepRequest",
    "VectorSource",
    "layer_request",
    "validation_groups",
    "vector_files",
    "weight_request",
]

VectorSource = str | Path | Mapping[str, "str | Path | VectorFile"]


def vector_files(vectors: VectorSource, rows: Sequence[Row]) -> dict[str, VectorFile]:
    """Vector files by id: a directory, a mapping, or one file that serves every row."""
    if isinstance(vectors, Mapping):
        return {
            k: v if isinstance(v, VectorFile) else read_vector_file(v) for k, v in vectors.items()
        }
    path = Path(vectors)
    if path.is_dir():
        return load_vector_directory(path)
    file = read_vector_file(path)
    mapping = {file.instruction_id: file}
    for row in rows:  # a single file serves every row, whatever id the row asks for
        for vector_id in row.vector_ids():
            mapping.setdefault(vector_id, file)
    return mapping


def validation_groups(
    rows: Sequence[Row],
    available: Collection[str],
    n_prompts: int,
    instruction_id: str | None = None,
) -> dict[str, list[Row]]:
    """The first `n_prompts` rows of each sweep group that the `available` vectors fully serve
    (only `instruction_id`'s group when given)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if not row.fully_served(available):
            continue
        members = groups.setdefault(group_of(row), [])
        if len(members) < n_prompts:
            members.append(row)
    if instruction_id is not None:
        groups = {g: members for g, members in groups.items() if g == instruction_id}
    return groups


def _layers_for(
    files: Mapping[str, Mapping[int, SteeringVector]], layers: Sequence[int] | None, n_layers: int
) -> list[int]:
    common = set.intersection(*(set(v) for v in files.values()))
    if layers is not None:
        missing = sorted(set(layers) - common)
        if missing:
            raise VectorMismatch(
                f"the vector files lack layers {missing} (they share {sorted(common)}); "
                "re-extract with those layers (ifsteer extract --layers)"
            )
        return sorted(set(layers))
    grid = [layer for layer in default_layers(n_layers) if layer in common]
    return grid or sorted(common)


@dataclass(frozen=True)
class SweepRequest:
    """One sweep to run: its rows, vectors and points, and how it reads them.

    Its points are the paper's (`Point.swept`: "no steering", or one layer at a weight) in its
    `mode`. `instruction_id` names the sweep (default: the group of its first row); `mode` None
    is the vector files' own. Several requests run as one job queue (`sweeps`)."""

    vectors: VectorSource
    rows: Sequence[Row]
    points: Sequence[Point]
    instruction_id: str | None = None
    with_instruction: bool = False
    mode: Mode | None = None


def _swept(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    layers: Sequence[int] | None,
    n_prompts: int | None,
) -> tuple[dict[str, VectorFile], list[Row], list[int]]:
    """What a layer or weight request sweeps: its vector files, its first `n_prompts` rows and
    the layers those files hold (or `layers`)."""
    rows = list(rows)[:n_prompts] if n_prompts is not None else list(rows)
    mapping = vector_files(vectors, rows)
    return mapping, rows, _layers_for(_serving(mapping, rows), layers, lm.n_layers)


def layer_request(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepRequest:
    """The paper's layer sweep as a request: "no steering" plus every layer of
    `range(L//5, L, 2)` held by the vector files (or `layers`), at the files' default weight,
    on the first `n_prompts` rows."""
    mapping, rows, grid = _swept(lm, vectors, rows, layers, n_prompts)
    mode = options.get("mode")
    points = [Point(), *(Point.swept(layer, None, mode) for layer in grid)]
    return SweepRequest(mapping, rows, points, **options)


def weight_request(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    weights: Sequence[float],
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepRequest:
    """Layer × weight grid for additive vectors (length, keywords), plus "no steering".

    Weights are magnitudes as stored in the file (a forbidden word gets −w automatically);
    the mode is additive unless `mode` says otherwise."""
    if not weights:
        raise InvalidSteering("give at least one weight for a weight grid")
    mapping, rows, grid = _swept(lm, vectors, rows, layers, n_prompts)
    options.setdefault("mode", "additive")
    mode = options["mode"]
    points = [Point()] + [Point.swept(la, float(w), mode) for la in grid for w in weights]
    return SweepRequest(mapping, rows, points, **options)


def _serving(
    mapping: Mapping[str, VectorFile], rows: Sequence[Row]
) -> dict[str, Mapping[int, SteeringVector]]:
    """The layers of the files some row uses (of every file, when no row uses one)."""
    used = {v for row in rows for v in row.vector_ids()}
    files = {v: f.layers for v, f in mapping.items() if v in used}
    return files or {v: f.layers for v, f in mapping.items()}
