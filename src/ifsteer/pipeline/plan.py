"""What `ifsteer run-paper` will do, and how long it will take, before any model work.

`plan_run` reads the data, keeps the rows ifsteer can steer, splits them (or checks the split a
resumed run recorded) and sizes every stage; `estimate_seconds` prices a plan from constants
measured on the embedded model, and `preview` says all of that in a few lines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ifsteer.deciders import row_failure
from ifsteer.errors import IfsteerError
from ifsteer.instructions import get_instruction
from ifsteer.models import LoadedModel
from ifsteer.rows import SETTINGS, Row, by_group, load_rows
from ifsteer.rundir import SPLIT, SWEEPS, sweep_path, vector_path
from ifsteer.splits import Split, held_out_split
from ifsteer.validation import validation_rows

__all__ = [
    "DEFAULTS",
    "PaperConfig",
    "PipelineError",
    "Plan",
    "estimate_seconds",
    "full_command",
    "full_config",
    "full_plan",
    "minutes_text",
    "plan_run",
    "preview",
    "sweep_grid",
]

# Wall seconds on the embedded SmolLM2-135M (fp32, two threads, the 2-core development machine
# otherwise idle), fitted on a measured quick run (2026-12-02, after the engine's slot cache and
# grouped attention: extract 65 s, sweep 413 s, evaluate 76 s; a decode step measured alone:
# batch 8 ~85 ms, 32 ~150 ms, 64 ~250 ms). Generation goes through the continuous-batching
# engine: a decode step costs a fixed part (reading the weights) plus a part per row, which here
# also carries the prefills and the buffer moves. Other models scale by parameter count.
REFERENCE_PARAMS = 134_515_008
SECONDS_LOAD = 10.0
SECONDS_PER_EXTRACT_PROMPT = 0.092  # one forward up to the deepest grid layer, batch 16
SECONDS_PER_STEP = 0.062  # the fixed part of one decode step, whatever the batch
SECONDS_PER_ROW_TOKEN = 0.0037  # what each row adds to a decode step
SECONDS_PER_EVAL_ROW = 0.1  # IFEval checks and bookkeeping per evaluated answer
SECONDS_PER_PERPLEXITY_ROW = 0.9  # the extra forward that scores an answer's perplexity
# Answer lengths as a share of max_new_tokens, measured on the same run: this model's answers
# mostly run to the limit (sweeps 0.94), except sweep rows whose check has a failure decider,
# which mostly stop within the first lines (0.37); evaluation answers average 0.71.
LENGTH_UNDECIDED = 0.94
LENGTH_DECIDABLE = 0.37
LENGTH_EVALUATED = 0.71
CPU_BATCH = 64  # what auto_batch_size gives a ~135M model on a CPU with memory to spare


class PipelineError(IfsteerError):
    """Options or an output directory that a run cannot use."""


@dataclass(frozen=True)
class PaperConfig:
    """Options of one run: the defaults are the quick run (fewer evaluation rows, pairs and
    layers, the calibration's own prompts and tokens); `full_config` is the paper-sized run."""

    data: Path
    out: Path
    model: str = "smollm2-135m-instruct"
    limit: int | None = 24  # evaluation rows (stratified prefix); None = all
    sweep_prompts: int = 10  # validation prompts per instruction, from our own queries
    layer_step: int = 8  # every 8th layer of the paper's grid, aligned on L−4 (sweep_grid)
    max_new_tokens: int = 256
    batch_size: int | None = None  # None: sized to the model and free memory
    n_pairs: int = 16
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
        return len(SETTINGS) * len(self.evaluation)


# --- planning -------------------------------------------------------------------------------


def _steerable(rows: Sequence[Row]) -> list[Row]:
    """Rows every one of whose instructions has a catalogue vector (format and language)."""
    kept = []
    for row in rows:
        if not row.fully_served():
            continue
        try:
            for vector_id in row.vector_ids():
                get_instruction(vector_id)
        except IfsteerError:
            continue
        kept.append(row)
    return kept


def sweep_grid(n_layers: int, step: int) -> list[int]:
    """The layers a sweep visits: the paper's `range(L//5, L, 2)` at step 2, a subset above.

    A coarser grid is aligned on its deep end, so it always holds layer L−4 (26 of 30): the
    searches for the shipped vectors found the embedded model steerable only there and above
    (docs/shipped.md), and a grid from L//5 at step 8 would stop at 22.
    """
    if step < 2 or step % 2:
        raise PipelineError(f"--layer-step must be an even number ≥ 2, got {step}")
    first = n_layers // 5
    if step == 2:
        return list(range(first, n_layers, 2))
    start = first + max(0, n_layers - 4 - first) % step
    return list(range(start, n_layers - 1, step)) or [first]


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
    split = _split(rows, config)
    _check_recorded_split(config.out / SPLIT, split)
    evaluation = split.evaluation if config.limit is None else split.evaluation[: config.limit]
    needed = [r for rows_ in split.validation.values() for r in rows_] + evaluation
    vector_ids = sorted({v for row in needed for v in row.vector_ids()})
    return Plan(
        split=split,
        evaluation=evaluation,
        vector_ids=vector_ids,
        sweep_layers=sweep_grid(n_layers, config.layer_step),
        groups=sorted(split.validation),
    )


def _split(rows: Sequence[Row], config: PaperConfig) -> Split:
    """Every data row held out; each instruction's sweep validates on `sweep_prompts` prompts
    built from our own queries (`ifsteer.validation`), never on the rows it is scored on."""
    validation = (
        {
            group: validation_rows(group, members, config.sweep_prompts, seed=config.seed)
            for group, members in sorted(by_group(rows).items())
        }
        if config.sweep_prompts
        else {}
    )
    return held_out_split(rows, validation, per_group=config.sweep_prompts, seed=config.seed)


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
    config: PaperConfig,
    plan: Plan,
    n_params: int | None = None,
    *,
    todo: bool = False,
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
        vector_ids = [v for v in vector_ids if not vector_path(directory, v).is_file()]
        groups = [g for g in groups if not sweep_path(directory / SWEEPS, g).is_file()]
        from ifsteer.evaluation import count_pending

        eval_rows = count_pending(directory, plan.evaluation)
    batch = config.batch_size or _auto_batch(n_params)
    tokens = config.max_new_tokens
    sweep_answers, sweep_tokens = _sweep_work(
        [row for g in groups for row in plan.split.validation[g]],
        len(plan.sweep_layers),
        tokens,
        with_instruction=config.with_instruction,
    )
    return {
        "load": SECONDS_LOAD * scale,
        "extract": len(vector_ids) * 2 * config.n_pairs * SECONDS_PER_EXTRACT_PROMPT * scale,
        "sweep": generation_seconds(sweep_answers, sweep_tokens / max(sweep_answers, 1), batch)
        * scale,
        "evaluate": scale
        * (
            generation_seconds(eval_rows, LENGTH_EVALUATED * tokens, batch)
            + eval_rows
            * (SECONDS_PER_EVAL_ROW + (SECONDS_PER_PERPLEXITY_ROW if config.perplexity else 0.0))
        ),
        "report": 15.0,
    }


def _sweep_work(
    rows: Sequence[Row], layers: int, max_new_tokens: int, *, with_instruction: bool
) -> tuple[int, float]:
    """Answers the engine decodes for these validation rows, and their expected tokens.

    Every row is answered at every layer; its unsteered answer is shared by every row that
    asks the same prompt (groups validate on the same queries), and a shared answer runs until
    the last of its checks is decided.
    """
    steered = layers * sum(_expected_length(row, max_new_tokens) for row in rows)
    unsteered: dict[str | None, float] = {}
    for row in rows:
        prompt = row.prompt if with_instruction else row.prompt_without_instruction
        unsteered[prompt] = max(unsteered.get(prompt, 0.0), _expected_length(row, max_new_tokens))
    return layers * len(rows) + len(unsteered), steered + sum(unsteered.values())


def _expected_length(row: Row, max_new_tokens: int) -> float:
    """Tokens a sweep answer is expected to take: rows whose check can fail early stop early."""
    decidable = row_failure(row.instruction_id_list, row.kwargs or ()) is not None
    return (LENGTH_DECIDABLE if decidable else LENGTH_UNDECIDED) * max_new_tokens


def generation_seconds(answers: int, tokens: float, batch: int) -> float:
    """Seconds for the engine to write `answers` answers of `tokens` tokens on average.

    The queue keeps `batch` rows decoding until it runs dry, then the last rows finish in a
    shrinking batch: about answers × tokens / batch full steps plus one answer's length of
    draining steps, each paying the fixed part, and every row-token its own part.
    """
    if answers <= 0:
        return 0.0
    batch = max(1, min(batch, answers))
    steps = answers * tokens / batch + tokens
    return steps * SECONDS_PER_STEP + answers * tokens * SECONDS_PER_ROW_TOKEN


def _auto_batch(n_params: int | None) -> int:
    """The CPU batch `auto_batch_size` picks, scaled down for larger models as it does."""
    return max(1, int(CPU_BATCH * min(1.0, 150e6 / (n_params or REFERENCE_PARAMS))))


def full_command(config: PaperConfig) -> str:
    """The command that runs the whole held-out set with longer answers and more pairs."""
    return (
        f"ifsteer run-paper --model {config.model} --data {config.data} --out {config.out}-full "
        "--limit 0 --layer-step 2 --max-new-tokens 256 --n-pairs 64"
    )


def full_config(config: PaperConfig) -> PaperConfig:
    return replace(
        config,
        out=Path(f"{config.out}-full"),
        limit=None,
        layer_step=2,
        max_new_tokens=256,
        n_pairs=64,
    )


def minutes_text(seconds: float) -> str:
    """A duration as people say it: under a minute, minutes, or hours past an hour and a half."""
    if seconds < 60:
        return "under a minute"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def full_plan(config: PaperConfig, plan: Plan, n_layers: int) -> Plan:
    """The plan `full_config(config)` would follow on the same data."""
    full = full_config(config)
    split = _split(plan.split.evaluation, full)
    return Plan(
        split=split,
        evaluation=split.evaluation,
        vector_ids=sorted(
            {v for r in split.evaluation for v in r.vector_ids()}
            | {v for rows in split.validation.values() for r in rows for v in r.vector_ids()}
        ),
        sweep_layers=sweep_grid(n_layers, full.layer_step),
        groups=sorted(split.validation),
    )


def preview(config: PaperConfig, plan: Plan, lm: LoadedModel) -> tuple[dict[str, float], str]:
    """The seconds each stage has left, and the lines that tell the user what is coming."""
    n_params = sum(p.numel() for p in lm.model.parameters())
    estimates = estimate_seconds(config, plan, n_params, todo=True)
    full_total = sum(
        estimate_seconds(
            full_config(config), full_plan(config, plan, lm.n_layers), n_params
        ).values()
    )
    big = {k: v for k, v in estimates.items() if v >= 30}
    text = (
        f"run-paper {lm.model_id}: {len(plan.vector_ids)} vectors, "
        f"{len(plan.groups)} sweeps × layers {plan.sweep_layers} + no steering "
        f"({plan.sweep_generations} answers), {len(plan.evaluation)} evaluation rows × 4 "
        f"settings ({plan.eval_generations} answers), {config.max_new_tokens} new tokens each.\n"
        f"Estimated time left: about {minutes_text(sum(estimates.values()))}"
        + (f" ({', '.join(f'{k} {v / 60:.0f}' for k, v in big.items())} min)" if big else "")
        + ".\n"
        f"Full set (all held-out rows, 256 tokens, 64 pairs), about "
        f"{full_total / 3600:.1f} h here:\n  {full_command(config)}"
    )
    return estimates, text
