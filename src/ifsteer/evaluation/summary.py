"""The tables of a responses file, and the paper's published numbers beside which we show them.

Torch-free, so the report and the CLI read a finished run without loading a model stack. The
summary is recomputed from ``responses.jsonl`` alone, so a resumed run and a clean one report the
same numbers. Accuracy is IFEval's, prompt-level and instruction-level, strict and loose, each
with a 95% Wilson interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ifsteer.evaluation.store import done_key, read_responses
from ifsteer.rows import SETTINGS, STEERED
from ifsteer.rundir import RESPONSES, SUMMARY, write_json

__all__ = ["HEADLINE_METRIC", "PAPER_RESULTS", "summarize", "wilson_interval", "write_summary"]

Z_95 = 1.959963984540054

# The paper's published four-setting numbers (docs/method.md §6), for tables that show ours beside
# theirs: (no_instruction, steer, instruction, instruction_steer), in the metric of
# HEADLINE_METRIC. Length and composition are Phi-3 at "at most N sentences".
PAPER_RESULTS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "format": {
        "Phi-3-mini": (0.110, 0.307, 0.699, 0.773),
        "Gemma-2-2B-it": (0.129, 0.307, 0.693, 0.761),
        "Mistral-7B-Instruct": (0.067, 0.141, 0.626, 0.638),
        "Gemma-2-9B-it": (0.123, 0.307, 0.865, 0.871),
    },
    "keywords_include": {"Phi-3-mini": (0.291, 0.453, 0.895, 0.965)},
    "keywords_exclude": {"Phi-3-mini": (0.641, 0.855, 0.863, 0.932)},
    "length": {"Phi-3-mini": (0.23, 0.51, 0.75, 0.88)},
    "composition": {"Phi-3-mini": (0.031, 0.227, 0.479, 0.546)},
}
HEADLINE_METRIC: dict[str, str] = {
    "format": "prompt_loose",
    "transfer": "prompt_loose",
    "keywords_include": "prompt_strict",
    "keywords_exclude": "prompt_strict",
    "length": "prompt_loose",
    "composition": "prompt_loose",
}


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion; (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _stat(successes: int, n: int) -> dict[str, float | None]:
    if n == 0:
        return {"mean": None, "low": None, "high": None}
    low, high = wilson_interval(successes, n)
    return {"mean": successes / n, "low": low, "high": high}


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _setting_summary(records: Sequence[Mapping[str, Any]], setting: str) -> dict[str, Any]:
    strict = [list(map(bool, r["strict"])) for r in records]
    loose = [list(map(bool, r["loose"])) for r in records]
    fluency = [r.get("fluency") or {} for r in records]
    perplexities = [
        float(f["perplexity"])
        for f in fluency
        if f.get("perplexity") is not None and math.isfinite(float(f["perplexity"]))
    ]
    judged = [float(r["judge"]) for r in records if r.get("judge") is not None]
    sentences = [int(r["sentences"]) for r in records if r.get("sentences") is not None]
    n = len(records)
    return {
        "n": n,
        "prompt_strict": _stat(sum(all(s) for s in strict), n),
        "prompt_loose": _stat(sum(all(s) for s in loose), n),
        "instruction_strict": _stat(sum(map(sum, strict)), sum(map(len, strict))),
        "instruction_loose": _stat(sum(map(sum, loose)), sum(map(len, loose))),
        "fluency": {
            "repetition": _mean([float(f.get("repetition", 0.0)) for f in fluency]),
            "perplexity": statistics.median(perplexities) if perplexities else None,
            "degenerate": _mean([float(bool(f.get("degenerate"))) for f in fluency]),
        },
        "judge": _mean(judged),
        "sentences": _mean(sentences),
        "n_unsteered": sum(not r.get("vectors") for r in records) if setting in STEERED else 0,
        "n_missing_vectors": sum(bool(r.get("missing_vectors")) for r in records),
        "seconds": round(sum(float(r.get("seconds") or 0.0) for r in records), 3),
    }


def summarize(responses_jsonl_path: str | Path) -> dict[str, Any]:
    """The summary of a responses file, computed from that file alone.

    Duplicate (experiment, setting, key) records count once (the first). Accuracy is IFEval's:
    prompt-level (every instruction of the row followed) and instruction-level, strict and
    loose, each with a 95% Wilson interval; instruction-level intervals treat instructions as
    independent, as IFEval does.
    """
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for record in read_responses(responses_jsonl_path):
        key = done_key(record)
        if key not in seen:
            seen.add(key)
            records.append(record)
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_experiment.setdefault(str(record["experiment"]), []).append(record)
    experiments: dict[str, Any] = {}
    timing: dict[str, float] = {}
    for name, group in by_experiment.items():
        by_setting: dict[str, list[dict[str, Any]]] = {}
        for record in group:
            by_setting.setdefault(str(record["setting"]), []).append(record)
        order = [s for s in SETTINGS if s in by_setting] + sorted(set(by_setting) - set(SETTINGS))
        experiments[name] = {
            "n_rows": len({str(r["key"]) for r in group}),
            "settings": {s: _setting_summary(by_setting[s], s) for s in order},
            "per_instruction": _per_instruction(group, order),
            "vector_models": sorted(
                {str(v.get("model")) for r in group for v in r.get("vectors") or []}
            ),
        }
        timing[name] = round(sum(float(r.get("seconds") or 0.0) for r in group), 3)
    models = sorted({str(r.get("model")) for r in records})
    return {
        "model": ", ".join(models) if models else None,
        "experiments": experiments,
        "timing_s": timing,
    }


def _per_instruction(
    records: Sequence[Mapping[str, Any]], order: Sequence[str]
) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, list[int]]] = {}  # id -> setting -> [n, strict, loose]
    for record in records:
        for instruction_id, s, lo in zip(
            record["instruction_id_list"], record["strict"], record["loose"], strict=True
        ):
            tally = counts.setdefault(instruction_id, {}).setdefault(record["setting"], [0, 0, 0])
            tally[0] += 1
            tally[1] += bool(s)
            tally[2] += bool(lo)
    return {
        instruction_id: {
            setting: {"n": t[0], "loose": _stat(t[2], t[0]), "strict": _stat(t[1], t[0])}
            for setting in order
            if (t := by_setting.get(setting)) is not None
        }
        for instruction_id, by_setting in sorted(counts.items())
    }


def write_summary(out_dir: Path) -> dict[str, Any]:
    """Recompute summary.json from responses.jsonl; return what was written."""
    data = summarize(out_dir / RESPONSES)
    write_json(out_dir / SUMMARY, data)
    return data
