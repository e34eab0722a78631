"""Which steerings each row gets: the vectors that serve it, loaded once, with overrides.

Vectors are picked per row by `Row.needs` from a directory of vector files (or a mapping of
id to file or vector); rows of different instructions share a batch through per-row steering.
An instruction whose vector has no file runs unsteered, and is recorded as missing, so a
partial vector set still gives a full, honest table. A calibrated file (`write_calibrated`:
the shipped ones, or any in the directory) steers at its point, through
`ShippedVector.steerings`, as `generate` and the server steer with it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer.errors import EvaluationError, InvalidSteering
from ifsteer.models import LoadedModel
from ifsteer.rows import Row
from ifsteer.shipped import ShippedVector, applied
from ifsteer.steering import Steering
from ifsteer.vectors import (
    MODES,
    Mode,
    SteeringVector,
    VectorFile,
    load_vector_directory,
    read_vector_file,
)

__all__ = ["VectorPlan", "VectorSource", "plan_vectors"]

VectorSource = str | Path | Mapping[str, "str | Path | VectorFile | SteeringVector | ShippedVector"]


@dataclass(frozen=True)
class VectorPlan:
    """What steers each row: steerings by row key, their JSON records, ids without a file."""

    steerings: dict[str, list[Steering]]
    records: dict[str, list[dict[str, Any]]]
    missing: dict[str, list[str]]

    @property
    def missing_ids(self) -> tuple[str, ...]:
        return tuple(sorted({i for ids in self.missing.values() for i in ids}))


def _override(table: Mapping[str, Any], vector_id: str) -> Any:
    """Exact id first, then the first glob pattern (`keywords:*`) that matches it."""
    if vector_id in table:
        return table[vector_id]
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(vector_id, pattern):
            return value
    return None


def plan_vectors(
    lm: LoadedModel,
    rows: Sequence[Row],
    source: VectorSource | None,
    *,
    weights: Mapping[str, float],
    modes: Mapping[str, Mode],
    layers: Mapping[str, int],
    allow_transfer: bool,
) -> VectorPlan:
    """Each vector is read (or taken) once, checked against the model once, and shared by
    every row it serves."""
    available: Mapping[str, str | Path | VectorFile | SteeringVector | ShippedVector]
    if source is None:
        available = {}
    elif isinstance(source, str | Path):
        available = load_vector_directory(source)
    else:
        available = source
    loaded: dict[str, SteeringVector | ShippedVector] = {}
    made: dict[tuple[str, bool], list[tuple[Steering, dict[str, Any]]]] = {}
    plan = VectorPlan({}, {}, {})
    for row in rows:
        key = str(row.key)
        plan.steerings[key], plan.records[key], plan.missing[key] = [], [], []
        for need in row.needs():
            if need.problem is not None:
                raise EvaluationError(need.problem)
            if not need.vectors:
                plan.missing[key].append(need.instruction_id)  # no vector can serve it
            for vector_id, negate in need.vectors:
                if vector_id not in available:
                    plan.missing[key].append(vector_id)
                    continue
                if (vector_id, negate) not in made:
                    if vector_id not in loaded:
                        loaded[vector_id] = _load(
                            available[vector_id],
                            _override(layers, vector_id),
                            plain=_override(weights, vector_id) is not None
                            or _override(modes, vector_id) is not None,
                        )
                        for vector in _vectors(loaded[vector_id]):
                            vector.check_fits(
                                lm.model_id,
                                lm.hidden_size,
                                lm.n_layers,
                                allow_transfer=allow_transfer,
                            )
                    made[(vector_id, negate)] = _steerings(
                        loaded[vector_id], vector_id, negate, weights, modes
                    )
                for steering, record in made[(vector_id, negate)]:
                    plan.steerings[key].append(steering)
                    plan.records[key].append(record)
    return plan


def _vectors(item: SteeringVector | ShippedVector) -> tuple[SteeringVector, ...]:
    if isinstance(item, ShippedVector):
        return (*item.vectors, *(item.exclusion.vectors if item.exclusion else ()))
    return (item,)


def _load(
    item: str | Path | VectorFile | SteeringVector | ShippedVector, layer: int | None, plain: bool
) -> SteeringVector | ShippedVector:
    """A calibrated file (`write_calibrated`: the shipped ones, or any in --vectors) is its
    point, applied through `ShippedVector.steerings` as generate and the server apply it; an
    override of its layer, weight or mode steers it as a plain vector instead."""
    if isinstance(item, ShippedVector):
        if layer is None and not plain:
            return item
        item = read_vector_file(item.path)
    if isinstance(item, SteeringVector):
        if layer is not None and layer != item.layer:
            raise InvalidSteering(
                f"vector {item.instruction_id!r} is at layer {item.layer}; pass its file to "
                f"choose layer {layer}"
            )
        return item
    return applied(item if isinstance(item, VectorFile) else read_vector_file(item), layer, plain)


def _steerings(
    item: SteeringVector | ShippedVector,
    vector_id: str,
    negate: bool,
    weights: Mapping[str, float],
    modes: Mapping[str, Mode],
) -> list[tuple[Steering, dict[str, Any]]]:
    if isinstance(item, SteeringVector):
        return [_steering(item, vector_id, negate, weights, modes)]
    chosen = item.excluding() if negate else item.steerings()
    return [(s, _record(s, vector_id)) for s in chosen]


def _record(steering: Steering, vector_id: str) -> dict[str, Any]:
    record = {
        "instruction_id": vector_id,
        "layer": steering.vector.layer,
        "mode": steering.effective_mode,
        "weight": steering.effective_weight,
        "model": steering.vector.model_id,
    }
    if steering.positions != "all":  # absent for every record written before positions
        record["positions"] = steering.positions
    return record


def _steering(
    vector: SteeringVector,
    vector_id: str,
    negate: bool,
    weights: Mapping[str, float],
    modes: Mapping[str, Mode],
) -> tuple[Steering, dict[str, Any]]:
    mode = _override(modes, vector_id)
    if mode is not None and mode not in MODES:
        raise InvalidSteering(
            f"unknown mode {mode!r} for {vector_id!r}; choose projection or additive"
        )
    weight = _override(weights, vector_id)
    weight = vector.weight if weight is None else float(weight)
    steering = Steering(vector, mode=mode, weight=-weight if negate else weight)
    steering.validate()
    return steering, _record(steering, vector_id)
