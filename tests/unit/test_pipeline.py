"""`run-paper` end to end on a tiny model and a six-row data file, including resume."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from ifsteer.pipeline import (
    DEFAULTS,
    PaperConfig,
    PipelineError,
    estimate_seconds,
    plan_run,
    run_paper,
)
from ifsteer.progress import Stages
from ifsteer.vectors import load_vectors
from tests.conftest import make_tiny, tiny_llama_config

LOWER = "change_case:english_lowercase"
COMMA = "punctuation:no_comma"
LANGUAGE = "language:response_language"
FORMAT_SET = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / ("ifeval_single_instr_format.jsonl")
)

ROWS = [
    (11, "Describe a forest.", " Use only lowercase letters.", LOWER, {}),
    (12, "Plan a picnic.", " Use only lowercase letters.", LOWER, {}),
    (21, "Explain tides.", " Do not use any commas.", COMMA, {}),
    (22, "Describe rain.", " Do not use any commas.", COMMA, {}),
    (31, "Describe a city.", " Answer in German only.", LANGUAGE, {"language": "de"}),
    (32, "Describe a river.", " Answer in German only.", LANGUAGE, {"language": "de"}),
]


@pytest.fixture(scope="module")
def tiny10(tiny_tokenizer):
    return make_tiny(tiny_llama_config(layers=10), tiny_tokenizer, "tiny-llama-10")


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "format.jsonl"
    lines = [
        json.dumps(
            {
                "key": key,
                "prompt": query + instruction,
                "prompt_without_instruction": query,
                "instruction_id_list": [iid],
                "kwargs": [kwargs],
                "instruction_id_list_for_eval": [iid],
            }
        )
        for key, query, instruction, iid, kwargs in ROWS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class Recorder(Stages):
    def __init__(self):
        self.items: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.messages: list[str] = []

    @contextmanager
    def stage(self, name, items):
        self.items[name] = items
        self.done[name] = 0

        def advance(n):
            self.done[name] += n

        yield advance

    def message(self, text):
        self.messages.append(text)


def _config(data, out, **kw):
    options = dict(
        limit=None, sweep_prompts=1, layer_step=2, max_new_tokens=3, batch_size=8, n_pairs=2
    )
    options.update(kw)
    return PaperConfig(data=data, out=out, model="tiny", **options)


def _snapshot(out: Path) -> dict[str, int]:
    files = [*(out / "vectors").glob("*"), *(out / "sweeps").glob("*"), out / "responses.jsonl"]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def test_run_paper_end_to_end_then_resume_does_nothing(tiny10, data, tmp_path):
    out = tmp_path / "run"
    first = Recorder()
    report = run_paper(tiny10, _config(data, out), stages=first)
    assert report == out / "report.html" and report.is_file()

    vectors = sorted(p.name for p in (out / "vectors").glob("*.safetensors"))
    assert vectors == [
        "change_case__english_lowercase.safetensors",
        "language__response_language__de.safetensors",
        "punctuation__no_comma.safetensors",
    ]
    sweeps = sorted(p.name for p in (out / "sweeps").glob("*.json"))
    assert sweeps == [
        "change_case__english_lowercase.json",
        "language__response_language.json",
        "punctuation__no_comma.json",
    ]
    for name in sweeps:
        data_ = json.loads((out / "sweeps" / name).read_text())
        assert [p["layer"] for p in data_["grid"]] == [None, 2, 4, 6, 8]
    # every vector file carries its sweep's verdict
    for path in (out / "vectors").glob("*.safetensors"):
        loaded, default = load_vectors(path)
        assert "recommended" in loaded[default].extra["sweep"]

    split = json.loads((out / "split.json").read_text())
    validation = {k for keys in split["validation"].values() for k in keys}
    # sweeps validate on prompts from our own queries; every data row is held out
    assert validation == {
        f"validation:{LOWER}:0",
        f"validation:{COMMA}:0",
        f"validation:{LANGUAGE}:de:0",
    }
    assert sorted(split["evaluation"]) == sorted(key for key, *_ in ROWS)
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 6 * 4  # six held-out rows, four settings
    assert {r["key"] for r in responses} == set(split["evaluation"])
    assert first.done == {"extract": 3, "sweep": 3 * 5, "evaluate": 24, "report": 1}

    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["extract"]["items"] == 3 and "--limit 0" in run["full_command"]
    assert (out / "figures" / "format_overall.png").is_file()

    before = _snapshot(out)
    second = Recorder()
    run_paper(tiny10, _config(data, out), stages=second)
    assert _snapshot(out) == before  # no extraction, sweep or generation the second time
    assert second.items == {"extract": 0, "sweep": 0, "evaluate": 0, "report": 1}
    run = json.loads((out / "run.json").read_text())
    extract = run["stages"]["extract"]  # summed over both invocations
    assert (extract["items"], extract["skipped"], extract["runs"]) == (3, 3, 2)


def test_a_different_split_is_refused_on_resume(tiny10, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "split.json").write_text(json.dumps(plan_run(_config(data, out), 10).split.to_json()))
    plan_run(_config(data, out), 10)  # same options: fine
    with pytest.raises(PipelineError, match="--sweep-prompts 1"):
        plan_run(_config(data, out, sweep_prompts=2), 10)


def test_missing_data_is_a_helpful_error(monkeypatch, capsys, tmp_path):
    with pytest.raises(PipelineError, match="--data"):
        plan_run(_config(tmp_path / "nope.jsonl", tmp_path / "r"), 10)

    from ifsteer.cli import main

    monkeypatch.setattr(
        sys, "argv", ["ifsteer", "run-paper", "--data", "nope", "--out", str(tmp_path / "r")]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--data 'nope'" in err and "format" in err
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.skipif(not FORMAT_SET.is_file(), reason="needs ../shared/data")
def test_defaults_fit_the_budget_on_the_embedded_model(tmp_path):
    config = PaperConfig(**{**DEFAULTS.__dict__, "data": FORMAT_SET, "out": tmp_path / "r"})
    plan = plan_run(config, 30)  # SmolLM2-135M: 30 layers
    estimate = estimate_seconds(config, plan)
    assert sum(estimate.values()) < 90 * 60
    assert plan.sweep_layers == [10, 18, 26]  # the deep end, where this model steers
    assert len(plan.evaluation) == config.limit
    # every instruction's sweep validates on 10 prompts of our own; all 163 rows are held out
    assert len(plan.groups) == 13
    assert all(len(plan.split.validation[g]) == 10 for g in plan.groups)
    full = PaperConfig(**{**config.__dict__, "limit": None})
    assert len(plan_run(full, 30).evaluation) == 163


def test_cli_run_paper_prints_the_plan_and_finishes(monkeypatch, capsys, tmp_path, tiny10, data):
    from ifsteer.cli import main

    model_dir = tmp_path / "tiny-llama-10"
    tiny10.model.save_pretrained(model_dir)
    tiny10.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "ifsteer",
            "run-paper",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--limit",
            "0",
            "--sweep-prompts",
            "1",
            "--layer-step",
            "4",
            "--max-new-tokens",
            "2",
            "--n-pairs",
            "2",
            "--batch-size",
            "8",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Estimated time left" in printed and "--limit 0" in printed
    assert (out / "report.html").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["sweep_layers"] == [2, 6] and run["config"]["limit"] is None


def test_minutes_text_is_the_one_way_durations_are_said():
    from ifsteer.pipeline import minutes_text

    assert minutes_text(59) == "under a minute"
    assert minutes_text(600) == "10 min" and minutes_text(5399) == "90 min"
    assert minutes_text(7200) == "2.0 h"


def test_generation_is_priced_as_the_engine_decodes():
    from ifsteer.pipeline.plan import SECONDS_PER_ROW_TOKEN, SECONDS_PER_STEP, generation_seconds

    assert generation_seconds(0, 64, 64) == 0.0
    # one answer: one step per token, each with the fixed part and one row
    assert generation_seconds(1, 10, 64) == pytest.approx(
        10 * SECONDS_PER_STEP + 10 * SECONDS_PER_ROW_TOKEN + 10 * SECONDS_PER_STEP
    )
    # a full queue amortises the fixed part: per answer, batch 64 is cheaper than batch 8
    assert generation_seconds(640, 64, 64) / 640 < generation_seconds(640, 64, 8) / 640
    # twice the answers cost less than twice as much (the drain is paid once)
    assert generation_seconds(256, 64, 64) < 2 * generation_seconds(128, 64, 64)


@pytest.mark.skipif(not FORMAT_SET.is_file(), reason="needs ../shared/data")
def test_the_quick_default_is_priced_as_its_sweeps_cost(tmp_path):
    """13 sweeps × 4 points × 10 prompts × 256 tokens: the estimate stays within 30% of the
    quick run last measured on the 2-core machine (9.3 min, docs/evaluation.md), and the
    sweeps are most of it."""
    config = PaperConfig(**{**DEFAULTS.__dict__, "data": FORMAT_SET, "out": tmp_path / "r"})
    plan = plan_run(config, 30)
    estimate = estimate_seconds(config, plan, 134_515_008)
    assert plan.sweep_generations == 13 * 4 * 10
    measured = 9.3 * 60
    assert 0.7 * measured < sum(estimate.values()) < 1.3 * measured
    assert estimate["sweep"] == max(estimate.values())
    # rows whose check can fail early (capitals, commas, JSON, quotes) are priced shorter
    from ifsteer.pipeline.plan import generation_seconds

    assert estimate["sweep"] < 0.85 * generation_seconds(520, 256, 64)
    assert config.batch_size is None  # the engine sizes its batch


def test_a_query_two_sweeps_share_is_priced_as_one_unsteered_answer():
    """The engine decodes identical unsteered jobs once, whatever their checks."""
    from ifsteer.pipeline.plan import LENGTH_UNDECIDED, _sweep_work
    from ifsteer.rows import Row

    def row(query: str, instruction_id: str, kwargs: dict) -> Row:
        return Row(query, f"{query} ({instruction_id})", query, (instruction_id,), (kwargs,))

    title, lower = "detectable_format:title", "change_case:english_lowercase"
    rows = [
        row("Why is the sky blue?", title, {}),
        row("Why is the sky blue?", lower, {}),
        row("Name a fruit.", title, {}),
    ]
    answers, tokens = _sweep_work(rows, 3, 100, with_instruction=False)
    assert answers == 3 * 3 + 2
    # the shared answer runs until its undecidable title check ends, not the lowercase one's
    steered = sum(_sweep_work([r], 3, 100, with_instruction=False)[1] for r in rows)
    unsteered_alone = sum(_sweep_work([r], 0, 100, with_instruction=False)[1] for r in rows)
    assert tokens == pytest.approx(steered - unsteered_alone + 2 * LENGTH_UNDECIDED * 100)
    assert _sweep_work(rows, 3, 100, with_instruction=True)[0] == 3 * 4  # prompts all differ
