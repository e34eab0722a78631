"""Running sweeps: every validation row at every (layer, weight) point, in one job queue.

All points of all prompts (of all the sweeps run together, `sweeps`) are jobs of one
continuous `Batcher`, each row steered at its own layer by per-row steering; a row
whose check has failed for good stops early (`deciders.row_failure`). Each response is
checked with IFEval's *loose* checkers and scored for fluency: a response that repeats itself
(more than half of its word trigrams seen before), or optionally that the unsteered model finds
implausibly predictable (perplexity < 2.5), is *degenerate*. Only rows every one of whose
instructions a vector steers can calibrate (`Row.fully_served`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ifsteer import quality
from ifsteer.batcher import Batcher
from ifsteer.calibration.answers import AnswerLog
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
from ifsteer.deciders import row_failure
from ifsteer.errors import IfsteerError, InvalidSteering, VectorMismatch
from ifsteer.jobs import Completion, Job, QueueFactory, Sampling
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
    "SweepRequest",
    "VectorSource",
    "layer_request",
    "sweep",
    "sweep_layers",
    "sweep_weights",
    "sweeps",
    "validation_groups",
    "weight_request",
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
    """One sweep to run: its rows, vectors and (layer, weight) points, and how it reads them.

    `instruction_id` names the sweep (default: the group of its first row); `mode` None is the
    vector files' own. Several requests run as one job queue (`sweeps`)."""

    vectors: VectorSource
    rows: Sequence[Row]
    points: Sequence[tuple[int | None, float | None]]
    instruction_id: str | None = None
    with_instruction: bool = False
    mode: Mode | None = None


@dataclass(frozen=True)
class _Planned:
    request: SweepRequest
    usable: list[tuple[Row, list[tuple[str, bool]]]]
    files: dict[str, Mapping[int, SteeringVector]]
    needed: list[str]
    jobs: list[tuple[int, int, str, list[Steering]]]  # (point, row, prompt, steerings)


def _plan(lm: LoadedModel, request: SweepRequest) -> _Planned:
    """Check a request against the model and its files, and list its generations."""
    if not request.points:
        raise InvalidSteering("a sweep needs at least one (layer, weight) point")
    mapping = _vector_files(request.vectors, request.rows)
    usable = [(row, row.served_vectors()) for row in request.rows if row.fully_served(mapping)]
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
    for layer, _ in request.points:
        if layer is not None and not all(layer in f for f in files.values()):
            raise VectorMismatch(
                f"layer {layer} is missing from a vector file; re-extract with that layer"
            )
    jobs: list[tuple[int, int, str, list[Steering]]] = []
    for p, (layer, weight) in enumerate(request.points):
        for r, (row, served) in enumerate(usable):
            text = row.prompt if request.with_instruction else row.prompt_without_instruction
            if text is None:
                raise IfsteerError(
                    f"{row.source}: row {row.key!r} has no prompt_without_instruction; "
                    "sweep it with --with-instruction"
                )
            steerings = []
            for vector_id, negate in served if layer is not None else ():
                vector = files[vector_id][layer]
                w = vector.weight if weight is None else float(weight)
                steerings.append(Steering(vector, mode=request.mode, weight=-w if negate else w))
            jobs.append((p, r, text, steerings))
    return _Planned(request, usable, files, needed, jobs)


def sweeps(
    lm: LoadedModel,
    requests: Sequence[SweepRequest],
    *,
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int | None = None,
    perplexity: bool = False,
    max_degenerate: float = MAX_DEGENERATE,
    early_stop: bool = True,
    progress: Progress | None = None,
    engine: QueueFactory = Batcher,
    answers: str | Path | None = None,
) -> list[SweepResult]:
    """Run several sweeps as one continuous-batching job queue and score each.

    Every row of every request at every point is one job, steered by the vectors that serve
    its instructions (`vector_id_for`); a forbidden word's inclusion vector gets the negated
    weight, as in evaluation. With `early_stop`, a row stops as soon as its loose check has
    failed for good (`deciders.row_failure`): a failed answer scores nothing whatever its
    fluency (`score_point`), so stopping it changes no score; passes are always generated to
    the end, since their fluency decides whether they count. `engine` makes the job queue
    (`Batcher`, or `OfflineVLLM.queue` for vLLM), as in `run_evaluation`. With `answers`, a
    JSONL file (`AnswerLog`), every answer is written there as it finishes and answers already
    there are not generated again, so a killed run resumes where it stopped.
    """
    planned = [_plan(lm, request) for request in requests]
    # Characters bound a prompt's tokens from above: enough to size the KV cache.
    longest = max((len(text) for plan in planned for _, _, text, _ in plan.jobs), default=0)
    queue = engine(
        lm,
        batch_size=batch_size,
        max_tokens=longest + sampling.max_new_tokens,
        allow_transfer=False,
    )
    log = AnswerLog(answers) if answers is not None else None
    slots: list[list[int | Completion]] = []  # per plan: a job id, or an answer from the log
    for plan in planned:
        decide = [
            row_failure(row.instruction_id_list, row.kwargs or ()) if early_stop else None
            for row, _ in plan.usable
        ]
        slots.append([])
        for p, r, text, steerings in plan.jobs:
            job = Job(lm.render(text).ids, steering=steerings, sampling=sampling, decided=decide[r])
            if log is None:
                slots[-1].append(queue.submit(job))
                continue
            key = AnswerLog.key(
                plan.request.instruction_id or group_of(plan.usable[r][0]),
                plan.request.with_instruction,
                plan.request.mode,
                plan.request.points[p],
                plan.usable[r][0].key,
                text,
                sampling,
                early_stop,
            )
            known = log.get(key)
            slots[-1].append(
                known
                if known is not None
                else queue.submit(replace(job, on_done=log.recorder(key)))
            )
    reused = sum(isinstance(slot, Completion) for plan_slots in slots for slot in plan_slots)
    if progress is not None and reused:
        progress(reused)
    done = queue.run(progress)
    return [
        _score(
            lm,
            plan,
            [slot if isinstance(slot, Completion) else done[slot] for slot in plan_slots],
            sampling,
            perplexity,
            max_degenerate,
        )
        for plan, plan_slots in zip(planned, slots, strict=True)
    ]


def sweep(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    points: Sequence[tuple[int | None, float | None]],
    *,
    instruction_id: str | None = None,
    with_instruction: bool = False,
    mode: Mode | None = None,
    **options: Any,
) -> SweepResult:
    """Answer every row at every (layer, weight) point in one job queue, and score it.

    Rows without a vector are left out. Options as for `sweeps`."""
    request = SweepRequest(vectors, rows, points, instruction_id, with_instruction, mode)
    return sweeps(lm, [request], **options)[0]


def _score(
    lm: LoadedModel,
    plan: _Planned,
    completions: Sequence[Completion],
    sampling: Sampling,
    perplexity: bool,
    max_degenerate: float,
) -> SweepResult:
    request, usable = plan.request, plan.usable
    texts = [c.text for c in completions]
    # A decided answer is a failure cut short: its fluency is neither measured nor needed.
    full = [i for i, c in enumerate(completions) if c.finish_reason != "decided"]
    ppl: list[float | None] = [None] * len(texts)
    if perplexity and full:
        measured = quality.perplexities(
            lm, [plan.jobs[i][2] for i in full], [texts[i] for i in full]
        )
        for i, x in zip(full, measured, strict=True):
            ppl[i] = None if math.isnan(x) else x
    records: list[dict[str, Any]] = []
    for (p, r, _, _), completion, x in zip(plan.jobs, completions, ppl, strict=True):
        row, text = usable[r][0], completion.text
        results = check_row(row.instruction_id_list, row.kwargs or (), row.prompt, text)
        records.append(
            {
                "layer": request.points[p][0],
                "weight": request.points[p][1],
                "key": row.key,
                "response": text,
                "loose": [c.loose for c in results],
                "decided": completion.finish_reason == "decided",
                "repetition": quality.repetition_rate(text),
                "perplexity": x,
                "degenerate": quality.is_degenerate(
                    text, x, max_repetition=MAX_REPETITION, min_perplexity=MIN_PERPLEXITY
                ),
            }
        )
    points = request.points
    by_point: list[list[dict[str, Any]]] = [[] for _ in points]
    for (p, *_), record in zip(plan.jobs, records, strict=True):
        by_point[p].append(record)
    grid = [_grid_point(points[p], by_point[p], max_degenerate) for p in range(len(points))]
    first = next(iter(plan.files[plan.needed[0]].values()))
    return SweepResult(
        instruction_id=request.instruction_id or group_of(usable[0][0]),
        model=lm.model_id,
        with_instruction=request.with_instruction,
        mode=request.mode or first.mode,
        grid=grid,
        chosen=choose(grid),
        rows=[str(row.key) for row, _ in usable],
        vector_ids=plan.needed,
        max_new_tokens=sampling.max_new_tokens,
        responses=records,
    )


def _grid_point(
    point: tuple[int | None, float | None], records: Sequence[dict[str, Any]], max_degenerate: float
) -> GridPoint:
    passed = [all(r["loose"]) for r in records]
    degenerate = [bool(r["degenerate"]) for r in records]
    accuracy, score = score_point(passed, degenerate, max_degenerate=max_degenerate)
    # Fluency as read on the answers generated to the end (a decided failure is cut short).
    full = [r for r in records if not r.get("decided")] or list(records)
    measured = [r["perplexity"] for r in full if r["perplexity"] is not None]
    fluency = Fluency(
        repetition=statistics.fmean(r["repetition"] for r in full) if full else 0.0,
        perplexity=statistics.median(measured) if measured else None,
        degenerate=sum(bool(r["degenerate"]) for r in full) / len(full) if full else 0.0,
    )
    return GridPoint(point[0], point[1], accuracy, fluency, score, len(records))


_REQUEST_OPTIONS = ("instruction_id", "with_instruction", "mode")


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
    mapping = _vector_files(vectors, rows)
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
    points: list[tuple[int | None, float | None]] = [(None, None)] + [(la, None) for la in grid]
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
    points: list[tuple[int | None, float | None]] = [(None, None)]
    points += [(la, float(w)) for la in grid for w in weights]
    options.setdefault("mode", "additive")
    return SweepRequest(mapping, rows, points, **options)


def _split(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options of the request (what is swept) apart from options of the run (how)."""
    request = {k: v for k, v in options.items() if k in _REQUEST_OPTIONS}
    return request, {k: v for k, v in options.items() if k not in _REQUEST_OPTIONS}


def sweep_layers(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepResult:
    """One layer sweep (`layer_request`), run. Options as for `sweep`."""
    request, run = _split(options)
    made = layer_request(lm, vectors, rows, layers=layers, n_prompts=n_prompts, **request)
    return sweeps(lm, [made], **run)[0]


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
    """One layer × weight sweep (`weight_request`), run. Options as for `sweep`."""
    request, run = _split(options)
    made = weight_request(
        lm, vectors, rows, weights=weights, layers=layers, n_prompts=n_prompts, **request
    )
    return sweeps(lm, [made], **run)[0]


def _serving(
    mapping: Mapping[str, VectorFile], rows: Sequence[Row]
) -> dict[str, Mapping[int, SteeringVector]]:
    """The layers of the files some row uses (of every file, when no row uses one)."""
    used = {v for row in rows for v in row.vector_ids()}
    files = {v: f.layers for v, f in mapping.items() if v in used}
    return files or {v: f.layers for v, f in mapping.items()}
