"""A run directory as one self-contained HTML page (its figures come from `figures`).

`render_report(run_dir)` reads what evaluation and calibration leave there (`summary.json`,
`responses.jsonl`, `sweeps/*.json`, and the pipeline's `run.json` / `split.json` if present)
and writes `report.html` next to them and the figures under `figures/`:

- the four settings side by side with 95% intervals, per experiment (like the paper's figure),
  with the paper's published numbers for *other* models in a small table beside ours;
- the same four bars for every instruction;
- the layer-sweep curves (accuracy, fluency-filtered score and degenerate share per layer);
- a table of examples: the query, and the answers unsteered and steered, without and with the
  instruction text, each marked pass or fail.

The page embeds its PNGs as data URIs and carries its CSS inline: it opens offline, can be
mailed as one file, and links to nothing outside itself.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ifsteer.errors import IfsteerError
from ifsteer.evaluation.store import read_responses
from ifsteer.evaluation.summary import HEADLINE_METRIC, PAPER_RESULTS
from ifsteer.report.figures import (
    SETTING_LABELS,
    plot_overall,
    plot_per_instruction,
    plot_sweeps,
)
from ifsteer.rundir import FIGURES, REPORT, RESPONSES, RUN, SPLIT, SUMMARY, SWEEPS

__all__ = ["ReportError", "render_report"]

EXAMPLES_PER_INSTRUCTION = 2
MAX_EXAMPLES = 40


class ReportError(IfsteerError):
    """A run directory that holds nothing to report."""


# --- reading the run ------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it as JSON ({exc})") from None


def _read_run(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    summary_path = run_dir / SUMMARY
    if not summary_path.is_file():
        raise ReportError(
            f"{run_dir} has no summary.json: run `ifsteer eval --out {run_dir}` or "
            f"`ifsteer run-paper --out {run_dir}` first"
        )
    summary = _read_json(summary_path)
    if not isinstance(summary, dict) or not isinstance(summary.get("experiments"), dict):
        raise ReportError(f"{summary_path}: not an ifsteer summary (no 'experiments')")
    responses: list[dict[str, Any]] = []
    responses_path = run_dir / RESPONSES
    if responses_path.is_file():
        responses = read_responses(responses_path)
    sweeps = []
    for path in sorted((run_dir / SWEEPS).glob("*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and "grid" in data and "chosen" in data:
            sweeps.append(data)
    optional = {
        name: _read_json(run_dir / file)
        for name, file in (("run", RUN), ("split", SPLIT))
        if (run_dir / file).is_file()
    }
    return {"summary": summary, "responses": responses, "sweeps": sweeps, **optional}


# --- HTML -----------------------------------------------------------------------------------


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom:
  1px solid #ddd; padding-bottom: .2rem; } h3 { margin-top: 1.4rem; }
.meta { color: #555; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; }
th, td { border: 1px solid #ddd; padding: .3rem .55rem; vertical-align: top; text-align: left; }
th { background: #f4f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: .4rem 0; }
.note { background: #fffbe6; border: 1px solid #f0e0a0; padding: .5rem .8rem; font-size: .88rem; }
.other { color: #666; } .other caption { caption-side: top; text-align: left; font-weight: 600; }
.examples td { max-width: 19rem; } .examples td.prompt { max-width: 16rem; }
.resp { white-space: pre-wrap; max-height: 14rem; overflow: auto; font-family: ui-monospace,
        SFMono-Regular, Menlo, monospace; font-size: .78rem; background: #fafafa;
        padding: .3rem; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
code { background: #f4f5f7; padding: 0 .2rem; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _pct(stat: Mapping[str, Any] | None, interval: bool = True) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.3f}"
    if interval and stat.get("low") is not None:
        text += f" <span class=meta>[{stat['low']:.2f}, {stat['high']:.2f}]</span>"
    return text


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt) if isinstance(value, int | float) else _e(value)


def _settings_table(data: Mapping[str, Any]) -> str:
    head = (
        "setting",
        "n",
        "prompt loose",
        "prompt strict",
        "instruction loose",
        "instruction strict",
        "repetition",
        "perplexity (median)",
        "degenerate",
        "unsteered rows",
        "seconds",
    )
    rows = []
    for setting, s in data["settings"].items():
        fluency = s.get("fluency") or {}
        rows.append(
            "<tr>"
            + "".join(
                [
                    f"<th>{_e(SETTING_LABELS.get(setting, setting))}</th>",
                    f"<td class=num>{_num(s.get('n'), 'd')}</td>",
                    f"<td class=num>{_pct(s.get('prompt_loose'))}</td>",
                    f"<td class=num>{_pct(s.get('prompt_strict'))}</td>",
                    f"<td class=num>{_pct(s.get('instruction_loose'), False)}</td>",
                    f"<td class=num>{_pct(s.get('instruction_strict'), False)}</td>",
                    f"<td class=num>{_num(fluency.get('repetition'))}</td>",
                    f"<td class=num>{_num(fluency.get('perplexity'), '.2f')}</td>",
                    f"<td class=num>{_num(fluency.get('degenerate'))}</td>",
                    f"<td class=num>{_num(s.get('n_unsteered'), 'd')}</td>",
                    f"<td class=num>{_num(s.get('seconds'), '.0f')}</td>",
                ]
            )
            + "</tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _paper_table(experiment: str) -> str:
    published = PAPER_RESULTS.get(experiment)
    if not published:
        return ""
    header = "".join(f"<th>{_e(SETTING_LABELS[s])}</th>" for s in SETTING_LABELS)
    body = "".join(
        f"<tr><th>{_e(model)}</th>"
        + "".join(f"<td class=num>{v:.3f}</td>" for v in values)
        + "</tr>"
        for model, values in published.items()
    )
    metric = HEADLINE_METRIC.get(experiment, "prompt_loose").replace("_", " ")
    return (
        "<table class=other><caption>Published numbers for other, larger models "
        f"(Stolfo et al. 2025, {_e(metric)}), for reference only, not this run</caption>"
        f"<tr><th>model (paper)</th>{header}</tr>{body}</table>"
    )


def _sweep_table(sweeps: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in sweeps:
        chosen = s["chosen"]
        baseline = next((p for p in s["grid"] if p["layer"] is None), None)
        layers = [p["layer"] for p in s["grid"] if p["layer"] is not None]
        verdict = (
            f"layer {chosen['layer']}"
            if chosen.get("layer") is not None
            else "no steering (not recommended)"
        )
        if chosen.get("weight") is not None:
            verdict += f", weight {chosen['weight']:g}"
        rows.append(
            f"<tr><th>{_e(s['instruction_id'])}</th><td>{_e(verdict)}</td>"
            f"<td class=num>{_num(chosen.get('score'))}</td>"
            f"<td class=num>{_num(baseline['score'] if baseline else None)}</td>"
            f"<td class=num>{len(s.get('rows') or [])}</td>"
            f"<td>{_e(', '.join(map(str, sorted(set(layers)))))}</td>"
            f"<td>{'with' if s.get('with_instruction') else 'without'}</td></tr>"
        )
    return (
        "<table><tr><th>instruction</th><th>chosen</th><th>score</th><th>no-steering score</th>"
        "<th>prompts</th><th>layers swept</th><th>instruction in prompt</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _verdict(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return ""
    ok = all(record.get("loose") or [False])
    mark = "<span class=pass>✓ pass</span>" if ok else "<span class=fail>✗ fail</span>"
    vectors = record.get("vectors") or []
    where = ", ".join(f"L{v.get('layer')}" for v in vectors)
    extra = f" <span class=meta>steered at {_e(where)}</span>" if where else ""
    if record.get("setting") in ("steer", "instruction_steer") and not vectors:
        extra = " <span class=meta>(unsteered: no vector / not recommended)</span>"
    if (record.get("fluency") or {}).get("degenerate"):
        extra += " <span class=fail>degenerate</span>"
    return f"{mark}{extra}"


def _pick_examples(
    responses: Sequence[Mapping[str, Any]], experiment: str
) -> list[dict[str, dict[str, Any]]]:
    """Per instruction, rows where steering changed the verdict first, then the others."""
    by_key: dict[str, dict[str, dict[str, Any]]] = {}
    for r in responses:
        if r.get("experiment") == experiment:
            by_key.setdefault(str(r.get("key")), {}).setdefault(str(r.get("setting")), dict(r))
    by_instruction: dict[str, list[dict[str, dict[str, Any]]]] = {}
    for settings in by_key.values():
        first = next(iter(settings.values()))
        iid = ",".join(first.get("instruction_id_list") or ["?"])
        by_instruction.setdefault(iid, []).append(settings)

    def passed(settings: Mapping[str, Any], name: str) -> bool | None:
        record = settings.get(name)
        return None if record is None else all(record.get("loose") or [False])

    def interest(settings: Mapping[str, Any]) -> tuple[int, str]:
        changed = (passed(settings, "steer") != passed(settings, "no_instruction")) + (
            passed(settings, "instruction_steer") != passed(settings, "instruction")
        )
        return (-changed, str(next(iter(settings.values())).get("key")))

    picked = []
    for iid in sorted(by_instruction):
        picked += sorted(by_instruction[iid], key=interest)[:EXAMPLES_PER_INSTRUCTION]
    return picked[:MAX_EXAMPLES]


def _examples_table(responses: Sequence[Mapping[str, Any]], experiment: str) -> str:
    picked = _pick_examples(responses, experiment)
    if not picked:
        return "<p class=meta>No responses recorded.</p>"
    head = "".join(f"<th>{_e(SETTING_LABELS[s])}</th>" for s in SETTING_LABELS)
    rows = []
    for settings in picked:
        first = next(iter(settings.values()))
        query = (settings.get("no_instruction") or settings.get("steer") or first)["prompt"]
        full = (settings.get("instruction") or settings.get("instruction_steer") or first)["prompt"]
        cells = []
        for setting in SETTING_LABELS:
            record = settings.get(setting)
            if record is None:
                cells.append("<td class=meta>–</td>")
                continue
            cells.append(
                f"<td>{_verdict(record)}<div class=resp>{_e(record.get('response', ''))}</div></td>"
            )
        ids = ", ".join(first.get("instruction_id_list") or [])
        rows.append(
            f"<tr><td class=prompt><b>{_e(ids)}</b> <span class=meta>#{_e(first.get('key'))}"
            f"</span><div class=resp>{_e(query)}</div><details><summary class=meta>with the "
            f"instruction</summary><div class=resp>{_e(full)}</div></details></td>"
            + "".join(cells)
            + "</tr>"
        )
    return "<table class=examples><tr><th>query</th>" + head + "</tr>" + "".join(rows) + "</table>"


def _run_meta(run: Mapping[str, Any] | None, split: Mapping[str, Any] | None) -> str:
    if not run and not split:
        return ""
    parts = []
    if run:
        config = run.get("config") or {}
        if config:
            parts.append(
                "<table><tr><th>option</th><th>value</th></tr>"
                + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in config.items())
                + "</table>"
            )
        stages = run.get("stages") or {}
        if stages:
            parts.append(
                "<table><tr><th>stage</th><th>seconds</th><th>items</th></tr>"
                + "".join(
                    f"<tr><td>{_e(k)}</td><td class=num>{_num(v.get('seconds'), '.0f')}</td>"
                    f"<td class=num>{_num(v.get('items'), 'd')}</td></tr>"
                    for k, v in stages.items()
                )
                + "</table>"
            )
        if run.get("full_command"):
            parts.append(
                f"<p>Full set: <code>{_e(run['full_command'])}</code>"
                + (f" (about {_e(run.get('full_estimate'))})" if run.get("full_estimate") else "")
                + "</p>"
            )
    if split:
        n_val = sum(len(v) for v in (split.get("validation") or {}).values())
        parts.append(
            f"<p class=note>Sweeps validated on {n_val} held-out rows "
            f"({_e(split.get('per_group'))} per instruction at most, never more than half of "
            f"its rows); evaluation used only the other {len(split.get('evaluation') or [])} "
            "rows. The paper validates on separate prompts; this data set has only its 163 "
            "test prompts, so it is split. Split rule and keys: <code>split.json</code>.</p>"
        )
    return "<h2>Run</h2>" + "".join(parts)


def render_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` and `run_dir/figures/*.png`; return the HTML path."""
    run_dir = Path(run_dir)
    run = _read_run(run_dir)
    summary = run["summary"]
    figures = run_dir / FIGURES
    figures.mkdir(exist_ok=True)
    model = summary.get("model") or "?"
    sections = []
    for experiment, data in summary["experiments"].items():
        if not data.get("settings"):
            continue
        overall = plot_overall(experiment, data, model, figures / f"{experiment}_overall.png")
        per = plot_per_instruction(experiment, data, figures / f"{experiment}_per_instruction.png")
        part = [
            f"<h2>{_e(experiment)}: four settings</h2>",
            f"<div class=grid><div>{_img(overall, f'{experiment} four settings')}</div>"
            f"<div>{_paper_table(experiment)}</div></div>",
            _settings_table(data),
        ]
        if per is not None:
            part += [f"<h3>Per instruction</h3>{_img(per, f'{experiment} per instruction')}"]
        part += [f"<h3>Examples</h3>{_examples_table(run['responses'], experiment)}"]
        sections.append("".join(part))
    if run["sweeps"]:
        curves = plot_sweeps(run["sweeps"], figures / "sweeps.png")
        sections.append(
            "<h2>Layer sweeps</h2><p class=meta>Loose accuracy on the validation prompts per "
            "layer (blue), the score after the fluency filter (orange: degenerate answers earn "
            "nothing, a layer where most degenerate scores 0), no steering (dashed) and the "
            "share of degenerate answers (red bars). The chosen layer is ringed; lowest layer "
            "on ties, and no steering wins unless a layer beats it.</p>"
            + _sweep_table(run["sweeps"])
            + (_img(curves, "layer sweeps") if curves else "")
        )
    timing = summary.get("timing_s") or {}
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>ifsteer report: {_e(model)}</title>
<style>{_CSS}</style></head><body>
<h1>Instruction following by activation steering: {_e(model)}</h1>
<p class=meta>Run directory <code>{_e(run_dir.name)}</code>, report written {_e(when)}.
Generation time: {_e(", ".join(f"{k} {v:.0f} s" for k, v in timing.items()) or "–")}.
Settings: <b>no instruction</b> (the query alone), <b>steer</b> (query + vector),
<b>instruction</b> (the full prompt), <b>instruction + steer</b> (both). Accuracy is IFEval's,
loose unless stated; bars show 95% Wilson intervals.</p>
{"".join(sections)}
{_run_meta(run.get("run"), run.get("split"))}
</body></html>
"""
    target = run_dir / REPORT
    target.write_text(page, encoding="utf-8")
    return target
