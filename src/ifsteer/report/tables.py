"""The tables the CLI prints after a run, as plain rows of text (the CLI draws them with rich).

They live with the report so that the terminal and the page read a summary the same way: the
headline metric of each experiment, its 95% interval, and the paper's numbers beside ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ifsteer.evaluation.summary import HEADLINE_METRIC, PAPER_RESULTS
from ifsteer.rows import SETTINGS

__all__ = ["Column", "TextTable", "paper_table", "settings_table", "sweep_table"]

SHORT_LABELS = {
    "no_instruction": "no instr",
    "steer": "steer",
    "instruction": "instr",
    "instruction_steer": "instr+steer",
}


@dataclass(frozen=True)
class Column:
    name: str
    right: bool = True
    no_wrap: bool = True


@dataclass(frozen=True)
class TextTable:
    title: str
    columns: list[Column]
    rows: list[list[str]] = field(default_factory=list)
    caption: str | None = None


def _cell(stat: Mapping[str, Any], interval: bool = False) -> str:
    if stat.get("mean") is None:
        return "–"
    if not interval:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ({stat['low']:.2f}–{stat['high']:.2f})"


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def settings_table(summary: Mapping[str, Any], experiment: str) -> TextTable | None:
    """Our four settings, with the 95% interval on the experiment's headline metric."""
    result = summary["experiments"].get(experiment)
    if not result:
        return None
    settings = result["settings"]
    metric = HEADLINE_METRIC.get(experiment, "prompt_loose")
    other = "prompt_strict" if metric == "prompt_loose" else "prompt_loose"
    extra = [
        (name, key)
        for name, key in (("sent.", "sentences"), ("judge", "judge"))
        if any(s.get(key) is not None for s in settings.values())
        and (key == "judge" or experiment in ("length", "composition"))
    ]
    kind = metric.removeprefix("prompt_")
    names = [other.removeprefix("prompt_"), "instr.", "degen", "ppl", *(n for n, _ in extra), "s"]
    table = TextTable(
        title=f"{experiment} · {summary['model']} · {result['n_rows']} rows",
        columns=[
            Column("setting", right=False),
            Column("n", no_wrap=False),
            Column(f"{kind} (95% CI)"),
            *(Column(name) for name in names),
        ],
        caption=(
            f"prompt-level accuracy; instr. = instruction-level {kind}; degen = share "
            "degenerate; ppl = median perplexity; s = seconds"
        ),
    )
    for name, s in settings.items():
        fluency = s["fluency"]
        note = f" ({s['n_unsteered']} unsteered)" if s.get("n_unsteered") else ""
        table.rows.append(
            [
                SHORT_LABELS.get(name, name) + note,
                str(s["n"]),
                _cell(s[metric], interval=True),
                _cell(s[other]),
                _cell(s[f"instruction_{kind}"]),
                _number(fluency["degenerate"]),
                _number(fluency["perplexity"]),
                *(_number(s.get(key)) for _, key in extra),
                f"{s['seconds']:.0f}",
            ]
        )
    return table


def paper_table(summary: Mapping[str, Any], experiment: str) -> TextTable | None:
    """Our headline numbers beside the paper's published ones (transfer compares to format)."""
    result = summary["experiments"].get(experiment)
    paper = PAPER_RESULTS.get("format" if experiment == "transfer" else experiment)
    if not result or not paper:
        return None
    metric = HEADLINE_METRIC.get(experiment, "prompt_loose")
    settings = result["settings"]
    table = TextTable(
        title=f"{metric.replace('_', ' ')}: ours beside the paper's (docs/method.md §6)",
        columns=[
            Column("model", right=False, no_wrap=False),
            *(Column(SHORT_LABELS[name], no_wrap=False) for name in SETTINGS),
        ],
    )
    ours = [settings.get(name, {}).get(metric, {}).get("mean") for name in SETTINGS]
    table.rows.append(
        [f"ours: {summary['model']} (n={result['n_rows']})", *(_number(v, 3) for v in ours)]
    )
    for model_name, values in paper.items():
        table.rows.append([f"paper: {model_name}", *(f"{v:.3f}" for v in values)])
    return table


def sweep_table(result: Any) -> TextTable:
    """A sweep's grid, the chosen point marked with an arrow (`result` is a SweepResult)."""
    table = TextTable(
        title=f"sweep {result.instruction_id} · {len(result.rows)} prompts · "
        f"{'with' if result.with_instruction else 'without'} the instruction",
        columns=[
            Column(name, no_wrap=False)
            for name in (
                "layer",
                "weight",
                "loose acc.",
                "score",
                "repetition",
                "degenerate",
                "ppl",
            )
        ],
    )
    for p in result.grid:
        layer, weight = p.point.coordinates
        chosen = p.point == result.chosen.point
        table.rows.append(
            [
                ("none" if layer is None else str(layer)) + (" ←" if chosen else ""),
                "–" if weight is None else f"{weight:g}",
                f"{p.accuracy:.2f}",
                f"{p.score:.2f}",
                f"{p.repetition:.2f}",
                f"{p.degenerate:.2f}",
                "–" if p.perplexity is None else f"{p.perplexity:.2f}",
            ]
        )
    return table
