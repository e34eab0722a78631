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
FORMAT_SET = Path(__file__).resolve().parents[3] / "shared" / "data" / (
    "ifeval_single_instr_format.jsonl"
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
        json.dumps({
            "key": key, "prompt": query + instruction, "prompt_without_instruction": query,
            "instruction_id_list": [iid], "kwargs": [kwargs],
            "instruction_id_list_for_eval": [iid],
        })
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
    options = dict(limit=None, sweep_prompts=1, layer_step=2, max_new_tokens=3, batch_size=8,
                   n_pairs=2)
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
        "change_case__english_lowercase.json", "language__response_language.json",
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
    assert len(validation) == 3 and not validation & set(split["evaluation"])
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 3 * 4  # three held-out rows, four settings
    assert {r["key"] for r in responses} == set(split["evaluation"])
    assert first.done == {"extract": 3, "sweep": 3 * 5, "evaluate": 12, "report": 1}

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
    plan_run(_config(data, out), 10)
    (out).mkdir()
    from ifsteer.rows import load_rows, split_rows

    (out / "split.json").write_text(json.dumps(split_rows(load_rows(data), 1).to_json()))
    plan_run(_config(data, out), 10)  # same options: fine
    with pytest.raises(PipelineError, match="--sweep-prompts 1"):
        plan_run(_config(data, out, sweep_prompts=0), 10)


def test_missing_data_is_a_helpful_error(monkeypatch, capsys, tmp_path):
    with pytest.raises(PipelineError, match="--data"):
        plan_run(_config(tmp_path / "nope.jsonl", tmp_path / "run"), 10)

    from ifsteer.cli import main

    monkeypatch.setattr(sys, "argv", ["ifsteer", "run-paper", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--data" in err and "ifeval_single_instr" in err


@pytest.mark.skipif(not FORMAT_SET.is_file(), reason="needs ../shared/data")
def test_defaults_fit_the_budget_on_the_embedded_model(tmp_path):
    config = PaperConfig(**{**DEFAULTS.__dict__, "data": FORMAT_SET, "out": tmp_path / "r"})
    plan = plan_run(config, 30)  # SmolLM2-135M: 30 layers
    estimate = estimate_seconds(config, plan)
    assert sum(estimate.values()) < 90 * 60
    assert plan.sweep_layers == list(range(6, 30, config.layer_step))
    assert len(plan.evaluation) == config.limit
    # the full set is the whole file minus the validation rows
    full = PaperConfig(**{**config.__dict__, "limit": None})
    full_plan = plan_run(full, 30)
    n_validation = sum(len(v) for v in full_plan.split.validation.values())
    assert len(full_plan.evaluation) + n_validation == 163


def test_cli_run_paper_prints_the_plan_and_finishes(monkeypatch, capsys, tmp_path, tiny10, data):
    from ifsteer.cli import main

    model_dir = tmp_path / "tiny-llama-10"
    tiny10.model.save_pretrained(model_dir)
    tiny10.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "ifsteer", "run-paper", "--model", str(model_dir), "--data", str(data), "--out",
        str(out), "--limit", "0", "--sweep-prompts", "1", "--layer-step", "4",
        "--max-new-tokens", "2", "--n-pairs", "2", "--batch-size", "8",
    ])
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
def test_the_quick_default_is_estimated_under_ten_minutes(tmp_path):
    config = PaperConfig(**{**DEFAULTS.__dict__, "data": FORMAT_SET, "out": tmp_path / "r"})
    estimate = estimate_seconds(config, plan_run(config, 30), 134_515_008)
    assert sum(estimate.values()) < 10 * 60
    assert config.batch_size is None  # the engine sizes its batch
