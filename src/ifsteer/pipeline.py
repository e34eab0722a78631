"""`ifsteer run-paper`: the paper's format experiment for one model, end to end, resumable.

Stages, each skipping what an earlier (interrupted) run left in the output directory:

1. **split**: the IFEval format set is split once into a few validation rows per instruction
   (for the sweeps) and evaluation rows (everything else), recorded in `split.json`;
2. **extract**: one vector file per instruction the rows need (12 format ids, plus one per
   response language present), all layers of the paper grid, in `vectors/`;
3. **sweep**: one layer sweep per instruction (the languages share one), on its validation
   rows; the choice is written into the vector files and `sweeps/<id>.json`;
4. **evaluate**: the four settings on the evaluation rows (`responses.jsonl`,
   `summary.json`); instructions whose sweep found that no layer beats "no steering" run
   unsteered in the steered settings, as in the paper;
5. **report**: `report.html` and `figures/`.

`run.json` records the options, what each stage did and how long it took. The defaults fit the
embedded 135M model on a 2-core CPU in well under 90 minutes; `estimate_seconds` says what a
set of options costs, and `full_command` how to run the whole set.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ifsteer.calibration import (
    Split,
    apply_choice,
    group_vector_files,
    save_sweep,
    split_rows,
    sweep_filename,
    sweep_layers,
)
from ifsteer.errors import IfsteerError
from ifsteer.evaluation import Row, load_rows, run_evaluation, vector_directory
from ifsteer.generation import Sampling
from ifsteer.instructions import get_instruction
from ifsteer.models import LoadedModel
from ifsteer.vectors import (
    default_layer,
    default_layers,
    extract_instruction,
    load_vectors,
    save_vectors,
)

__all__ = [
    "DEFAULTS",
    "PaperConfig",
    "PipelineError",
    "Plan",
    "RichStages",
    "Stages",
    "estimate_seconds",
    "full_command",
    "full_config",
    "full_plan",
    "plan_run",
    "run_paper",
]

Advance = Callable[[int], None]

# Seconds on the embedded SmolLM2-135M (fp32, one thread) on the 2-core development machine,
# from the CPU time of each stage of a measured run (docs/report.md); wall time on a machine
# shared with other jobs was about 1.3x these. Other models scale by parameter count.
REFERENCE_PARAMS = 134_515_008
SECONDS_LOAD = 10.0
SECONDS_PER_EXTRACT_PROMPT = 0.20  # one forward up to the deepest grid layer, batch 16
SECONDS_PER_TOKEN_ROW = 0.030  # one decoding step of one row at batch 16 (measured 0.022)
SECONDS_PER_EVAL_ROW = 0.2  # IFEval checks and bookkeeping per evaluated answer
SECONDS_PER_PERPLEXITY_ROW = 0.9  # the extra forward that scores an answer's perplexity


class PipelineError(IfsteerError):
    """Options or an output directory that a run cannot use."""


@dataclass(frozen=True)
class PaperConfig:
    """Options of one run; the defaults fit the 90-minute budget on the embedded model."""

    data: Path
    out: Path
    model: str = "smollm2-135m-instruct"
    limit: int | None = 80  # evaluation rows (stratified prefix); None = all
    sweep_prompts: int = 3  # validation rows per instruction (at most half of its rows)
    layer_step: int = 2  # sweep range(L//5, L, layer_step): the paper's grid
    max_new_tokens: int = 64
    batch_size: int = 16
    n_pairs: int = 32
    with_instruction: bool = False  # sweep with the instruction in the prompt
    # Perplexity under the model itself flags most greedy answers of a small model as
    # degenerate (< 2.5) and costs a forward per answer; repetition alone decides by default.
    perplexity: bool = False
    dtype: str = "float32"
    seed: int = 0

    def record(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


DEFAULTS = PaperConfig(data=Path("DATA"), out=Path("OUT"))


@dataclass(frozen=True)
class Plan:
    """What a run will do: rows, vectors and grid sizes, before any model work."""

    split: Split
    evaluation: list[Row]
    vector_ids: list[str]
    sweep_layers: list[int]
    groups: list[str]

    @property
    def sweep_generations(self) -> int:
        return sum(len(self.split.validation[g]) for g in self.groups) * (
            len(self.sweep_layers) + 1
        )

    @property
    def eval_generations(self) -> int:
        return 4 * len(self.evaluation)


# --- planning -------------------------------------------------------------------------------


def _served(row: Row) -> list[str]:
    return [vector_id for vector_id, _ in row.served_vectors()]


def _steerable(rows: Sequence[Row]) -> list[Row]:
    """Rows every one of whose instructions has a catalogue vector (format and language)."""
    kept = []
    for row in rows:
        ids = _served(row)
        if not ids or len(ids) < len(row.instruction_id_list):
            continue
        try:
            for vector_id in ids:
                get_instruction(vector_id)
        except IfsteerError:
            continue
        kept.append(row)
    return kept


def sweep_grid(n_layers: int, step: int) -> list[int]:
    """The layers a sweep visits: the paper's `range(L//5, L, 2)` at step 2, a subset above."""
    if step < 2 or step % 2:
        raise PipelineError(f"--layer-step must be an even number ≥ 2, got {step}")
    return list(range(n_layers // 5, n_layers, step))


def plan_run(config: PaperConfig, n_layers: int) -> Plan:
    """Read the data, split it (or reuse the recorded split) and size every stage."""
    if not config.data.is_file():
        raise PipelineError(
            f"{config.data}: no such data file; pass --data PATH to an IFEval-format jsonl, "
            "e.g. --data ../shared/data/ifeval_single_instr_format.jsonl"
        )
    rows = _steerable(load_rows(config.data))
    if not rows:
        raise PipelineError(
            f"{config.data}: no row has a format or language instruction that ifsteer can steer"
        )
    split = split_rows(rows, config.sweep_prompts, seed=config.seed)
    _check_recorded_split(config.out / "split.json", split)
    evaluation = split.evaluation if config.limit is None else split.evaluation[: config.limit]
    needed = [r for rows_ in split.validation.values() for r in rows_] + evaluation
    vector_ids = sorted({v for row in needed for v in _served(row)})
    return Plan(
        split=split,
        evaluation=evaluation,
        vector_ids=vector_ids,
        sweep_layers=sweep_grid(n_layers, config.layer_step),
        groups=sorted(split.validation),
    )


def _check_recorded_split(path: Path, split: Split) -> None:
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise PipelineError(f"{path} is damaged; remove it (and the run's outputs)") from None
    if old.get("validation") != split.to_json()["validation"]:
        raise PipelineError(
            f"{path.parent} was split with --sweep-prompts {old.get('per_group')} "
            f"(seed {old.get('seed')}) on other data; rerun with the same options and --data "
            "to resume, or use a new --out"
        )


# --- estimates ------------------------------------------------------------------------------


def _scale(n_params: int | None) -> float:
    return 1.0 if not n_params else max(n_params / REFERENCE_PARAMS, 0.05)


def estimate_seconds(
    config: PaperConfig, plan: Plan, n_params: int | None = None, *, todo: bool = False,
    out: Path | None = None,
) -> dict[str, float]:
    """Seconds per stage for this plan, from constants measured on the embedded model.

    With `todo`, only the work not already in `out` (a resumed run) is counted.
    """
    scale = _scale(n_params)
    directory = out or config.out
    vector_ids = plan.vector_ids
    groups = plan.groups
    eval_rows = len(plan.evaluation) * 4
    if todo:
        vector_ids = [v for v in vector_ids if not _vector_path(directory, v).is_file()]
        groups = [g for g in groups if not _sweep_path(directory, g).is_file()]
        from ifsteer.evaluation import count_pending

        eval_rows = count_pending(directory, plan.evaluation)
    sweep_rows = sum(len(plan.split.validation[g]) for g in groups) * (len(plan.sweep_layers) + 1)
    per_row = SECONDS_PER_TOKEN_ROW * config.max_new_tokens * _batch_factor(config.batch_size)
    return {
        "load": SECONDS_LOAD * scale,
        "extract": len(vector_ids) * 2 * config.n_pairs * SECONDS_PER_EXTRACT_PROMPT * scale,
        "sweep": sweep_rows * per_row * scale,
        "evaluate": eval_rows * scale * (
            per_row + SECONDS_PER_EVAL_ROW
            + (SECONDS_PER_PERPLEXITY_ROW if config.perplexity else 0.0)
        ),
        "report": 15.0,
    }


def _batch_factor(batch_size: int) -> float:
    """Cost of a row relative to batch 16: small batches pay the per-step overhead more."""
    return 0.5 + 8.0 / max(batch_size, 1)


def full_command(config: PaperConfig) -> str:
    """The command that runs the whole held-out set with longer answers and more pairs."""
    return (
        f"ifsteer run-paper --model {config.model} --data {config.data} --out {config.out}-full "
        "--limit 0 --max-new-tokens 256 --n-pairs 64"
    )


def full_config(config: PaperConfig) -> PaperConfig:
    return replace(
        config, out=Path(f"{config.out}-full"), limit=None, max_new_tokens=256, n_pairs=64
    )


def _minutes(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


# --- progress -------------------------------------------------------------------------------


class Stages:
    """Where a run reports progress; this base prints nothing (tests, library use)."""

    def start(self, estimates: Mapping[str, float]) -> None:
        """Called once with the estimated seconds of every stage."""

    @contextmanager
    def stage(self, name: str, items: int) -> Iterator[Advance]:
        yield lambda _n: None

    def message(self, text: str) -> None:
        """A line for the user."""


class RichStages(Stages):
    """An overall bar in estimated seconds (its ETA corrects itself as stages run) and one bar
    per stage, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(file=sys.stderr)
        self.estimates: dict[str, float] = {}
        self.progress: Any = None
        self.overall: Any = None

    def start(self, estimates: Mapping[str, float]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.estimates = dict(estimates)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.overall = self.progress.add_task(
            "run-paper (est. s)", total=max(sum(estimates.values()), 1.0)
        )

    @contextmanager
    def stage(self, name: str, items: int) -> Iterator[Advance]:
        if self.progress is None:
            yield lambda _n: None
            return
        budget = self.estimates.get(name, 0.0)
        per_item = budget / items if items else 0.0
        task = self.progress.add_task(f"  {name}", total=max(items, 0))
        spent = 0.0

        def advance(n: int) -> None:
            nonlocal spent
            self.progress.advance(task, n)
            step = min(per_item * n, budget - spent)
            spent += step
            self.progress.advance(self.overall, step)

        try:
            yield advance
        finally:
            self.progress.advance(self.overall, max(budget - spent, 0.0))
            self.progress.update(task, completed=items)

    def message(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --- running --------------------------------------------------------------------------------


def _vector_path(out: Path, vector_id: str) -> Path:
    return out / "vectors" / f"{sweep_filename(vector_id)}.safetensors"


def _sweep_path(out: Path, group: str) -> Path:
    return out / "sweeps" / f"{sweep_filename(group)}.json"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


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


def _recommended(path: Path, with_instruction: bool) -> bool:
    vectors, default = load_vectors(path)
    key = "sweep_with_instruction" if with_instruction else "sweep"
    record = vectors[default].extra.get(key)
    return not (isinstance(record, Mapping) and record.get("recommended") is False)


def run_paper(
    lm: LoadedModel,
    config: PaperConfig,
    *,
    stages: Stages | None = None,
    plan: Plan | None = None,
) -> Path:
    """Run every stage into `config.out` (skipping finished work) and return report.html."""
    from ifsteer.report import render_report

    stages = stages or Stages()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_run(config, lm.n_layers)
    n_params = sum(p.numel() for p in lm.model.parameters())
    previous = _previous_run(out / "run.json")
    log = _Log(stages_view=stages, previous=previous.get("stages") or {})
    started = time.time()
    run_record: dict[str, Any] = {
        "config": config.record(),
        "model": lm.model_id,
        "n_layers": lm.n_layers,
        "sweep_layers": plan.sweep_layers,
        "full_command": full_command(config),
        "full_estimate": _minutes(sum(estimate_seconds(
            full_config(config), full_plan(config, plan, lm.n_layers), n_params
        ).values())),
        "started": previous.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"),
        "stages": log.stages,
    }
    _write_json(out / "split.json", plan.split.to_json())
    _write_json(out / "run.json", run_record)

    # 1. vectors: every layer of the paper grid, plus the no-sweep default layer.
    layers = sorted({*default_layers(lm.n_layers), default_layer(lm.n_layers)})
    todo = [v for v in plan.vector_ids if not _vector_path(out, v).is_file()]
    with log.timed("extract", n_pairs=config.n_pairs, layers=layers) as entry, stages.stage(
        "extract", len(todo)
    ) as advance:
        entry["skipped"] = len(plan.vector_ids) - len(todo)
        for vector_id in todo:
            instruction = get_instruction(vector_id)
            vectors = extract_instruction(
                lm, instruction, layers, n_pairs=config.n_pairs,
                batch_size=min(config.batch_size, 16), seed=config.seed,
            )
            save_vectors(_vector_path(out, vector_id), list(vectors.values()),
                         default=default_layer(lm.n_layers))
            entry["items"] += 1
            advance(1)
    _write_json(out / "run.json", run_record)
    mapping = vector_directory(out / "vectors")

    # 2. sweeps: one per instruction (languages together), on its validation rows.
    sampling = Sampling(max_new_tokens=config.max_new_tokens)
    groups = [g for g in plan.groups if not _sweep_path(out, g).is_file()]
    sweep_rows = sum(len(plan.split.validation[g]) for g in groups) * (len(plan.sweep_layers) + 1)
    with log.timed("sweep", layers=plan.sweep_layers) as entry, stages.stage(
        "sweep", sweep_rows
    ) as advance:
        entry["skipped"] = len(plan.groups) - len(groups)
        for group in groups:
            result = sweep_layers(
                lm, mapping, plan.split.validation[group], layers=plan.sweep_layers,
                instruction_id=group, with_instruction=config.with_instruction,
                sampling=sampling, batch_size=config.batch_size, progress=advance,
            )
            apply_choice(result, group_vector_files(group, mapping))
            save_sweep(result, out / "sweeps")
            verdict = (f"layer {result.chosen.layer}" if result.chosen.recommended
                       else "no steering")
            stages.message(f"sweep {group}: {verdict} (score {result.chosen.score:.2f})")
            entry["items"] += 1
    _write_json(out / "run.json", run_record)

    # 3. evaluation: instructions where no steering won run unsteered, as in the paper.
    steer_with = {
        vector_id: path for vector_id, path in mapping.items()
        if _recommended(path, config.with_instruction)
    }
    run_record["not_steered"] = sorted(set(mapping) - set(steer_with))
    if run_record["not_steered"]:
        stages.message(
            "no layer beat no steering for "
            + ", ".join(run_record["not_steered"])
            + ": those rows run unsteered in the steered settings (listed as missing vectors)"
        )
    from ifsteer.evaluation import count_pending

    pending = count_pending(out, plan.evaluation)
    with log.timed("evaluate", rows=len(plan.evaluation)) as entry, stages.stage(
        "evaluate", pending
    ) as advance:
        summary = run_evaluation(
            lm, plan.evaluation, steer_with, out, sampling=sampling,
            batch_size=config.batch_size, perplexity=config.perplexity, progress=advance,
        )
        entry["items"], entry["skipped"] = summary.generated, summary.skipped
    _write_json(out / "run.json", run_record)

    # 4. report.
    run_record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run_record["seconds"] = round(
        time.time() - started + float(previous.get("seconds") or 0), 1
    )
    _write_json(out / "run.json", run_record)
    with log.timed("report") as entry, stages.stage("report", 1) as advance:
        report = render_report(out)
        entry["items"] = 1
        advance(1)
    _write_json(out / "run.json", run_record)
    return report


def full_plan(config: PaperConfig, plan: Plan, n_layers: int) -> Plan:
    """The plan `full_config(config)` would follow on the same data."""
    full = full_config(config)
    split = split_rows(
        [r for rows in plan.split.validation.values() for r in rows] + plan.split.evaluation,
        full.sweep_prompts, seed=full.seed,
    )
    return Plan(
        split=split,
        evaluation=split.evaluation,
        vector_ids=sorted({v for r in split.evaluation for v in _served(r)}
                          | {v for rows in split.validation.values() for r in rows
                             for v in _served(r)}),
        sweep_layers=sweep_grid(n_layers, full.layer_step),
        groups=sorted(split.validation),
    )
