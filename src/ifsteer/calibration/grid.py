"""Measured points and the one choice rule: pure data and selection, no model (torch-free).

A point's score is the share of responses that pass without degenerating, and zero when most
of them pass only by degenerating. `choose` is the one choice rule of the paper's sweep and the
staged search alike: "no steering" when nothing beats it, else the best point; ties go to the
higher accuracy, then the simpler point (`Point.rank`: for a sweep's points the lowest layer,
then the smallest |weight|). Both plans measure `Point`s into `PointResult`s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ifsteer.calibration.point import Point
from ifsteer.errors import IfsteerError, InvalidSteering
from ifsteer.instructions import Mode
from ifsteer.quality import PAPER_FLUENCY, Fluency
from ifsteer.rundir import file_stem

__all__ = [
    "Point",
    "PointResult",
    "SweepResult",
    "best_steered",
    "choose",
    "load_sweep",
    "score_point",
    "sweep_filename",
]


@dataclass(frozen=True)
class PointResult:
    """A point measured on validation prompts, by either plan.

    `degenerate` is the share of degenerate answers as the plan judges them: the search's
    answers that steering broke, the sweep's degenerate answers among those generated to the
    end; `repetition` their mean trigram repetition, `perplexity` their median perplexity
    (None where not measured)."""

    point: Point
    accuracy: float
    score: float
    degenerate: float
    repetition: float
    perplexity: float | None
    n: int
    # Degenerate where the unsteered answer to the same prompt reads fine: what steering broke
    # outright, not counting a looping answer that loops a little harder (in `degenerate`).
    newly_broken: float = 0.0

    @property
    def steered(self) -> bool:
        return self.point.steered

    def rank(self) -> tuple[Any, ...]:
        return self.point.rank()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "point": {**asdict(self.point), "key": self.point.key}}

    def sweep_entry(self) -> dict[str, Any]:
        """As `sweeps/<id>.json` has always listed a grid point (`layer` null: no steering,
        `weight` null: the file's own), read by the report and `draw_sweep`."""
        layer, weight = self.point.coordinates
        fluency = {
            "repetition": self.repetition,
            "perplexity": self.perplexity,
            "degenerate": self.degenerate,
        }
        return {
            "layer": layer,
            "weight": weight,
            "accuracy": self.accuracy,
            "fluency": fluency,
            "score": self.score,
            "n": self.n,
        }


@dataclass(frozen=True)
class SweepResult:
    """A sweep's grid, its choice, and what it was run on (saved as sweeps/<id>.json)."""

    instruction_id: str
    model: str
    with_instruction: bool
    mode: Mode
    grid: list[PointResult]
    chosen: PointResult
    rows: list[str] = field(default_factory=list)
    vector_ids: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    responses: list[dict[str, Any]] = field(default_factory=list, repr=False)
    fluency: Fluency = PAPER_FLUENCY  # the rule its responses were judged by

    @property
    def recommended(self) -> bool:
        """Whether steering beat "no steering" on the validation prompts."""
        return self.chosen.steered

    def to_json(self) -> dict[str, Any]:
        layer, weight = self.chosen.point.coordinates
        return {
            "instruction_id": self.instruction_id,
            "model": self.model,
            "with_instruction": self.with_instruction,
            "mode": self.mode,
            "grid": [p.sweep_entry() for p in self.grid],
            "chosen": {
                "layer": layer,
                "weight": weight,
                "score": self.chosen.score,
                "recommended": self.recommended,
            },
            "rows": list(self.rows),
            "vector_ids": list(self.vector_ids),
            "max_new_tokens": self.max_new_tokens,
            "rule": {
                "score": "loose pass and not degenerate; 0 when more than "
                f"{self.fluency.max_degenerate:g} of the responses pass only by degenerating",
                "max_repetition": self.fluency.max_repetition,
                "min_perplexity": self.fluency.min_perplexity,
                "ties": "no steering if it scores at least as well, else higher accuracy, "
                "then lowest layer, then smallest |weight|",
            },
        }


def sweep_filename(instruction_id: str) -> str:
    """`sweeps/<id>.json` with ':' replaced by '__', so ids are valid file names everywhere."""
    return file_stem(instruction_id)


# --- selection (pure) -----------------------------------------------------------------------


def score_point(
    passed: Sequence[bool],
    degenerate: Sequence[bool],
    *,
    max_degenerate: float = PAPER_FLUENCY.max_degenerate,
) -> tuple[float, float]:
    """(accuracy, score) of one grid point's responses.

    Accuracy is the share that pass their checks. The score only counts passes that did not
    degenerate, and is zero when more than `max_degenerate` of the responses pass only by
    degenerating: a layer that breaks the model must not win by repeating the right word.
    A failed response counts for nothing whatever its fluency, so a sweep may stop a row as
    soon as its check has failed for good without changing any score.
    """
    if len(passed) != len(degenerate):
        raise ValueError(f"{len(passed)} verdicts but {len(degenerate)} fluency flags")
    n = len(passed)
    if n == 0:
        return 0.0, 0.0
    accuracy = sum(map(bool, passed)) / n
    broken = sum(bool(p) and bool(d) for p, d in zip(passed, degenerate, strict=True))
    if broken / n > max_degenerate:
        return accuracy, 0.0
    return accuracy, sum(p and not d for p, d in zip(passed, degenerate, strict=True)) / n


def choose(results: Sequence[PointResult]) -> PointResult:
    """The point a sweep or a search settles on.

    "No steering" wins when its score is at least every steered point's: steering must earn
    its place. Otherwise the best steered point (`best_steered`). Without a "no steering"
    point, the best steered one.
    """
    if not results:
        raise InvalidSteering("an empty sweep has nothing to choose from")
    baseline = max((r for r in results if not r.steered), key=lambda r: r.score, default=None)
    if not any(r.steered for r in results):
        assert baseline is not None
        return baseline
    best = best_steered(results)
    if baseline is None or round(best.score, 9) > round(baseline.score, 9):
        return best
    return baseline


def best_steered(results: Sequence[PointResult]) -> PointResult:
    """The best steered point (what `choose` picks when "no steering" may not win): the highest
    score, then the higher accuracy (its extra passes degenerated, but it did steer), then the
    simplest (`rank`)."""
    steered = [r for r in results if r.steered]
    if not steered:
        raise InvalidSteering("no steered point to choose from")
    return min(steered, key=lambda r: (-round(r.score, 9), -round(r.accuracy, 9), r.rank()))


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IfsteerError(f"{path}: not a readable sweep file ({exc})") from None
    if not isinstance(data, dict) or "grid" not in data or "chosen" not in data:
        raise IfsteerError(f"{path}: not a sweep file (no grid/chosen)")
    return data
