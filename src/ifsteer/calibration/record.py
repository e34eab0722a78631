"""Recording a sweep: its choice written into the vector files, the sweep saved beside them.

The choice travels with the files: a winning layer (and weight) becomes the default, and
`extra["sweep"]` records what was measured (`vectors.records`, its one reader and writer); a
sweep where no steering wins records `recommended: false` and keeps the file's default layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ifsteer.calibration.grid import SweepResult, best_steered, sweep_filename
from ifsteer.calibration.requests import layer_request, weight_request
from ifsteer.calibration.sweep import sweeps
from ifsteer.models import LoadedModel
from ifsteer.rows import Row
from ifsteer.rundir import sweep_path, write_json
from ifsteer.vectors import Mode, VectorFile
from ifsteer.vectors.records import SweepChoice, sweep_recommends, write_sweep_choice

__all__ = [
    "apply_choice",
    "calibrate",
    "calibrate_groups",
    "group_vector_files",
    "save_sweep",
    "sweep_recommends",
]


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
    *,
    set_default: bool = True,
) -> list[Path]:
    """Write a sweep's choice into vector files.

    A winning layer becomes the default layer (and a winning weight the default weight) unless
    `set_default` is False; either way `extra["sweep"]` (or `extra["sweep_with_instruction"]`
    for a sweep with the instruction in the prompt) records the choice, `recommended` and the
    best steered point. When "no steering" wins, the default layer stays as it was.
    """
    paths = [_path(f) for f in (files.values() if isinstance(files, Mapping) else files)]
    best = best_steered(result.grid) if any(p.steered for p in result.grid) else None
    baseline = next((p for p in result.grid if not p.steered), None)
    layer, weight = result.chosen.point.coordinates
    best_layer, best_weight = (None, None) if best is None else best.point.coordinates
    measured = {
        "best_layer": best_layer,
        "best_weight": best_weight,
        "best_score": None if best is None else best.score,
        "no_steering_score": None if baseline is None else baseline.score,
        "with_instruction": result.with_instruction,
        "group": result.instruction_id,
        "n_prompts": len(result.rows),
        "max_new_tokens": result.max_new_tokens,
    }
    choice = SweepChoice(layer, weight, result.chosen.score, result.recommended, measured)
    return [
        write_sweep_choice(
            path, choice, with_instruction=result.with_instruction, set_default=set_default
        )
        for path in paths
    ]


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


def calibrate(
    lm: LoadedModel,
    files: Mapping[str, VectorFile],
    group: str,
    rows: Sequence[Row],
    sweeps_dir: str | Path,
    **options: Any,
) -> tuple[SweepResult, dict[str, Path], Path]:
    """One group's sweep, its choice written into the files it concerns and the sweep saved.

    Returns the result, the files updated and the sweep's JSON. Options as for
    `calibrate_groups`.
    """
    return calibrate_groups(lm, files, {group: rows}, sweeps_dir, **options)[group]


def calibrate_groups(
    lm: LoadedModel,
    files: Mapping[str, VectorFile],
    groups: Mapping[str, Sequence[Row]],
    sweeps_dir: str | Path,
    *,
    weights: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    set_default: bool = True,
    with_instruction: bool = False,
    mode: Mode | None = None,
    **options: Any,
) -> dict[str, tuple[SweepResult, dict[str, Path], Path]]:
    """Every group's sweep in one job queue (`sweeps`), then each choice recorded and saved.

    A layer sweep, or a layer × weight grid when `weights` are given. A group's choice goes
    into its own files and into every file its sweep steered with (it was measured with
    them). All sweeps run before any choice is written, so no group is measured with another
    group's fresh choice. Other options (sampling, batch_size, perplexity, early_stop,
    progress) as for `sweeps`.
    """
    requests = [
        weight_request(
            lm,
            files,
            rows,
            weights=weights,
            layers=layers,
            instruction_id=group,
            with_instruction=with_instruction,
            mode=mode,
        )
        if weights
        else layer_request(
            lm,
            files,
            rows,
            layers=layers,
            instruction_id=group,
            with_instruction=with_instruction,
            mode=mode,
        )
        for group, rows in groups.items()
    ]
    done: dict[str, tuple[SweepResult, dict[str, Path], Path]] = {}
    for group, result in zip(groups, sweeps(lm, requests, **options), strict=True):
        updated = {
            **group_vector_files(group, files),
            **{v: files[v].path for v in result.vector_ids},
        }
        apply_choice(result, updated, set_default=set_default)
        done[group] = (result, updated, save_sweep(result, sweeps_dir))
    return done
