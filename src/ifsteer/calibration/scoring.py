"""How the staged search steers a point and scores its answers (`calibration.search`).

A point becomes steerings through `point.steerings_for`, as the sweep's do. Its answers are
made on the runner the paper's sweep uses too (`runner.answer_jobs`), checked with
IFEval's loose checker, judged for perplexity by another model when one is given, and logged
(`search_log`) before they are scored, so a rerun with other fluency thresholds makes none
again. An answer counts against a point only where steering *broke* it (`quality.Fluency`
judges each answer): degenerate where the unsteered answer to the same prompt is not, or both
loop and the steered one loops harder (its tail compresses further).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer.batcher import Batcher
from ifsteer.calibration.answers import AnswerLog, search_key
from ifsteer.calibration.grid import PointResult, score_point
from ifsteer.calibration.point import Point, steerings_for
from ifsteer.calibration.runner import answer_jobs
from ifsteer.checks import check
from ifsteer.deciders import row_failure
from ifsteer.errors import InvalidSteering
from ifsteer.jobs import Decider, Job, QueueFactory, Sampling
from ifsteer.models import LoadedModel
from ifsteer.quality import Fluency, perplexities, repetition_rate, tail_compression
from ifsteer.validation import ValidationPrompt
from ifsteer.vectors import SteeringVector

__all__ = [
    "Answering",
    "PromptVectors",
    "SearchRunner",
    "search_log",
    "summarize",
]

# Vectors per validation prompt: {layer: vector}. One instruction repeats one mapping; the
# keyword class gives each prompt the vector of its own word.
PromptVectors = Sequence[Mapping[int, SteeringVector]]
Progress = Callable[[int], None]


def search_log(path: str | Path | None) -> AnswerLog:
    """A search's scored responses, keyed by (point, prompt index)."""
    return AnswerLog(path, key=search_key)


def _degenerate(record: dict[str, Any], fluency: Fluency) -> bool:
    return fluency.degenerate(record["response"], record["perplexity"])


def _broken(record: dict[str, Any], baseline: dict[str, Any], fluency: Fluency) -> bool:
    """Degenerate where the unsteered answer is not, or loops harder than it does."""
    if not _degenerate(record, fluency):
        return False
    if not _degenerate(baseline, fluency):
        return True
    return tail_compression(record["response"]) < tail_compression(baseline["response"])


def summarize(
    point: Point,
    records: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]],
    fluency: Fluency,
) -> PointResult:
    """`baseline[i]` is the unsteered answer to the prompt of `records[i]`."""
    degenerate = [_broken(r, b, fluency) for r, b in zip(records, baseline, strict=True)]
    passed = [bool(r["passed"]) for r in records]
    accuracy, score = score_point(passed, degenerate, max_degenerate=fluency.max_degenerate)
    finite = [r["perplexity"] for r in records if math.isfinite(r["perplexity"])]
    return PointResult(
        point=point,
        accuracy=accuracy,
        score=score,
        degenerate=sum(degenerate) / len(records),
        repetition=statistics.fmean(r["repetition"] for r in records),
        perplexity=statistics.median(finite) if finite else None,
        n=len(records),
        newly_broken=sum(
            _degenerate(r, fluency) and not _degenerate(b, fluency)
            for r, b in zip(records, baseline, strict=True)
        )
        / len(records),
    )


@dataclass(frozen=True)
class Answering:
    """How a search makes its answers (`run_search`'s options of the same names)."""

    engine: QueueFactory = Batcher
    batch_size: int | None = 32
    early_stop: bool = False
    progress: Progress | None = None


class SearchRunner:
    """Answers, checks and judges the responses of a batch of points, skipping logged ones."""

    def __init__(
        self,
        lm: LoadedModel,
        judge: LoadedModel | None,
        prompts: Sequence[ValidationPrompt],
        vectors: PromptVectors,
        log: AnswerLog,
        sampling: Sampling,
        with_instruction: bool,
        answering: Answering,
    ) -> None:
        if len(vectors) != len(prompts):
            raise InvalidSteering(f"{len(vectors)} vector maps for {len(prompts)} prompts")
        self.lm, self.judge, self.prompts, self.vectors = lm, judge, prompts, vectors
        self.log, self.sampling, self.with_instruction = log, sampling, with_instruction
        self.options = answering

    def text(self, i: int) -> str:
        p = self.prompts[i]
        return p.with_instruction if self.with_instruction else p.query

    def run(self, points: Sequence[Point]) -> None:
        todo = [
            (point, i)
            for point in points
            for i in range(len(self.prompts))
            if (point.key, i) not in self.log.records
        ]
        if not todo:
            return
        # Longest prompts first, so the rows that join together have similar lengths.
        todo.sort(key=lambda job: (-len(self.text(job[1])), self.text(job[1])))
        jobs = [
            Job(
                self.lm.render(self.text(i)).ids,
                steering=steerings_for(point, self.vectors[i]),
                sampling=self.sampling,
                decided=self._decider(point, i),
            )
            for point, i in todo
        ]
        completions = answer_jobs(
            self.lm,
            jobs,
            engine=self.options.engine,
            batch_size=self.options.batch_size,
            progress=self.options.progress,
        )
        responses = [c.text for c in completions]
        if self.judge is not None:
            ppl = perplexities(self.judge, [self.prompts[i].query for _, i in todo], responses)
        else:
            ppl = [math.nan] * len(todo)
        records = []
        for (point, i), completion, perplexity in zip(todo, completions, ppl, strict=True):
            p = self.prompts[i]
            verdict = check(p.check_id, p.kwargs, self.text(i), completion.text)
            records.append(
                {
                    "point": point.key,
                    "prompt": i,
                    "query": p.query,
                    "response": completion.text,
                    "finish": completion.finish_reason,
                    "passed": verdict.loose,
                    "strict": verdict.strict,
                    "repetition": repetition_rate(completion.text),
                    "perplexity": perplexity,
                    "max_new_tokens": self.sampling.max_new_tokens,
                    "with_instruction": self.with_instruction,
                }
            )
        self.log.add(records)

    def _decider(self, point: Point, i: int) -> Decider | None:
        if not self.options.early_stop or not point.layers:
            return None
        p = self.prompts[i]
        return row_failure([p.check_id], [p.kwargs])

    def results(self, points: Sequence[Point], fluency: Fluency) -> list[PointResult]:
        n = len(self.prompts)
        baseline = [self.log.records[(Point().key, i)] for i in range(n)]
        return [
            summarize(p, [self.log.records[(p.key, i)] for i in range(n)], baseline, fluency)
            for p in points
        ]
