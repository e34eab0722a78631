"""The report's figures, as PNGs drawn with matplotlib's Agg backend (no display needed).

Four bars per experiment (one per setting, with 95% Wilson intervals), the same per instruction,
and layer-sweep curves: accuracy, the fluency-filtered score and the degenerate share per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ifsteer.evaluation.summary import HEADLINE_METRIC

__all__ = ["draw_sweep", "plot_overall", "plot_per_instruction", "plot_sweep", "plot_sweeps"]

SETTING_LABELS = {
    "no_instruction": "no instruction",
    "steer": "steer",
    "instruction": "instruction",
    "instruction_steer": "instruction + steer",
}
SETTING_COLOURS = {
    "no_instruction": "#b0b7c3",
    "steer": "#f28e2b",
    "instruction": "#4e79a7",
    "instruction_steer": "#59a14f",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric_of(experiment: str) -> str:
    return HEADLINE_METRIC.get(experiment, "prompt_loose")


def _errors(stats: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    low, high = [], []
    for s in stats:
        mean = s.get("mean")
        if mean is None:
            low.append(0.0)
            high.append(0.0)
            continue
        low.append(max(0.0, mean - (s.get("low") if s.get("low") is not None else mean)))
        high.append(max(0.0, (s.get("high") if s.get("high") is not None else mean) - mean))
    return [low, high]


def plot_overall(experiment: str, data: Mapping[str, Any], model: str, path: Path) -> Path:
    """Four bars (one per setting) of the headline metric, with 95% Wilson intervals."""
    plt = _pyplot()
    metric = _metric_of(experiment)
    settings = list(data["settings"])
    stats = [data["settings"][s][metric] for s in settings]
    means = [s["mean"] or 0.0 for s in stats]
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=120)
    try:
        bars = ax.bar(
            [SETTING_LABELS.get(s, s) for s in settings],
            means,
            color=[SETTING_COLOURS.get(s, "#999999") for s in settings],
            yerr=_errors(stats),
            capsize=5,
            edgecolor="#333333",
            linewidth=0.6,
        )
        for bar, mean, s, stat in zip(bars, means, settings, stats, strict=True):
            n = data["settings"][s].get("n", "")
            top = max(mean, stat.get("high") or 0.0)
            ax.annotate(
                f"{mean:.2f}\nn={n}",
                (bar.get_x() + bar.get_width() / 2, top),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, 1.18)
        ax.set_ylabel(metric.replace("_", " ") + " accuracy")
        ax.set_title(
            f"{experiment}: {model}  ({data.get('n_rows', '?')} prompts, 95% CI)", fontsize=10
        )
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _short(instruction_id: str) -> str:
    return instruction_id.split(":", 1)[-1].replace("_", " ")


def plot_per_instruction(experiment: str, data: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars: for every instruction, its loose accuracy in each setting, with 95% CIs."""
    per = data.get("per_instruction") or {}
    if not per:
        return None
    plt = _pyplot()
    settings = [s for s in SETTING_LABELS if any(s in v for v in per.values())]
    settings += sorted({s for v in per.values() for s in v} - set(settings))
    ids = sorted(per)
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(ids) + 2), 4.4), dpi=120)
    try:
        for k, setting in enumerate(settings):
            stats = [per[i].get(setting, {}).get("loose", {"mean": None}) for i in ids]
            xs = [j + (k - (len(settings) - 1) / 2) * width for j in range(len(ids))]
            ax.bar(
                xs,
                [s.get("mean") or 0.0 for s in stats],
                width,
                yerr=_errors(stats),
                capsize=2,
                error_kw={"elinewidth": 0.7},
                color=SETTING_COLOURS.get(setting, "#999999"),
                label=SETTING_LABELS.get(setting, setting),
                edgecolor="#333333",
                linewidth=0.4,
            )
        counts = [max((v.get("n", 0) for v in per[i].values()), default=0) for i in ids]
        ax.set_xticks(range(len(ids)))
        ax.set_xticklabels(
            [f"{_short(i)}\n(n={n})" for i, n in zip(ids, counts, strict=True)],
            rotation=40,
            ha="right",
            fontsize=7.5,
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("loose accuracy")
        ax.set_title(f"{experiment}: per instruction (95% CI)", fontsize=10, pad=22)
        ax.legend(
            fontsize=8,
            ncol=len(settings),
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            frameon=False,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_sweeps(sweeps: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Every sweep's curve, small multiples in one figure."""
    if not sweeps:
        return None
    plt = _pyplot()
    cols = min(3, len(sweeps))
    rows = math.ceil(len(sweeps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.1 * rows), dpi=100, squeeze=False)
    try:
        for ax in list(axes.flat)[len(sweeps) :]:
            ax.axis("off")
        seen: dict[str, Any] = {}
        for ax, data in zip(axes.flat, sweeps, strict=False):
            for handle in draw_sweep(ax, data, legend=False):
                label = handle.get_label()
                seen.setdefault("chosen layer" if label.startswith("chosen") else label, handle)
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="lower center",
            ncol=len(seen),
            fontsize=8,
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def draw_sweep(ax: Any, data: Mapping[str, Any], *, legend: bool = True) -> list[Any]:
    """Accuracy and the fluency-filtered score vs layer on `ax`, the degenerate share as bars on
    a twin axis. "No steering" sits at the left, at x "none", with a dashed line at its score
    (what a layer must beat); the chosen point is ringed. One accuracy line per weight.
    Returns the legend handles (of both axes)."""
    grid = data["grid"]
    steered = [p for p in grid if p["layer"] is not None]
    baseline = next((p for p in grid if p["layer"] is None), None)
    layers = sorted({p["layer"] for p in steered})
    gap = min((b - a for a, b in zip(layers, layers[1:], strict=False)), default=2)
    none_x = (layers[0] - gap) if layers else 0
    weights = sorted({p["weight"] for p in steered}, key=lambda w: (w is None, w or 0.0))
    colours = ["#1f77b4", "#9467bd", "#2ca02c", "#8c564b", "#e377c2", "#17becf"]
    for i, weight in enumerate(weights):
        points = sorted((p for p in steered if p["weight"] == weight), key=lambda p: p["layer"])
        label = "accuracy" if weight is None else f"accuracy, w={weight:g}"
        ax.plot(
            [p["layer"] for p in points],
            [p["accuracy"] for p in points],
            "o-",
            color=colours[i % len(colours)],
            label=label,
        )
        if len(weights) == 1:
            ax.plot(
                [p["layer"] for p in points],
                [p["score"] for p in points],
                "s:",
                color="#ff7f0e",
                label="score (fluency-filtered)",
                markersize=4,
            )
    if baseline is not None:
        ax.axhline(
            baseline["score"],
            color="grey",
            linestyle="--",
            linewidth=1,
            label="no steering (score)",
        )
        ax.plot([none_x], [baseline["accuracy"]], "o", color="grey")
        ax.plot([none_x], [baseline["score"]], "s", color="#ff7f0e", markersize=4)
    chosen = data["chosen"]
    if chosen.get("layer") is not None:
        ax.plot(
            [chosen["layer"]],
            [chosen["score"]],
            "o",
            markersize=14,
            fillstyle="none",
            color="crimson",
            label=f"chosen: layer {chosen['layer']}",
        )
    ax.set_ylim(-0.05, 1.05)
    ticks = ([none_x] if baseline is not None else []) + layers
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        (["none"] if baseline is not None else []) + [str(la) for la in layers], fontsize=7
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("loose accuracy")
    handles = ax.get_legend_handles_labels()[0]
    title = data["instruction_id"]
    if chosen.get("layer") is None:
        title += "  (no steering wins)"
    ax.set_title(title, fontsize=9)
    twin = ax.twinx()
    worst: dict[float, float] = {}
    for p in grid:
        x = none_x if p["layer"] is None else p["layer"]
        worst[x] = max(worst.get(x, 0.0), p["fluency"]["degenerate"])
    twin.bar(
        list(worst),
        list(worst.values()),
        width=0.4 * gap,
        alpha=0.18,
        color="red",
        label="degenerate share",
    )
    twin.set_ylim(0, 1.0)
    twin.set_ylabel("degenerate share", color="#b22222", fontsize=8)
    twin.tick_params(axis="y", labelsize=7, colors="#b22222")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    handles += twin.get_legend_handles_labels()[0]
    if legend:
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    return handles


def plot_sweep(data: Mapping[str, Any], path: str | Path) -> Path:
    """One sweep as a PNG (Agg backend, no display needed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    try:
        draw_sweep(ax, data)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
