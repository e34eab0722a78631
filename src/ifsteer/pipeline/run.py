"""`ifsteer run-paper`: the paper's format experiment for one model, end to end, resumable.

Stages, each skipping what an earlier (interrupted) run left in the output directory:

1. **split**: every row of the IFEval format set is held out for evaluation; each instruction's
   sweep validates on prompts built from our own queries (`ifsteer.validation`), recorded in
   `split.json`;
2. **extract**: one vector file per instruction the rows need (12 format ids, plus one per
   response language present), all layers of the paper grid, in `vectors/`;
3. **sweep**: one layer sweep per instruction (the languages share one), on its validation
   rows, all sweeps in one job queue; the choices are written into the vector files and
   `sweeps/<id>.json`;
4. **evaluate**: the four settings on the evaluation rows (`responses.jsonl`,
   `summary.json`); instructions whose sweep found that no layer beats "no steering" run
   unsteered in the steered settings, as in the paper;
5. **report**: `report.html` and `figures/`.

`run.json` records the options, what each stage did and how long it took; `ifsteer.pipeline.plan`
prices a run before it starts. Every sweep answer is appended to `sweeps/answers.jsonl` as it
finishes, so a run killed during the sweeps generates only the answers it had not finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ifsteer.calibration import calibrate_groups, sweep_recommends
from ifsteer.evaluation import count_pending, run_evaluation
from ifsteer.generation import Sampling
from ifsteer.instructions import get_instruction
from ifsteer.models import LoadedModel
from ifsteer.pipeline.plan import (
    PaperConfig,
    Plan,
    estimate_seconds,
    full_command,
    full_config,
    full_plan,
    minutes_text,
    plan_run,
)
from ifsteer.progress import Stages
from ifsteer.report import plot_sweep, render_report
from ifsteer.rundir import (
    ANSWERS,
    RUN,
    SPLIT,
    SWEEPS,
    VECTORS,
    sweep_path,
    vector_path,
    write_json,
)
from ifsteer.vectors import (
    default_layer,
    default_layers,
    extract_instruction,
    load_vector_directory,
    save_vectors,
)

__all__ = ["run_paper"]


@dataclass
class _Log:
    """Stage records for run.json, summed over the invocations that built the directory, so a
    resumed run still shows what the whole result cost (`runs` counts the invocations)."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages_view: Stages | None = None
    previous: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str, **info: Any) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"items": 0, "skipped": 0, **info}
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield entry
        finally:
            entry["seconds"] = round(time.perf_counter() - start, 1)
            # CPU time of this process: on a machine shared with other jobs, what the stage
            # would take alone (with one thread) is closer to this than to the wall time.
            entry["cpu_seconds"] = round(time.process_time() - cpu, 1)
            if self.stages_view is not None:
                self.stages_view.message(
                    f"{name}: {entry['items']} done, {entry['skipped']} already there, "
                    f"{entry['seconds']:.0f} s"
                )
            before = self.previous.get(name) or {}
            for key in ("items", "seconds", "cpu_seconds"):
                entry[key] = round(entry[key] + float(before.get(key) or 0), 1)
            entry["items"] = int(entry["items"])
            entry["runs"] = int(before.get("runs") or 0) + 1
            self.stages[name] = entry


def _previous_run(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_paper(
    lm: LoadedModel,
    config: PaperConfig,
    *,
    stages: Stages | None = None,
    plan: Plan | None = None,
) -> Path:
    """Run every stage into `config.out` (skipping finished work) and return report.html."""
    stages = stages or Stages()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_run(config, lm.n_layers)
    n_params = sum(p.numel() for p in lm.model.parameters())
    previous = _previous_run(out / RUN)
    log = _Log(stages_view=stages, previous=previous.get("stages") or {})
    started = time.time()
    run_record: dict[str, Any] = {
        "config": config.record(),
        "model": lm.model_id,
        "n_layers": lm.n_layers,
        "sweep_layers": plan.sweep_layers,
        "full_command": full_command(config),
        "full_estimate": minutes_text(
            sum(
                estimate_seconds(
                    full_config(config), full_plan(config, plan, lm.n_layers), n_params
                ).values()
            )
        ),
        "started": previous.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"),
        "stages": log.stages,
    }
    write_json(out / SPLIT, plan.split.to_json())
    write_json(out / RUN, run_record)

    # 1. vectors: every layer of the paper grid, plus the no-sweep default layer.
    layers = sorted({*default_layers(lm.n_layers), default_layer(lm.n_layers)})
    todo = [v for v in plan.vector_ids if not vector_path(out, v).is_file()]
    with (
        log.timed("extract", n_pairs=config.n_pairs, layers=layers) as entry,
        stages.stage("extract", len(todo)) as advance,
    ):
        entry["skipped"] = len(plan.vector_ids) - len(todo)
        for vector_id in todo:
            instruction = get_instruction(vector_id)
            vectors = extract_instruction(
                lm,
                instruction,
                layers,
                n_pairs=config.n_pairs,
                batch_size=min(config.batch_size or 16, 16),
                seed=config.seed,
            )
            save_vectors(
                vector_path(out, vector_id),
                list(vectors.values()),
                default=default_layer(lm.n_layers),
            )
            entry["items"] += 1
            advance(1)
    write_json(out / RUN, run_record)
    files = load_vector_directory(out / VECTORS)

    # 2. sweeps: one per instruction (languages together), on its validation rows.
    sampling = Sampling(max_new_tokens=config.max_new_tokens)
    groups = [g for g in plan.groups if not sweep_path(out / SWEEPS, g).is_file()]
    sweep_rows = sum(len(plan.split.validation[g]) for g in groups) * (len(plan.sweep_layers) + 1)
    with (
        log.timed("sweep", layers=plan.sweep_layers) as entry,
        stages.stage("sweep", sweep_rows) as advance,
    ):
        entry["skipped"] = len(plan.groups) - len(groups)
        done = calibrate_groups(
            lm,
            files,
            {g: plan.split.validation[g] for g in groups},
            out / SWEEPS,
            layers=plan.sweep_layers,
            with_instruction=config.with_instruction,
            sampling=sampling,
            batch_size=config.batch_size,
            progress=advance,
            answers=out / SWEEPS / ANSWERS,
        )
        for group, (result, _, written) in done.items():
            plot_sweep(result.to_json(), written.with_suffix(".png"))
            layer = result.chosen.point.coordinates[0]
            verdict = f"layer {layer}" if result.recommended else "no steering"
            stages.message(f"sweep {group}: {verdict} (score {result.chosen.score:.2f})")
            entry["items"] += 1
    write_json(out / RUN, run_record)

    # 3. evaluation: instructions where no steering won run unsteered, as in the paper. The
    # sweeps rewrote the files' defaults, so the directory is read again.
    files = load_vector_directory(out / VECTORS)
    steer_with = {
        vector_id: file
        for vector_id, file in files.items()
        if sweep_recommends(file, config.with_instruction)
    }
    run_record["not_steered"] = sorted(set(files) - set(steer_with))
    if run_record["not_steered"]:
        stages.message(
            "no layer beat no steering for "
            + ", ".join(run_record["not_steered"])
            + ": those rows run unsteered in the steered settings (listed as missing vectors)"
        )
    pending = count_pending(out, plan.evaluation)
    with (
        log.timed("evaluate", rows=len(plan.evaluation)) as entry,
        stages.stage("evaluate", pending) as advance,
    ):
        summary = run_evaluation(
            lm,
            plan.evaluation,
            steer_with,
            out,
            sampling=sampling,
            batch_size=config.batch_size,
            perplexity=config.perplexity,
            progress=advance,
        )
        entry["items"], entry["skipped"] = summary.generated, summary.skipped
    write_json(out / RUN, run_record)

    # 4. report.
    run_record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run_record["seconds"] = round(time.time() - started + float(previous.get("seconds") or 0), 1)
    write_json(out / RUN, run_record)
    with log.timed("report") as entry, stages.stage("report", 1) as advance:
        report = render_report(out)
        entry["items"] = 1
        advance(1)
    write_json(out / RUN, run_record)
    return report
