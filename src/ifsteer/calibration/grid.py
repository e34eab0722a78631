"""A sweep's grid and its choice: pure data and selection, no model (torch-free).

A point's score is the share of responses that pass without degenerating, and zero when most
of them pass only by degenerating; `choose` keeps "no steering" when nothing beats it, else the
best point, lowest layer (then smallest weight) on ties.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ifsteer.errors import IfsteerError, InvalidSteering
from ifsteer.instructions import Mode
from ifsteer.rundir import file_stem

__all__ = [
    "MAX_DEGENERATE",
    "MAX_REPETITION",
    "MIN_PERPLEXITY",
    "Choice",
    "Fluency",
    "GridPoint",
    "SweepResult",
    "best_steered",
    "choose",
    "load_sweep",
    "score_point",
    "sweep_filename",
]

# A response whose trigrams repeat more than this, or whose perplexity under the unsteered
# model is below MIN_PERPLEXITY (when measured), is degenerate (ifsteer.quality).
MAX_REPETITION = 0.5
MIN_PERPLEXITY = 2.5
# A grid point where more than this share of responses pass only by degenerating scores zero.
MAX_DEGENERATE = 0.5


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
                f"{MAX_DEGENERATE:g} of the responses pass only by degenerating",
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


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IfsteerError(f"{path}: not a readable sweep file ({exc})") from None
    if not isinstance(data, dict) or "grid" not in data or "chosen" not in data:
        raise IfsteerError(f"{path}: not a sweep file (no grid/chosen)")
    return data
