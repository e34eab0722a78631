"""Running sweeps: every validation row at every point (a layer and a weight), in one job queue.

All points of all prompts (of all the sweeps run together, `sweeps`) are jobs of one
continuous `Batcher`, each row steered at its own layer by per-row steering; a row
whose check has failed for good stops early (`deciders.row_failure`). Each response is
checked with IFEval's *loose* checkers and scored for fluency by the paper's rule
(`quality.PAPER_FLUENCY`): a response that repeats itself (more than half of its word trigrams
seen before), or optionally that the unsteered model finds implausibly predictable
(perplexity < 2.5), is *degenerate*. Only rows every one of whose
instructions a vector steers can calibrate (`Row.fully_served`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer import quality
from ifsteer.batcher import Batcher
from ifsteer.calibration.answers import AnswerLog
from ifsteer.calibration.grid import PointResult, SweepResult, choose, score_point
from ifsteer.calibration.point import Point, steerings_for
from ifsteer.calibration.requests import (
    SweepRequest,
    VectorSource,
    layer_request,
    vector_files,
    weight_request,
)
from ifsteer.calibration.runner import answer_jobs
from ifsteer.checks import check_row
from ifsteer.deciders import row_failure
from ifsteer.errors import IfsteerError, InvalidSteering, VectorMismatch
from ifsteer.jobs import Completion, Job, QueueFactory, Sampling
from ifsteer.models import LoadedModel
from ifsteer.quality import PAPER_FLUENCY, Fluency
from ifsteer.rows import Row, group_of
from ifsteer.steering import Steering
from ifsteer.vectors import (
    Mode,
    SteeringVector,
)

__all__ = [
    "DEFAULT_SAMPLING",
    "sweep",
    "sweep_layers",
    "sweep_weights",
    "sweeps",
]

Progress = Callable[[int], None]
DEFAULT_SAMPLING = Sampling(max_new_tokens=128)


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
    odd = [
        p.key
        for p in request.points
        if p.steered and (len(p.layers) != 1 or p.weight is None or p.mode != request.mode)
    ]
    if odd:
        raise InvalidSteering(
            f"a sweep's points are one layer at a weight in its mode ({request.mode}), "
            f"made by Point.swept; not {', '.join(odd)}"
        )
    mapping = vector_files(request.vectors, request.rows)
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
    for layer in sorted({layer for point in request.points for layer in point.layers}):
        if not all(layer in f for f in files.values()):
            raise VectorMismatch(
                f"layer {layer} is missing from a vector file; re-extract with that layer"
            )
    jobs: list[tuple[int, int, str, list[Steering]]] = []
    for p, point in enumerate(request.points):
        for r, (row, served) in enumerate(usable):
            text = row.prompt if request.with_instruction else row.prompt_without_instruction
            if text is None:
                raise IfsteerError(
                    f"{row.source}: row {row.key!r} has no prompt_without_instruction; "
                    "sweep it with --with-instruction"
                )
            steerings = [
                s
                for vector_id, negate in served
                for s in steerings_for(point, files[vector_id], negate=negate)
            ]
            jobs.append((p, r, text, steerings))
    return _Planned(request, usable, files, needed, jobs)


def sweeps(
    lm: LoadedModel,
    requests: Sequence[SweepRequest],
    *,
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int | None = None,
    perplexity: bool = False,
    fluency: Fluency = PAPER_FLUENCY,
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
    jobs: list[Job] = []
    keys: list[str] = []
    for plan in planned:
        decide = [
            row_failure(row.instruction_id_list, row.kwargs or ()) if early_stop else None
            for row, _ in plan.usable
        ]
        for p, r, text, steerings in plan.jobs:
            jobs.append(
                Job(lm.render(text).ids, steering=steerings, sampling=sampling, decided=decide[r])
            )
            keys.append(
                AnswerLog.key(
                    plan.request.instruction_id or group_of(plan.usable[r][0]),
                    plan.request.with_instruction,
                    plan.request.mode,
                    plan.request.points[p].coordinates,
                    plan.usable[r][0].key,
                    text,
                    sampling,
                    early_stop,
                )
            )
    log = AnswerLog(answers) if answers is not None else None
    completions = answer_jobs(
        lm, jobs, engine=engine, batch_size=batch_size, log=log, keys=keys, progress=progress
    )
    starts = [0]
    for plan in planned:
        starts.append(starts[-1] + len(plan.jobs))
    return [
        _score(lm, plan, completions[start:end], sampling, perplexity, fluency)
        for plan, start, end in zip(planned, starts[:-1], starts[1:], strict=True)
    ]


def sweep(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    points: Sequence[Point | tuple[int | None, float | None]],
    *,
    instruction_id: str | None = None,
    with_instruction: bool = False,
    mode: Mode | None = None,
    **options: Any,
) -> SweepResult:
    """Answer every row at every point in one job queue, and score it.

    A point is a `Point.swept` or its (layer, weight): layer None is "no steering", weight None
    each file's own. Rows without a vector are left out. Options as for `sweeps`."""
    swept = [p if isinstance(p, Point) else Point.swept(*p, mode) for p in points]
    request = SweepRequest(vectors, rows, swept, instruction_id, with_instruction, mode)
    return sweeps(lm, [request], **options)[0]


def _score(
    lm: LoadedModel,
    plan: _Planned,
    completions: Sequence[Completion],
    sampling: Sampling,
    perplexity: bool,
    fluency: Fluency,
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
        layer, weight = request.points[p].coordinates
        records.append(
            {
                "layer": layer,
                "weight": weight,
                "key": row.key,
                "response": text,
                "loose": [c.loose for c in results],
                "decided": completion.finish_reason == "decided",
                "repetition": quality.repetition_rate(text),
                "perplexity": x,
                "degenerate": fluency.degenerate(text, x),
            }
        )
    points = request.points
    by_point: list[list[dict[str, Any]]] = [[] for _ in points]
    for (p, *_), record in zip(plan.jobs, records, strict=True):
        by_point[p].append(record)
    grid = [_grid_point(points[p], by_point[p], fluency) for p in range(len(points))]
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
        fluency=fluency,
    )


def _grid_point(point: Point, records: Sequence[dict[str, Any]], fluency: Fluency) -> PointResult:
    passed = [all(r["loose"]) for r in records]
    degenerate = [bool(r["degenerate"]) for r in records]
    accuracy, score = score_point(passed, degenerate, max_degenerate=fluency.max_degenerate)
    # Fluency as read on the answers generated to the end (a decided failure is cut short).
    full = [r for r in records if not r.get("decided")] or list(records)
    measured = [r["perplexity"] for r in full if r["perplexity"] is not None]
    return PointResult(
        point,
        accuracy,
        score,
        degenerate=sum(bool(r["degenerate"]) for r in full) / len(full) if full else 0.0,
        repetition=statistics.fmean(r["repetition"] for r in full) if full else 0.0,
        perplexity=statistics.median(measured) if measured else None,
        n=len(records),
    )


_REQUEST_OPTIONS = ("instruction_id", "with_instruction", "mode")


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
