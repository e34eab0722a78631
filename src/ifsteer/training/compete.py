"""The paper's vector against a trained one, per instruction, on the same validation prompts.

Calibration chooses the method the way it chooses a point (`search.choose`): a trained vector
ships only where it scores strictly higher than both "no steering" and the paper's calibrated
point already in the file, under the same fluency rule (`search.Fluency`, answers broken by
steering count against it) on the instruction's validation prompts. A tie keeps the paper's
vector. The file records both contenders (`extra.calibration.competition`), so a user sees what
the loser scored.

Resumable: the trained vector is written to the work folder before it is validated, every
validation answer is logged, and an instruction whose file already records a competition is
skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer.generation import Sampling
from ifsteer.instructions import get_instruction
from ifsteer.models import LoadedModel
from ifsteer.search import (
    FORMAT_SAMPLING,
    Fluency,
    Point,
    SearchResult,
    steerings_for,
    verify_point,
)
from ifsteer.shipped import file_name, read_calibrated, write_calibrated
from ifsteer.training.data import distilled_examples, rule_examples, unsteered_answers
from ifsteer.training.train import METHOD, Progress, TrainConfig, train_vectors
from ifsteer.validation import extraction_queries, validation_prompts
from ifsteer.vectors import load_vectors, save_vectors

__all__ = ["Contest", "compete", "training_examples"]

FLUENCY = Fluency()
ANSWER_TOKENS = 160  # unsteered answers the rules rewrite; targets use their first 64 tokens


@dataclass
class Contest:
    instruction_id: str
    trained: SearchResult
    paper_score: float | None
    winner: str  # "trained", "mean_difference" or "none"

    def summary(self) -> str:
        t, b = self.trained.best, self.trained.baseline
        paper = "—" if self.paper_score is None else f"{self.paper_score:.2f}"
        return (
            f"{self.instruction_id}: trained {t.score:.2f} (acc {t.accuracy:.2f}, broken "
            f"{t.degenerate:.2f}), paper {paper}, no steering {b.score:.2f} -> {self.winner}"
        )


def training_examples(
    lm: LoadedModel,
    instruction_id: str,
    work: Path,
    *,
    progress: Progress | None = None,
) -> list[Any]:
    """Rule targets where a rule exists, else the model's own passing answers."""
    queries = extraction_queries()
    answers = unsteered_answers(
        lm, queries, ANSWER_TOKENS, work / f"answers-{ANSWER_TOKENS}.jsonl", progress
    )
    examples = rule_examples(instruction_id, answers)
    if not examples:
        instruction = get_instruction(instruction_id)
        examples = distilled_examples(lm, instruction, queries, ANSWER_TOKENS, progress)
    return examples


def compete(
    lm: LoadedModel,
    instruction_id: str,
    shipped: Path,
    work: Path,
    config: TrainConfig,
    *,
    judge: LoadedModel | None = None,
    fluency: Fluency = FLUENCY,
    sampling: Sampling = FORMAT_SAMPLING,
    n_prompts: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Contest | None:
    """Train, validate and keep the winner in `shipped`; None where the file already records
    a competition."""
    current = read_calibrated(shipped)
    if "competition" in current.calibration:
        return None
    name = file_name(instruction_id).removesuffix(".safetensors")
    trained_path = work / "trained" / f"{name}.safetensors"
    if trained_path.is_file():
        vectors, _ = load_vectors(trained_path)
    else:
        examples = training_examples(lm, instruction_id, work, progress=progress)
        trained = train_vectors(
            lm, get_instruction(instruction_id), examples, config, progress=progress
        )
        vectors = trained.vectors
        save_vectors(trained_path, list(vectors.values()))
    point = Point(tuple(sorted(vectors)), "additive", 1.0 * len(vectors))
    result = verify_point(
        lm,
        instruction_id,
        validation_prompts(instruction_id, n_prompts, seed=seed),
        [vectors] * n_prompts,
        point,
        judge=judge,
        fluency=fluency,
        sampling=sampling,
        log_path=work / f"{name}.trained.jsonl",
        batch_size=batch_size,
    )
    paper = current.calibration.get("validation") or {}
    paper_score = paper.get("score") if current.recommended else None
    winner = _winner(result, paper_score)
    record = _competition(result, current.calibration, paper_score, winner)
    if winner == METHOD:
        write_calibrated(
            shipped,
            steerings_for(point, vectors),
            _trained_calibration(result, point, vectors, record, current.calibration),
        )
    else:
        write_calibrated(
            shipped, current.steerings(), {**current.calibration, "competition": record}
        )
    return Contest(instruction_id, result, paper_score, winner)


def _winner(result: SearchResult, paper_score: float | None) -> str:
    best, baseline = result.best.score, result.baseline.score
    rival = max(baseline, paper_score if paper_score is not None else -1.0)
    if round(best, 9) > round(rival, 9):
        return METHOD
    return "mean_difference" if paper_score is not None else "none"


def _competition(
    result: SearchResult,
    paper: Mapping[str, Any],
    paper_score: float | None,
    winner: str,
) -> dict[str, Any]:
    t = result.best
    validation = paper.get("validation") or {}
    return {
        "winner": winner,
        "trained": {
            "point": t.point.key,
            "score": t.score,
            "accuracy": t.accuracy,
            "degenerate": t.degenerate,
        },
        "mean_difference": {
            "point": paper.get("point"),
            "recommended": bool(paper.get("recommended")),
            "score": validation.get("score"),
            "accuracy": validation.get("accuracy"),
            "degenerate": validation.get("degenerate"),
        },
        "paper_score_counted": paper_score,
        "no_steering_score": result.baseline.score,
        "n_prompts": result.n_prompts,
        "max_new_tokens": result.max_new_tokens,
    }


def _trained_calibration(
    result: SearchResult,
    point: Point,
    vectors: Mapping[int, Any],
    competition: dict[str, Any],
    previous: Mapping[str, Any],
) -> dict[str, Any]:
    t, b = result.best, result.baseline
    training = next(iter(vectors.values())).extra.get("training", {})
    return {
        "status": "searched",
        "method": METHOD,
        "recommended": True,
        "point": point.key,
        "mode": point.mode,
        "scale": point.scale,
        "validation": {
            "score": t.score,
            "accuracy": t.accuracy,
            "degenerate": t.degenerate,
            "no_steering_score": b.score,
            "no_steering_accuracy": b.accuracy,
            "n_prompts": result.n_prompts,
            "max_new_tokens": result.max_new_tokens,
        },
        "training": training,
        "competition": competition,
        "fluency": previous.get("fluency"),
        "seed": previous.get("seed", 0),
    }
