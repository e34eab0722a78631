"""The keyword class: the paper's vectors against trained ones, one vector per word.

A keyword instruction names a word, so every word has its own vector, and calibration treats
the words as one class (PAPER.md §3): the staged search chose one point on ten validation
words, each prompt steered by its own word's vector, and every word file ships that point.
The competition is held the same way. A vector is trained for each validation word
(self-distillation: the model's own answers with "include the word" that pass the check), each
prompt is steered by its own word's trained vector, and the class's trained score meets the
class's paper score and "no steering" on the same prompts (`compete.trial`, same rule as
for one instruction).

The outcome is recorded in every word file. A win means every word needs a trained vector of
its own: `ship_class` trains them one by one (minutes each), saving each before its file
switches to it, so a build stopped after any word resumes there, and a word not reached yet
keeps the paper's vector. The competition measured inclusion only, and a trained vector negated
breaks most answers (docs/shipped.md), so a switched file keeps the paper's vector too, for
excluding the word.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ifsteer.calibration.point import Point, steerings_for
from ifsteer.instructions import keyword_instruction
from ifsteer.models import LoadedModel
from ifsteer.progress import Bars, silent
from ifsteer.shipped import file_name, read_calibrated, write_calibrated
from ifsteer.training.compete import (
    Contest,
    competition_record,
    config_settings,
    config_tag,
    earlier_rounds,
    recorded_config,
    train_or_load,
    trained_calibration,
    trial,
    validation_record,
    winner_of,
)
from ifsteer.training.train import METHOD, NothingLearned, TrainConfig
from ifsteer.validation import ValidationPrompt
from ifsteer.vectors.records import Calibration

__all__ = ["compete_class", "ship_class"]


def _trained_path(work: Path, word: str, settings: dict[str, Any]) -> Path:
    stem = file_name(keyword_instruction(word).id).removesuffix(".safetensors")
    return work / "trained" / f"{stem}.{config_tag(settings)}.safetensors"


def _decided(files: Sequence[Path], settings: dict[str, Any]) -> bool:
    """Whether the class holds a competition under `settings` already, or a trained win under
    any configuration (a win is final: `ship_class` finishes it under its own)."""
    for path in files:
        calibration = read_calibrated(path).calibration
        held = calibration.competition or {}
        if calibration.method == METHOD or held.get("winner") == METHOD:
            return True
    held = read_calibrated(files[0]).calibration.competition
    return held is not None and held.get("config") == settings


def _record_everywhere(files: Sequence[Path], record: dict[str, Any]) -> None:
    """The class's competition into every word file; their vectors stay as they are."""
    for path in files:
        current = read_calibrated(path)
        current.rewrite(current.calibration.updated(competition=record))


def compete_class(
    lm: LoadedModel,
    class_id: str,
    picked: Sequence[tuple[str, ValidationPrompt]],
    files: Sequence[Path],
    work: Path,
    config: TrainConfig,
    *,
    bars: Bars = silent,
    setting: str = "",
    **options: Any,
) -> Contest | None:
    """Train a vector per validation word of `picked`, validate the class, and record the
    outcome in every word file of `files`; None where they already record one under `config`.
    `options` as for `verify_point` (judge, fluency, sampling, batch size, engine)."""
    settings = config_settings(config, class_id)
    if _decided(files, settings):
        return None
    paper = read_calibrated(files[0])
    paper_score = paper.calibration.validation.get("score") if paper.recommended else None
    kept = "mean_difference" if paper_score is not None else "none"
    earlier = earlier_rounds(paper.calibration.competition)
    words = [word for word, _ in picked]
    common = {"class": class_id, "words": words, "config": settings, "earlier": earlier}
    per_prompt = []
    for word in words:
        try:
            per_prompt.append(
                train_or_load(
                    lm,
                    keyword_instruction(word).id,
                    _trained_path(work, word, settings),
                    work,
                    config,
                    bars=bars,
                )
            )
        except NothingLearned as why:
            untrained = f"{word}: {why}"
            record = {
                "winner": kept,
                "trained": [],
                "examples": why.examples,
                "untrained": untrained,
            }
            _record_everywhere(files, record | common)
            return Contest(class_id, None, None, paper_score, kept, why.examples, untrained)
    sampling = options["sampling"]
    log_path = work / f"keywords.{config_tag(settings)}.trained{setting}.jsonl"
    held = trial(lm, class_id, [p for _, p in picked], per_prompt, log_path, **options)
    winner = winner_of(held.eligible, held.baseline, paper_score)
    record = competition_record(held.tried, held.baseline, paper.calibration, paper_score, winner)
    record |= common | {"n_prompts": len(picked), "max_new_tokens": sampling.max_new_tokens}
    if winner == METHOD:
        # What every word's file will ship once its own vector is trained (`ship_class`).
        record["point"] = {"layers": list(held.best.point.layers), "scale": held.best.point.scale}
        record["validation"] = validation_record(
            held.best, held.baseline, len(picked), sampling.max_new_tokens
        )
    _record_everywhere(files, record)
    examples = sum(next(iter(v.values())).n_pairs for v in per_prompt)
    return Contest(class_id, held.best, held.baseline, paper_score, winner, examples)


def _paper_point(calibration: Calibration, recommended: bool) -> dict[str, Any]:
    """Which point the paper's vector kept for exclusion is, so it can still lend the class's
    point to a word with no file (`ShippedVector.kept_point`)."""
    return {
        "point": calibration.point,
        "scale": calibration.scale,
        "recommended": recommended,
        "validation": dict(calibration.validation),
        "paper_targets": {
            str(layer): target
            for layer in calibration.layers or ()
            if (target := calibration.paper_target(layer)) is not None
        },
    }


def ship_class(
    lm: LoadedModel,
    words: Sequence[str],
    out: Path,
    work: Path,
    *,
    bars: Bars = silent,
) -> int:
    """Where the class's trained vectors won, train and ship every word's own vector not
    shipped yet, under the configuration that won; returns how many files switched. A word
    whose training learns nothing keeps the paper's vector, and its record says why."""
    switched = 0
    for word in words:
        path = out / file_name(keyword_instruction(word).id)
        current = read_calibrated(path)
        held = current.calibration.competition
        if current.calibration.method == METHOD or held is None or held.get("winner") != METHOD:
            continue
        won = recorded_config(held["config"])
        try:
            vectors = train_or_load(
                lm,
                keyword_instruction(word).id,
                _trained_path(work, word, dict(held["config"])),
                work,
                won,
                bars=bars,
            )
        except NothingLearned as why:
            kept = "mean_difference" if current.recommended else "none"
            record = {**held, "winner": kept, "untrained": f"{word}: {why}"}
            current.rewrite(current.calibration.updated(competition=record))
            continue
        chosen = held["point"]
        point = Point(tuple(chosen["layers"]), "additive", float(chosen["scale"]))
        calibration = trained_calibration(
            point, held["validation"], vectors, held, current.calibration
        )
        # The class competed on inclusion; the paper's point keeps excluding the word.
        calibration["exclusion"] = _paper_point(current.calibration, current.recommended)
        write_calibrated(path, steerings_for(point, vectors), calibration, current.steerings())
        switched += 1
    return switched
