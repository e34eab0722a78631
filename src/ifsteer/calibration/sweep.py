"""Running a sweep: every validation row at every (layer, weight) point, in one batched pass.

All points of all prompts go through one `generate` call, each row steered at its own layer by
per-row steering. Each response is checked with IFEval's *loose* checkers and scored for
fluency: a response that repeats itself (more than half of its word trigrams seen before), or
optionally that the unsteered model finds implausibly predictable (perplexity < 2.5), is
*degenerate*. Only rows every one of whose instructions a vector steers can calibrate
(`Row.fully_served`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ifsteer import quality
from ifsteer.calibration.grid import (
    MAX_DEGENERATE,
    MAX_REPETITION,
    MIN_PERPLEXITY,
    Fluency,
    GridPoint,
    SweepResult,
    choose,
    score_point,
)
from ifsteer.checks import check_row
from ifsteer.errors import IfsteerError, InvalidSteering, VectorMismatch
from ifsteer.generation import Sampling, generate
from ifsteer.models import LoadedModel
from ifsteer.rows import Row, group_of
from ifsteer.steering import Steering
from ifsteer.vectors import (
    Mode,
    SteeringVector,
    VectorFile,
    default_layers,
    load_vector_directory,
    read_vector_file,
)

__all__ = [
    "DEFAULT_SAMPLING",
    "VectorSource",
    "sweep",
    "sweep_layers",
    "sweep_weights",
    "validation_groups",
]

Progress = Callable[[int], None]
VectorSource = str | Path | Mapping[str, "str | Path | VectorFile"]
DEFAULT_SAMPLING = Sampling(max_new_tokens=128)


def _vector_files(vectors: VectorSource, rows: Sequence[Row]) -> dict[str, VectorFile]:
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
    rows: Sequence[Row], available: Collection[str], n_prompts: int,
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


def sweep(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    points: Sequence[tuple[int | None, float | None]],
    *,
    instruction_id: str | None = None,
    with_instruction: bool = False,
    mode: Mode | None = None,
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int = 8,
    perplexity: bool = False,
    max_degenerate: float = MAX_DEGENERATE,
    progress: Progress | None = None,
) -> SweepResult:
    """Answer every row at every (layer, weight) point in one batched pass, and score it.

    Each row is steered by the vectors that serve its instructions (`vector_id_for`), so rows
    of different languages or keywords share one sweep; a forbidden word's inclusion vector
    gets the negated weight, as in evaluation. Rows without a vector are left out.
    """
    if not points:
        raise InvalidSteering("a sweep needs at least one (layer, weight) point")
    mapping = _vector_files(vectors, rows)
    usable = [(row, row.served_vectors()) for row in rows if row.fully_served(mapping)]
    if not usable:
        raise IfsteerError(
            "no validation row has a vector file for its instruction; extract the vectors first "
            f"(have: {', '.join(sorted(mapping)) or 'none'})"
        )
    needed = sorted({v for _, served in usable for v, _ in served})
    files = {v: mapping[v].layers for v in needed}
    for loaded in files.values():
        any_vector = next(iter(loaded.values()))
        any_vector.check_fits(lm.model_id, lm.hidden_size, lm.n_layers)
    for layer, _ in points:
        if layer is not None and not all(layer in f for f in files.values()):
            raise VectorMismatch(
                f"layer {layer} is missing from a vector file; re-extract with that layer"
            )

    prompts: list[str] = []
    per_row: list[list[Steering]] = []
    index: list[tuple[int, int]] = []  # (point, row) of each generation
    for p, (layer, weight) in enumerate(points):
        for r, (row, served) in enumerate(usable):
            text = row.prompt if with_instruction else row.prompt_without_instruction
            if text is None:
                raise IfsteerError(
                    f"{row.source}: row {row.key!r} has no prompt_without_instruction; "
                    "sweep it with --with-instruction"
                )
            prompts.append(text)
            index.append((p, r))
            if layer is None:
                per_row.append([])
                continue
            steerings = []
            for vector_id, negate in served:
                vector = files[vector_id][layer]
                w = vector.weight if weight is None else float(weight)
                steerings.append(Steering(vector, mode=mode, weight=-w if negate else w))
            per_row.append(steerings)
    completions = generate(
        lm, prompts, per_row=per_row, sampling=sampling, batch_size=batch_size,
        progress=progress,
    )
    texts = [c.text for c in completions]
    ppl: list[float | None] = [None] * len(texts)
    if perplexity:
        ppl = [
            None if math.isnan(x) else x
            for x in quality.perplexities(lm, prompts, texts, batch_size=batch_size)
        ]
    records: list[dict[str, Any]] = []
    for (p, r), text, x in zip(index, texts, ppl, strict=True):
        row = usable[r][0]
        results = check_row(row.instruction_id_list, row.kwargs or (), row.prompt, text)
        records.append(
            {
                "layer": points[p][0],
                "weight": points[p][1],
                "key": row.key,
                "response": text,
                "loose": [c.loose for c in results],
                "repetition": quality.repetition_rate(text),
                "perplexity": x,
                "degenerate": quality.is_degenerate(
                    text, x, max_repetition=MAX_REPETITION, min_perplexity=MIN_PERPLEXITY
                ),
            }
        )
    grid = [_grid_point(points[p], [records[i] for i, (q, _) in enumerate(index) if q == p],
                        max_degenerate) for p in range(len(points))]
    first = next(iter(files[needed[0]].values()))
    return SweepResult(
        instruction_id=instruction_id or group_of(usable[0][0]),
        model=lm.model_id,
        with_instruction=with_instruction,
        mode=mode or first.mode,
        grid=grid,
        chosen=choose(grid),
        rows=[str(row.key) for row, _ in usable],
        vector_ids=needed,
        max_new_tokens=sampling.max_new_tokens,
        responses=records,
    )


def _grid_point(
    point: tuple[int | None, float | None], records: Sequence[dict[str, Any]], max_degenerate: float
) -> GridPoint:
    passed = [all(r["loose"]) for r in records]
    degenerate = [bool(r["degenerate"]) for r in records]
    accuracy, score = score_point(passed, degenerate, max_degenerate=max_degenerate)
    measured = [r["perplexity"] for r in records if r["perplexity"] is not None]
    fluency = Fluency(
        repetition=statistics.fmean(r["repetition"] for r in records) if records else 0.0,
        perplexity=statistics.median(measured) if measured else None,
        degenerate=sum(degenerate) / len(degenerate) if degenerate else 0.0,
    )
    return GridPoint(point[0], point[1], accuracy, fluency, score, len(records))


def sweep_layers(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepResult:
    """The paper's layer sweep: "no steering" plus every layer of `range(L//5, L, 2)` held by
    the vector files (or `layers`), at the files' default weight, on the first `n_prompts`
    rows. Options as for `sweep`."""
    rows = list(rows)[:n_prompts] if n_prompts is not None else list(rows)
    mapping = _vector_files(vectors, rows)
    grid = _layers_for(_serving(mapping, rows), layers, lm.n_layers)
    points: list[tuple[int | None, float | None]] = [(None, None)] + [(la, None) for la in grid]
    return sweep(lm, mapping, rows, points, **options)


def sweep_weights(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    weights: Sequence[float],
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepResult:
    """Layer × weight grid for additive vectors (length, keywords), plus "no steering".

    Weights are magnitudes as stored in the file (a forbidden word gets −w automatically);
    the mode is additive unless `mode` says otherwise. Options as for `sweep`.
    """
    if not weights:
        raise InvalidSteering("give at least one weight for a weight grid")
    rows = list(rows)[:n_prompts] if n_prompts is not None else list(rows)
    mapping = _vector_files(vectors, rows)
    grid = _layers_for(_serving(mapping, rows), layers, lm.n_layers)
    points: list[tuple[int | None, float | None]] = [(None, None)]
    points += [(la, float(w)) for la in grid for w in weights]
    options.setdefault("mode", "additive")
    return sweep(lm, mapping, rows, points, **options)


def _serving(
    mapping: Mapping[str, VectorFile], rows: Sequence[Row]
) -> dict[str, Mapping[int, SteeringVector]]:
    """The layers of the files some row uses (of every file, when no row uses one)."""
    used = {v for row in rows for v in row.vector_ids()}
    files = {v: f.layers for v, f in mapping.items() if v in used}
    return files or {v: f.layers for v, f in mapping.items()}

