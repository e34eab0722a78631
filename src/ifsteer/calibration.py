"""Choosing where (layer) and how hard (weight) to steer, on validation prompts (docs/method.md).

A sweep answers a few validation prompts once per grid point: "no steering", then every layer
of `range(L//5, L, 2)` (and, for additive vectors, every weight). All points of all prompts go
through one batched `generate` call, each row steered at its own layer by per-row steering.
Each response is checked with IFEval's *loose* checkers and scored for fluency: a response
that repeats itself (more than half of its word trigrams seen before), or optionally that the
unsteered model finds implausibly predictable (perplexity < 2.5), is *degenerate*. A point's
score is the share of responses that pass without degenerating, and zero when most of them
degenerate. `choose` keeps "no steering" when nothing beats it, else the best point, lowest
layer (then smallest weight) on ties. The choice is written into the vector files, so it
travels with them; a sweep where no steering wins records `recommended: false` and keeps the
file's default layer.

Validation rows are the caller's (`ifsteer.rows.split_rows` sets some aside). Only rows every
one of whose instructions a vector steers can calibrate (`Row.fully_served`); `calibrate` runs
one group's sweep and records it, for the CLI and the paper pipeline alike. Figures of a sweep
are the report's (`ifsteer.report.plot_sweep`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ifsteer import quality
from ifsteer.checks import check_row
from ifsteer.errors import IfsteerError, InvalidSteering, VectorMismatch
from ifsteer.generation import Sampling, generate
from ifsteer.models import LoadedModel
from ifsteer.rows import Row, group_of
from ifsteer.rundir import file_stem, sweep_path, write_json
from ifsteer.steering import Steering
from ifsteer.vectors import (
    Mode,
    SteeringVector,
    VectorFile,
    default_layers,
    load_vector_directory,
    read_vector_file,
    update_defaults,
)

__all__ = [
    "Choice",
    "Fluency",
    "GridPoint",
    "SweepResult",
    "apply_choice",
    "calibrate",
    "choose",
    "group_vector_files",
    "load_sweep",
    "save_sweep",
    "score_point",
    "sweep",
    "sweep_filename",
    "sweep_layers",
    "sweep_weights",
    "validation_groups",
]

Progress = Callable[[int], None]
VectorSource = str | Path | Mapping[str, "str | Path | VectorFile"]
# A response whose trigrams repeat more than this, or whose perplexity under the unsteered
# model is below MIN_PERPLEXITY (when measured), is degenerate (ifsteer.quality).
MAX_REPETITION = 0.5
MIN_PERPLEXITY = 2.5
# A grid point where more than this share of responses degenerate scores zero.
MAX_DEGENERATE = 0.5
DEFAULT_SAMPLING = Sampling(max_new_tokens=128)


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fluency:
    """How a grid point's responses read: mean trigram repetition, median perplexity under the
    unsteered model (None when not measured), and the share of degenerate responses."""

    repetition: float
    perplexity: float | None
    degenerate: float


@dataclass(frozen=True)
class GridPoint:
    """One (layer, weight) of a sweep; layer None is "no steering", weight None the file's."""

    layer: int | None
    weight: float | None
    accuracy: float
    fluency: Fluency
    score: float
    n: int


@dataclass(frozen=True)
class Choice:
    layer: int | None
    weight: float | None
    score: float

    @property
    def recommended(self) -> bool:
        """Whether steering beat "no steering" on the validation prompts."""
        return self.layer is not None


@dataclass(frozen=True)
class SweepResult:
    """A sweep's grid, its choice, and what it was run on (saved as sweeps/<id>.json)."""

    instruction_id: str
    model: str
    with_instruction: bool
    mode: Mode
    grid: list[GridPoint]
    chosen: Choice
    rows: list[str] = field(default_factory=list)
    vector_ids: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    responses: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "instruction_id": self.instruction_id,
            "model": self.model,
            "with_instruction": self.with_instruction,
            "mode": self.mode,
            "grid": [asdict(p) for p in self.grid],
            "chosen": {**asdict(self.chosen), "recommended": self.chosen.recommended},
            "rows": list(self.rows),
            "vector_ids": list(self.vector_ids),
            "max_new_tokens": self.max_new_tokens,
            "rule": {
                "score": "loose pass and not degenerate; 0 when more than "
                f"{MAX_DEGENERATE:g} of the responses degenerate",
                "max_repetition": MAX_REPETITION,
                "min_perplexity": MIN_PERPLEXITY,
                "ties": "no steering if it scores at least as well, else lowest layer, "
                "then smallest |weight|",
            },
        }


def sweep_filename(instruction_id: str) -> str:
    """`sweeps/<id>.json` with ':' replaced by '__', so ids are valid file names everywhere."""
    return file_stem(instruction_id)


# --- selection (pure) -----------------------------------------------------------------------


def score_point(
    passed: Sequence[bool], degenerate: Sequence[bool], *, max_degenerate: float = MAX_DEGENERATE
) -> tuple[float, float]:
    """(accuracy, score) of one grid point's responses.

    Accuracy is the share that pass their checks. The score only counts passes that did not
    degenerate, and is zero when more than `max_degenerate` of the responses degenerate: a
    layer that breaks the model must not win by repeating the right word.
    """
    if len(passed) != len(degenerate):
        raise ValueError(f"{len(passed)} verdicts but {len(degenerate)} fluency flags")
    n = len(passed)
    if n == 0:
        return 0.0, 0.0
    accuracy = sum(map(bool, passed)) / n
    if sum(map(bool, degenerate)) / n > max_degenerate:
        return accuracy, 0.0
    return accuracy, sum(p and not d for p, d in zip(passed, degenerate, strict=True)) / n


def choose(grid: Sequence[GridPoint]) -> Choice:
    """The best point of a sweep.

    "No steering" (layer None) wins when its score is at least every steered point's: steering
    must earn its place. Otherwise the highest score wins, the lowest layer on ties, then the
    smallest |weight|. A grid without a "no steering" point picks among its layers.
    """
    if not grid:
        raise InvalidSteering("an empty sweep has nothing to choose from")
    baseline = [p for p in grid if p.layer is None]
    steered = [p for p in grid if p.layer is not None]
    if steered:
        best = min(
            steered,
            key=lambda p: (-round(p.score, 9), p.layer, abs(p.weight or 0.0)),
        )
        if not baseline or round(best.score, 9) > round(max(p.score for p in baseline), 9):
            return Choice(best.layer, best.weight, best.score)
    top = max(baseline, key=lambda p: p.score)
    return Choice(None, None, top.score)


def best_steered(grid: Sequence[GridPoint]) -> GridPoint | None:
    """The best steered point (what `choose` would pick if "no steering" were not allowed)."""
    steered = [p for p in grid if p.layer is not None]
    if not steered:
        return None
    return min(steered, key=lambda p: (-round(p.score, 9), p.layer, abs(p.weight or 0.0)))


# --- running a sweep ------------------------------------------------------------------------


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


# --- recording the choice -------------------------------------------------------------------


def group_vector_files(
    group: str, mapping: Mapping[str, str | Path | VectorFile]
) -> dict[str, Path]:
    """The files a group's choice applies to: the group's own id, or its per-value vectors
    (`language:response_language` → every `language:response_language:<code>` file)."""
    return {
        vector_id: _path(file)
        for vector_id, file in mapping.items()
        if vector_id == group or vector_id.startswith(group + ":")
    }


def _path(file: str | Path | VectorFile) -> Path:
    return file.path if isinstance(file, VectorFile) else Path(file)


def apply_choice(
    result: SweepResult,
    files: Sequence[str | Path | VectorFile] | Mapping[str, str | Path | VectorFile],
    *, set_default: bool = True,
) -> list[Path]:
    """Write a sweep's choice into vector files.

    A winning layer becomes the default layer (and a winning weight the default weight) unless
    `set_default` is False; either way `extra["sweep"]` (or `extra["sweep_with_instruction"]`
    for a sweep with the instruction in the prompt) records the choice, `recommended` and the
    best steered point. When "no steering" wins, the default layer stays as it was.
    """
    paths = [_path(f) for f in (files.values() if isinstance(files, Mapping) else files)]
    best = best_steered(result.grid)
    baseline = next((p for p in result.grid if p.layer is None), None)
    record = {
        "layer": result.chosen.layer,
        "weight": result.chosen.weight,
        "score": result.chosen.score,
        "recommended": result.chosen.recommended,
        "best_layer": None if best is None else best.layer,
        "best_weight": None if best is None else best.weight,
        "best_score": None if best is None else best.score,
        "no_steering_score": None if baseline is None else baseline.score,
        "with_instruction": result.with_instruction,
        "group": result.instruction_id,
        "n_prompts": len(result.rows),
        "max_new_tokens": result.max_new_tokens,
    }
    key = "sweep_with_instruction" if result.with_instruction else "sweep"
    write = set_default and result.chosen.recommended
    written = []
    for path in paths:
        written.append(
            update_defaults(
                path,
                layer=result.chosen.layer if write else None,
                weight=result.chosen.weight if write else None,
                extra={key: record},
            )
        )
    return written


def save_sweep(result: SweepResult, directory: str | Path) -> Path:
    """Write `<dir>/<id>.json` (grid and choice) and `<id>.responses.jsonl` (every validation
    answer, for a look at what each layer did). The JSON is written last: its presence means
    the sweep is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = sweep_filename(result.instruction_id)
    with (directory / f"{stem}.responses.jsonl").open("w", encoding="utf-8") as handle:
        for record in result.responses:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return write_json(sweep_path(directory, result.instruction_id), result.to_json())


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IfsteerError(f"{path}: not a readable sweep file ({exc})") from None
    if not isinstance(data, dict) or "grid" not in data or "chosen" not in data:
        raise IfsteerError(f"{path}: not a sweep file (no grid/chosen)")
    return data


def calibrate(
    lm: LoadedModel,
    files: Mapping[str, VectorFile],
    group: str,
    rows: Sequence[Row],
    sweeps_dir: str | Path,
    *,
    weights: Sequence[float] | None = None,
    set_default: bool = True,
    **options: Any,
) -> tuple[SweepResult, dict[str, Path], Path]:
    """One group's sweep, its choice written into the files it concerns and the sweep saved.

    A layer sweep, or a layer × weight grid when `weights` are given. The choice goes into the
    group's own files and into every file the sweep steered with (it was measured with them).
    Returns the result, the files updated and the sweep's JSON. Options as for `sweep`.
    """
    if weights:
        result = sweep_weights(lm, files, rows, weights=weights, instruction_id=group, **options)
    else:
        result = sweep_layers(lm, files, rows, instruction_id=group, **options)
    updated = {**group_vector_files(group, files), **{v: files[v].path for v in result.vector_ids}}
    apply_choice(result, updated, set_default=set_default)
    return result, updated, save_sweep(result, sweeps_dir)
