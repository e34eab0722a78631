"""The paper's vector against a trained one, per instruction, on the same validation prompts.

Calibration chooses the method the way it chooses a point (`calibration.grid.choose`): a
trained vector ships only where it scores strictly higher than both "no steering" and the
paper's calibrated point already in the file, under the same fluency rule (`quality.Fluency`,
answers broken by steering count against it) on the instruction's validation prompts. A tie
keeps the paper's vector. The trained vector is tried at its trained size and at half of it,
and a point that newly breaks more than a fifth of the answers (degenerate where the
unsteered answer reads fine) never ships. The file records both contenders
(`extra.calibration.competition`), so a user sees what the loser scored.

Resumable: the trained vector is written to the work folder before it is validated, every
validation answer is logged, and an instruction is skipped where its file records a trained
winner or a competition held with the same training configuration. A rerun with another
configuration (more steps, longer targets) therefore retries exactly the instructions the
trained vector lost, and keeps the earlier rounds in the record (`competition.earlier`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ifsteer.batcher import Batcher
from ifsteer.calibration.grid import PointResult, best_steered
from ifsteer.calibration.point import Point, steerings_for
from ifsteer.calibration.search import FORMAT_SAMPLING, verify_point
from ifsteer.errors import InvalidSteering
from ifsteer.generation import Sampling
from ifsteer.instructions import Instruction, get_instruction
from ifsteer.jobs import QueueFactory
from ifsteer.models import LoadedModel
from ifsteer.progress import Bars, silent
from ifsteer.quality import Fluency
from ifsteer.shipped import file_name, read_calibrated, write_calibrated
from ifsteer.training.data import (
    DISTILLED,
    distilled_examples,
    rule_examples,
    unsteered_answers,
)
from ifsteer.training.rules import has_rule
from ifsteer.training.train import (
    METHOD,
    NothingLearned,
    TrainConfig,
    train_vectors,
)
from ifsteer.validation import ValidationPrompt, extraction_queries, validation_prompts
from ifsteer.vectors import SteeringVector, load_vectors, save_vectors
from ifsteer.vectors.records import Calibration, point_record

__all__ = ["TARGETS", "Contest", "check_targets", "compete", "training_examples"]

FLUENCY = Fluency()
TARGETS = ("auto", "rule", "distill")  # where training examples come from
ANSWER_TOKENS = 160  # the unsteered answers the rules rewrite (targets are cut at training)
# A trained vector is validated at its trained size and at half of it: where the full vector
# breaks answers, half of it may still steer. No point that newly breaks more than MAX_BROKEN
# of the answers (degenerate where the unsteered answer reads fine) ships, however it scores.
TRAINED_SCALES = (1.0, 0.5)
MAX_BROKEN = 0.2


@dataclass
class Contest:
    instruction_id: str
    # The best trained point (an eligible one where there is one); None where no vector was
    # trained (`untrained` says why: too few examples, or nothing learned).
    trained: PointResult | None
    baseline: PointResult | None
    paper_score: float | None
    winner: str  # "trained", "mean_difference" or "none"
    examples: int
    untrained: str | None = None

    def summary(self) -> str:
        t, b = self.trained, self.baseline
        paper = "-" if self.paper_score is None else f"{self.paper_score:.2f}"
        if t is None or b is None:
            return f"{self.instruction_id}: not trained ({self.untrained}) -> {self.winner}"
        return (
            f"{self.instruction_id}: trained {t.point.key} {t.score:.2f} (acc {t.accuracy:.2f}, "
            f"broken {t.degenerate:.2f}, newly {t.newly_broken:.2f}), paper {paper}, "
            f"no steering {b.score:.2f} -> {self.winner}"
        )


def check_targets(targets: str) -> None:
    """The one check of a targets name: `training_examples` runs it, and the CLI before any
    model loads."""
    if targets not in TARGETS:
        raise InvalidSteering(f"unknown targets {targets!r}; choose {', '.join(TARGETS)}")


def training_examples(
    lm: LoadedModel,
    instruction: Instruction,
    work: Path,
    *,
    targets: str = "auto",
    bars: Bars = silent,
) -> list[Any]:
    """Rule targets where a rule exists (`targets` "auto" or "rule"), else the model's own
    passing answers: one recipe for the build and for `ifsteer train`, so that a vector a user
    trains by hand learns from the same examples as the shipped one."""
    check_targets(targets)
    queries = extraction_queries()
    # Greedy answers keyed by their prompt: the plain queries' and, for distillation, the
    # queries' with the instruction appended share one file.
    cache = work / f"answers-{ANSWER_TOKENS}.jsonl"
    examples = []
    if targets != "distill" and has_rule(instruction.id):
        with bars("unsteered answers", len(queries)) as advance:
            answers = unsteered_answers(lm, queries, ANSWER_TOKENS, cache, advance)
        examples = rule_examples(instruction.id, answers)
    if targets == "rule" and not examples:
        raise InvalidSteering(f"no rule writes targets for {instruction.id!r}; use distill")
    if not examples:
        with bars("answers with the instruction", len(queries)) as advance:
            examples = distilled_examples(lm, instruction, queries, ANSWER_TOKENS, advance, cache)
    return examples


def train_or_load(
    lm: LoadedModel,
    instruction_id: str,
    path: Path,
    work: Path,
    config: TrainConfig,
    *,
    bars: Bars = silent,
) -> dict[int, SteeringVector]:
    """`instruction_id`'s vectors trained under `config`: those saved at `path` by an earlier
    run, else trained and saved there before anything validates them, so a stopped build never
    trains one twice. `NothingLearned` carries the number of examples it had."""
    if path.is_file():
        return load_vectors(path)[0]
    instruction = get_instruction(instruction_id)
    examples = training_examples(lm, instruction, work, bars=bars)
    try:
        with bars(f"training {instruction_id}", config.steps) as advance:
            trained = train_vectors(lm, instruction, examples, config, progress=advance)
    except NothingLearned as why:
        why.examples = len(examples)
        raise
    save_vectors(path, list(trained.vectors.values()))
    return trained.vectors


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
    bars: Bars = silent,
    engine: QueueFactory = Batcher,
    early_stop: bool = False,
    setting: str = "",
) -> Contest | None:
    """Train, validate and keep the winner in `shipped`; None where the file already records
    a trained winner or a competition under this `config`.

    Training runs on the HF model `lm` (it needs gradients); `engine` and `early_stop` make
    the validation answers, as for `verify_point`, logged under a name carrying `setting`
    (`calibration.answers.setting_suffix`)."""
    current = read_calibrated(shipped)
    earlier = current.calibration.competition
    settings = config_settings(config, instruction_id)
    if earlier is not None and (
        earlier.get("winner") == METHOD or earlier.get("config") == settings
    ):
        return None
    name = f"{file_name(instruction_id).removesuffix('.safetensors')}.{config_tag(settings)}"
    trained_path = work / "trained" / f"{name}.safetensors"
    paper_score = current.calibration.validation.get("score") if current.recommended else None
    kept = "mean_difference" if paper_score is not None else "none"
    try:
        vectors = train_or_load(lm, instruction_id, trained_path, work, config, bars=bars)
    except NothingLearned as why:
        # An outcome of this configuration, recorded so a rerun (and the build) moves on.
        record = {"winner": kept, "trained": [], "examples": why.examples}
        record |= {"untrained": str(why), "config": settings, "earlier": earlier_rounds(earlier)}
        current.rewrite(current.calibration.updated(competition=record))
        return Contest(instruction_id, None, None, paper_score, kept, why.examples, str(why))
    prompts = validation_prompts(instruction_id, n_prompts, seed=seed)
    held = trial(
        lm,
        instruction_id,
        prompts,
        [vectors] * n_prompts,
        work / f"{name}.trained{setting}.jsonl",
        judge=judge,
        fluency=fluency,
        sampling=sampling,
        batch_size=batch_size,
        engine=engine,
        early_stop=early_stop,
    )
    best, baseline = held.best, held.baseline
    winner = winner_of(held.eligible, baseline, paper_score)
    record = competition_record(held.tried, baseline, current.calibration, paper_score, winner)
    record |= {
        "n_prompts": n_prompts,
        "max_new_tokens": sampling.max_new_tokens,
        "config": settings,
        "earlier": earlier_rounds(earlier),
    }
    if winner == METHOD:
        validated = validation_record(best, baseline, n_prompts, sampling.max_new_tokens)
        write_calibrated(
            shipped,
            steerings_for(best.point, vectors),
            trained_calibration(best.point, validated, vectors, record, current.calibration),
        )
    else:
        current.rewrite(current.calibration.updated(competition=record))
    n_examples = next(iter(vectors.values())).n_pairs  # a trained vector's examples
    return Contest(instruction_id, best, baseline, paper_score, winner, n_examples)


@dataclass(frozen=True)
class Trial:
    """Trained vectors validated at each of `TRAINED_SCALES`: every point tried, the best of
    them (an eligible one where there is one) and no steering on the same prompts."""

    tried: list[PointResult]
    best: PointResult
    baseline: PointResult

    @property
    def eligible(self) -> PointResult | None:
        """The best point, unless it newly breaks more than `MAX_BROKEN` of the answers."""
        return self.best if self.best.newly_broken <= MAX_BROKEN else None


def trial(
    lm: LoadedModel,
    instruction_id: str,
    prompts: Sequence[ValidationPrompt],
    per_prompt: Sequence[Mapping[int, SteeringVector]],
    log_path: Path,
    **options: Any,
) -> Trial:
    """Validate each prompt's trained vectors (`per_prompt`, all at the same layers) at their
    trained size and at half of it; `options` as for `verify_point`."""
    layers = tuple(sorted(per_prompt[0]))
    results = [
        verify_point(
            lm,
            instruction_id,
            prompts,
            per_prompt,
            Point(layers, "additive", scale * len(layers)),
            log_path=log_path,
            **options,
        )
        for scale in TRAINED_SCALES
    ]
    tried = [r.best for r in results]
    eligible = [r for r in tried if r.newly_broken <= MAX_BROKEN]
    return Trial(tried, best_steered(eligible or tried), results[0].baseline)


def config_settings(config: TrainConfig, instruction_id: str) -> dict[str, Any]:
    """The configuration as a file records it (and reads it back), with which distilled answers
    trained where the instruction has no rule (`data.DISTILLED`)."""
    settings: dict[str, Any] = json.loads(json.dumps(asdict(config)))
    if not has_rule(instruction_id):
        settings["distilled"] = DISTILLED
    return settings


def recorded_config(settings: Mapping[str, Any]) -> TrainConfig:
    """The `TrainConfig` a competition recorded (`config_settings`)."""
    known = {f.name for f in fields(TrainConfig)}
    chosen = {k: v for k, v in settings.items() if k in known}
    return TrainConfig(**{**chosen, "layers": tuple(settings["layers"])})


def config_tag(settings: Mapping[str, Any]) -> str:
    """A short name for a training configuration: its vectors and logs never mix with another's."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def earlier_rounds(earlier: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Earlier competitions, oldest first, each without its own history."""
    if earlier is None:
        return []
    return [*earlier.get("earlier", []), {k: v for k, v in earlier.items() if k != "earlier"}]


def winner_of(best: PointResult | None, baseline: PointResult, paper_score: float | None) -> str:
    """Trained only where an eligible trained point beats both rivals strictly."""
    rival = max(baseline.score, paper_score if paper_score is not None else -1.0)
    if best is not None and round(best.score, 9) > round(rival, 9):
        return METHOD
    return "mean_difference" if paper_score is not None else "none"


def competition_record(
    tried: Sequence[PointResult],
    baseline: PointResult,
    paper: Calibration,
    paper_score: float | None,
    winner: str,
) -> dict[str, Any]:
    validation = paper.validation
    return {
        "winner": winner,
        "trained": [
            {
                "point": t.point.key,
                "score": t.score,
                "accuracy": t.accuracy,
                "degenerate": t.degenerate,
                "newly_broken": t.newly_broken,
            }
            for t in tried
        ],
        "mean_difference": {
            "point": paper.point or None,
            "recommended": paper.recommended,
            "score": validation.get("score"),
            "accuracy": validation.get("accuracy"),
            "degenerate": validation.get("degenerate"),
        },
        "paper_score_counted": paper_score,
        "no_steering_score": baseline.score,
        "no_steering_accuracy": baseline.accuracy,
        "max_broken": MAX_BROKEN,
    }


def validation_record(
    best: PointResult, baseline: PointResult, n_prompts: int, max_new_tokens: int
) -> dict[str, Any]:
    """A trained winner's validation scores, as a calibrated file records them."""
    return {
        "score": best.score,
        "accuracy": best.accuracy,
        "degenerate": best.degenerate,
        "no_steering_score": baseline.score,
        "no_steering_accuracy": baseline.accuracy,
        "n_prompts": n_prompts,
        "max_new_tokens": max_new_tokens,
    }


def trained_calibration(
    point: Point,
    validation: Mapping[str, Any],
    vectors: Mapping[int, Any],
    competition: Mapping[str, Any],
    previous: Calibration,
) -> dict[str, Any]:
    """The record of a file that ships `vectors` trained, at `point`."""
    training = next(iter(vectors.values())).extra.get("training", {})
    return point_record(
        status="searched",
        recommended=True,
        point=point.key,
        mode=point.mode,
        scale=point.scale,
        validation=dict(validation),
        paper_targets={},
        method=METHOD,
        training=training,
        competition=dict(competition),
        fluency=previous.fluency,
        seed=previous.seed,
    )
