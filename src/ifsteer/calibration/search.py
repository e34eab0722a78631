"""Where and how hard to steer one instruction: a staged search on validation prompts.

The paper sweeps layers at its one setting (projection onto c̄) and lets "no steering" win when
nothing beats it. On a 135M model that setting rarely changes the output, so the search also
varies how hard to steer and where, in stages, so a CPU can afford it (`SearchSpace`):

1. **layers**: "no steering", then projection with target scale 1 (the paper) at each layer of
   a coarse grid;
2. **weights**: at the best layer of stage 1, projection with larger target scales and additive
   steering with weights in units of the vector's norm ‖u‖;
3. **where**: the best point so far applied to generated tokens only, and the vector at the top
   layers of stage 1 at once.

*Projection target scale* `s` sets each position's component along û to `c̄ + (s−1)·‖u‖`.
Since the with- and without-instruction projections differ by exactly ‖u‖ on the extraction
pairs, s = 1 is the paper's c̄ (the with-instruction level), s = 0 the without level, and s = 2
as far past the with level as that is past the without level: "more of the instruction" even
at layers where c̄ itself is negative (scaling c̄ there would push away from it). *Additive
scale* `s` adds `s·‖u‖·û`; at several layers at once the scale is split evenly between them,
while projection sets the same target scale at each.

A response passes when IFEval's loose check passes and it is fluent (`quality.SEARCH_FLUENCY`,
the search's policy: no loop at its end, few repeated trigrams, and a perplexity under a
*different* model, the judge, Gemma 3 270M base here, inside a band measured on unsteered
answers). The unsteered model itself loops in about half of its 256-token answers, so an
answer counts against a point only when steering *broke* it: degenerate where the unsteered
answer to the same prompt is not, or both loop and the steered one loops harder (its tail
compresses further). A point's score is `score_point` of the passes and broken answers;
`choose`, the calibration's one choice rule, keeps "no steering" unless a steered point scores
strictly higher; among steered points ties go to the higher accuracy, then the simpler point
(one layer, all positions, the lower layer, the scale closest to the paper's).

Every response is appended to a JSONL log as it is scored (`AnswerLog`), so a search that is
stopped resumes where it was and a rerun with other fluency thresholds needs no generation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ifsteer.batcher import Batcher
from ifsteer.calibration.grid import Point, PointResult, best_steered, choose
from ifsteer.calibration.scoring import (
    Answering,
    PromptVectors,
    SearchRunner,
    search_log,
)
from ifsteer.errors import InvalidSteering
from ifsteer.jobs import QueueFactory, Sampling
from ifsteer.models import LoadedModel
from ifsteer.quality import SEARCH_FLUENCY, Fluency
from ifsteer.validation import ValidationPrompt
from ifsteer.vectors import SteeringVector
from ifsteer.vectors.records import point_record

__all__ = [
    "FORMAT_SAMPLING",
    "SearchResult",
    "SearchSpace",
    "run_search",
    "verify_point",
]

FORMAT_SAMPLING = Sampling(max_new_tokens=256)  # long enough for a format check to be decidable
Progress = Callable[[int], None]


@dataclass(frozen=True)
class SearchSpace:
    """What each stage tries; see the module docstring."""

    layers: tuple[int, ...]
    projection_scales: tuple[float, ...] = (2.0, 4.0)
    additive_scales: tuple[float, ...] = (1.0, 2.0)
    multi_layer: int = 3  # how many of stage 1's top layers to steer at once (0: skip)
    try_generated: bool = True

    @classmethod
    def coarse(cls, n_layers: int) -> SearchSpace:
        """Every fourth layer from L//5: half the paper's grid, which steps by two."""
        return cls(layers=tuple(range(n_layers // 5, n_layers, 4)))

    def stage_layers(self) -> list[Point]:
        return [Point(), *(Point((layer,)) for layer in self.layers)]

    def stage_weights(self, layer: int) -> list[Point]:
        points = [Point((layer,), "projection", s) for s in self.projection_scales]
        return points + [Point((layer,), "additive", s) for s in self.additive_scales]

    def stage_where(self, best: Point, top_layers: Sequence[int]) -> list[Point]:
        points = []
        if self.try_generated:
            points.append(replace(best, positions="generated"))
        if self.multi_layer > 1 and len(top_layers) > 1:
            layers = tuple(sorted(top_layers[: self.multi_layer]))
            points.append(replace(best, layers=layers, positions="all"))
        return points


@dataclass
class SearchResult:
    instruction_id: str
    results: list[PointResult]
    chosen: PointResult
    best: PointResult  # best steered point, also when "no steering" wins
    baseline: PointResult
    fluency: Fluency
    max_new_tokens: int
    n_prompts: int
    with_instruction: bool
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def recommended(self) -> bool:
        return bool(self.chosen.point.layers)

    @property
    def written(self) -> PointResult:
        """The point a file keeps: the chosen one, or the best steered where none won."""
        return self.chosen if self.recommended else self.best

    def record(
        self,
        vectors: Mapping[int, SteeringVector],
        space: SearchSpace,
        seed: int,
        status: str = "searched",
    ) -> dict[str, Any]:
        """The calibration record of the file written with `vectors` at the point it keeps
        (`vectors.records.point_record`): its validation scores, the search and the rule."""
        point = self.written
        return point_record(
            status=status,
            recommended=self.recommended,
            point=point.point.key,
            mode=point.point.mode,
            scale=point.point.scale,
            validation={
                "score": point.score,
                "accuracy": point.accuracy,
                "degenerate": point.degenerate,
                "no_steering_score": self.baseline.score,
                "no_steering_accuracy": self.baseline.accuracy,
                "n_prompts": self.n_prompts,
                "max_new_tokens": self.max_new_tokens,
            },
            paper_targets={layer: vectors[layer].target for layer in point.point.layers},
            search={
                "layers": list(space.layers),
                "projection_scales": list(space.projection_scales),
                "additive_scales": list(space.additive_scales),
                "multi_layer": space.multi_layer,
                "points": len(self.results),
            },
            fluency={
                "max_repetition": self.fluency.max_repetition,
                "min_perplexity": self.fluency.min_perplexity,
                "max_perplexity": self.fluency.max_perplexity,
                "min_tail_compression": self.fluency.min_tail_compression,
                "max_degenerate": self.fluency.max_degenerate,
            },
            seed=seed,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "instruction_id": self.instruction_id,
            "recommended": self.recommended,
            "chosen": self.chosen.to_json(),
            "best_steered": self.best.to_json(),
            "no_steering": self.baseline.to_json(),
            "grid": [r.to_json() for r in self.results],
            "fluency": asdict(self.fluency),
            "max_new_tokens": self.max_new_tokens,
            "n_prompts": self.n_prompts,
            "with_instruction": self.with_instruction,
        }


def verify_point(
    lm: LoadedModel,
    instruction_id: str,
    prompts: Sequence[ValidationPrompt],
    vectors: PromptVectors,
    point: Point,
    *,
    judge: LoadedModel | None = None,
    fluency: Fluency = SEARCH_FLUENCY,
    sampling: Sampling = FORMAT_SAMPLING,
    log_path: str | Path | None = None,
    batch_size: int | None = 32,
    engine: QueueFactory = Batcher,
    early_stop: bool = False,
) -> SearchResult:
    """Score one point found for another instruction against "no steering" on this one's
    prompts: a cheap calibration for instructions of a group (the languages) that share one.
    Options as for `run_search`."""
    log = search_log(log_path)
    answering = Answering(engine, batch_size, early_stop)
    runner = SearchRunner(lm, judge, prompts, vectors, log, sampling, False, answering)
    points = [Point(), point]
    runner.run(points)
    baseline, steered = runner.results(points, fluency)
    return SearchResult(
        instruction_id=instruction_id,
        results=[baseline, steered],
        chosen=choose([baseline, steered]),
        best=steered,
        baseline=baseline,
        fluency=fluency,
        max_new_tokens=sampling.max_new_tokens,
        n_prompts=len(prompts),
        with_instruction=False,
        examples={k: log.records[(k, 0)]["response"] for k in (Point().key, point.key)},
    )


def run_search(
    lm: LoadedModel,
    instruction_id: str,
    prompts: Sequence[ValidationPrompt],
    vectors: PromptVectors,
    space: SearchSpace,
    *,
    judge: LoadedModel | None = None,
    fluency: Fluency = SEARCH_FLUENCY,
    sampling: Sampling = FORMAT_SAMPLING,
    with_instruction: bool = False,
    log_path: str | Path | None = None,
    batch_size: int | None = 32,
    engine: QueueFactory = Batcher,
    early_stop: bool = False,
    progress: Progress | None = None,
) -> SearchResult:
    """Run the three stages for one instruction and choose; see the module docstring.

    Without a judge model only the text itself flags degenerate answers. Answers are made on
    `engine`'s job queue (`Batcher`, or `OfflineVLLM.queue` for vLLM), as the paper's sweep
    makes them (`runner.answer_jobs`). With `early_stop`, a steered answer stops as soon as
    its check has failed for good (`deciders.row_failure`): a failed answer scores nothing,
    so no score, accuracy or choice changes, while its fluency figures (`degenerate`,
    `newly_broken`) are read on the part generated. "No steering" always runs to the end, as
    every steered answer's fluency is measured against it. Off by default: the shipped vectors
    were searched without it, and a log holds the answers of one setting.
    """
    if not prompts:
        raise InvalidSteering(f"no validation prompts for {instruction_id!r}")
    log = search_log(log_path)
    answering = Answering(engine, batch_size, early_stop, progress)
    runner = SearchRunner(lm, judge, prompts, vectors, log, sampling, with_instruction, answering)
    tried: list[Point] = []

    def stage(points: Sequence[Point]) -> list[PointResult]:
        fresh = [p for p in dict.fromkeys(points) if p not in tried]
        runner.run(fresh)
        tried.extend(fresh)
        return runner.results(tried, fluency)

    results = stage(space.stage_layers())
    by_layer = sorted(
        (r for r in results if r.point.layers),
        key=lambda r: (-r.score, -r.accuracy, r.degenerate, r.point.layers),
    )
    top_layers = [r.point.layers[0] for r in by_layer]
    results = stage(space.stage_weights(top_layers[0]))
    results = stage(space.stage_where(best_steered(results).point, top_layers))
    baseline = next(r for r in results if not r.point.layers)
    chosen, best = choose(results), best_steered(results)
    examples = {
        key: log.records[(key, 0)]["response"] for key in {baseline.point.key, best.point.key}
    }
    return SearchResult(
        instruction_id=instruction_id,
        results=results,
        chosen=chosen,
        best=best,
        baseline=baseline,
        fluency=fluency,
        max_new_tokens=sampling.max_new_tokens,
        n_prompts=len(prompts),
        with_instruction=with_instruction,
        examples=examples,
    )
