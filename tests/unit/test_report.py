"""The report renders from hand-written run files: images embedded, text escaped, no links."""

from __future__ import annotations

import json
import re

import pytest

from ifsteer.errors import IfsteerError
from ifsteer.report import ReportError, render_report

NASTY = 'if a < b && c > "d" then <script>alert(1)</script>'
SETTINGS = ("no_instruction", "steer", "instruction", "instruction_steer")
LOWER = "change_case:english_lowercase"
COMMA = "punctuation:no_comma"


def _stat(mean, n=2):
    return {"mean": mean, "low": max(0.0, mean - 0.3), "high": min(1.0, mean + 0.3)}


def _setting(mean):
    return {
        "n": 2,
        "prompt_strict": _stat(mean),
        "prompt_loose": _stat(mean),
        "instruction_strict": _stat(mean),
        "instruction_loose": _stat(mean),
        "fluency": {"repetition": 0.1, "perplexity": 3.2, "degenerate": 0.0},
        "judge": None,
        "n_unsteered": 0,
        "seconds": 12.0,
    }


SUMMARY = {
    "model": "tiny-llama",
    "experiments": {
        "format": {
            "n_rows": 2,
            "settings": {
                s: _setting(m) for s, m in zip(SETTINGS, (0.0, 0.5, 0.5, 1.0), strict=True)
            },
            "per_instruction": {
                iid: {
                    s: {"n": 1, "loose": _stat(m), "strict": _stat(m)}
                    for s, m in zip(SETTINGS, means, strict=True)
                }
                for iid, means in ((LOWER, (0.0, 1.0, 1.0, 1.0)), (COMMA, (0.0, 0.0, 0.0, 1.0)))
            },
        }
    },
    "timing_s": {"format": 48.0},
}


def _response(key, iid, setting, text, passed):
    steered = setting in ("steer", "instruction_steer")
    return {
        "experiment": "format",
        "setting": setting,
        "key": key,
        "instruction_id_list": [iid],
        "kwargs": [{}],
        "prompt": f"Question {key} & more" + (" (instr)" if "instr" in setting else ""),
        "response": text,
        "strict": [passed],
        "loose": [passed],
        "vectors": [{"instruction_id": iid, "layer": 6, "mode": "projection", "weight": 1.0}]
        if steered
        else [],
        "fluency": {"repetition": 0.0, "perplexity": 3.0, "degenerate": False},
        "judge": None,
        "model": "tiny-llama",
    }


SWEEP = {
    "instruction_id": LOWER,
    "model": "tiny-llama",
    "with_instruction": False,
    "mode": "projection",
    "grid": [
        {
            "layer": layer,
            "weight": None,
            "accuracy": acc,
            "score": score,
            "n": 2,
            "fluency": {"repetition": 0.1, "perplexity": None, "degenerate": deg},
        }
        for layer, acc, score, deg in (
            (None, 0.0, 0.0, 0.0),
            (2, 0.5, 0.5, 0.0),
            (4, 1.0, 0.0, 1.0),
            (6, 0.5, 0.5, 0.0),
        )
    ],
    "chosen": {"layer": 2, "weight": None, "score": 0.5, "recommended": True},
    "rows": ["7", "8"],
}


@pytest.fixture()
def run_dir(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    records = [
        _response(1, LOWER, s, NASTY if s == "steer" else f"answer {s}", s != "no_instruction")
        for s in SETTINGS
    ] + [_response(2, COMMA, s, "plain, text", s == "instruction_steer") for s in SETTINGS]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "change_case__english_lowercase.json").write_text(json.dumps(SWEEP))
    no_win = {
        **SWEEP,
        "instruction_id": COMMA,
        "chosen": {"layer": None, "weight": None, "score": 0.0, "recommended": False},
    }
    (tmp_path / "sweeps" / "punctuation__no_comma.json").write_text(json.dumps(no_win))
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "config": {"limit": 2, "max_new_tokens": 8},
                "stages": {"extract": {"seconds": 3.0, "items": 2}},
                "full_command": "ifsteer run-paper --limit 0",
            }
        )
    )
    (tmp_path / "split.json").write_text(
        json.dumps({"per_group": 1, "seed": 0, "validation": {LOWER: [7, 8]}, "evaluation": [1, 2]})
    )
    return tmp_path


def test_report_is_self_contained(run_dir):
    page_path = render_report(run_dir)
    assert page_path == run_dir / "report.html"
    page = page_path.read_text(encoding="utf-8")
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 3  # overall, per instruction, sweeps
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"https?://", page)
    assert "<link" not in page and "<script" not in page
    assert re.search(r'(?:href|src)="(?!data:)', page) is None
    for name in ("format_overall.png", "format_per_instruction.png", "sweeps.png"):
        assert (run_dir / "figures" / name).read_bytes().startswith(b"\x89PNG")


def test_examples_are_escaped_and_complete(run_dir):
    page = render_report(run_dir).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt; b &amp;&amp; c &gt; &quot;d&quot;" in page
    assert "Question 1 &amp; more" in page
    for label in ("no instruction", "steer", "instruction + steer"):
        assert label in page
    assert "steered at L6" in page
    assert "no steering (not recommended)" in page and "layer 2" in page
    assert "Published numbers for other" in page and "Gemma-2-9B-it" in page
    assert "ifsteer run-paper --limit 0" in page


def test_a_run_without_summary_is_one_clear_error(tmp_path):
    with pytest.raises(ReportError) as err:
        render_report(tmp_path)
    message = str(err.value)
    assert "summary.json" in message and "\n" not in message
    assert isinstance(err.value, IfsteerError)
    with pytest.raises(ReportError, match="no such run directory"):
        render_report(tmp_path / "missing")


def test_cli_report_errors_in_one_line(monkeypatch, capsys, tmp_path):
    import sys

    from ifsteer.cli import main

    monkeypatch.setattr(sys, "argv", ["ifsteer", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "summary.json" in err and "\n" not in err


def test_report_without_responses_or_sweeps(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    page = render_report(tmp_path).read_text(encoding="utf-8")
    assert "No responses recorded" in page and "Layer sweeps" not in page
