"""The rebuild of calibrated vectors: pending files first, search, verify, resume."""

from __future__ import annotations

import json

import pytest

from ifsteer.calibration import SearchSpace
from ifsteer.calibration.scoring import search_log
from ifsteer.shipped import build, file_name, read_calibrated, shipped_ids
from ifsteer.shipped.build import Builder
from ifsteer.validation import validation_prompts

LANGS = ["language:response_language:de", "language:response_language:it"]


@pytest.fixture()
def builder(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setitem(build.TOKENS, "language", 3)
    monkeypatch.setitem(build.N_PAIRS, "language", 4)
    b = Builder(
        tiny_lm, None, tmp_path / "out", tmp_path / "work", n_prompts=3, seed=0, batch_size=16
    )
    b.space = SearchSpace(
        layers=(1, 3), projection_scales=(2.0,), additive_scales=(1.0,), multi_layer=2
    )
    return b


def test_quick_build_searches_one_language_verifies_the_next_and_resumes(builder, monkeypatch):
    builder.run(["language"], only=LANGS, quick=True)
    assert shipped_ids(directory=builder.out) == sorted(LANGS)
    first, second = (read_calibrated(builder.out / file_name(i)).calibration for i in LANGS)
    assert first["status"] == "searched" and second["status"] == "verified"
    assert second["point"] == first["point"]  # the group's point, scored on its own prompts
    assert first["validation"]["n_prompts"] == second["validation"]["n_prompts"] == 3
    # The unsteered answers of the second language came from the first one's log where the
    # queries overlap, so its log holds the same record for such a query.
    calls = []
    monkeypatch.setattr(build, "run_search", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(build, "verify_point", lambda *a, **k: calls.append(a))
    builder.run(["language"], only=LANGS, quick=True)
    assert calls == []


def test_pending_files_ship_before_any_search(builder):
    builder.pending(LANGS[0], "language")
    shipped = read_calibrated(builder.out / file_name(LANGS[0]))
    assert shipped.calibration["status"] == "pending" and not shipped.recommended
    assert [v.layer for v in shipped.vectors] == [builder.lm.n_layers // 3]
    assert builder.status(LANGS[1]) == "missing"


def _logged_baseline(path, prompts, response):
    """A log of unsteered answers to `prompts`, as an earlier search wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, p in enumerate(prompts):
            record = {"point": "none", "prompt": i, "query": p.query, "response": response}
            record |= {"passed": False, "strict": False, "repetition": 0.0, "perplexity": 1.0}
            record |= {"max_new_tokens": build.TOKENS["language"], "with_instruction": False}
            f.write(json.dumps(record) + "\n")


def test_each_setting_logs_apart_and_reuses_only_its_own_unsteered_answers(tiny_lm, tmp_path):
    prompts = validation_prompts(LANGS[0], 3, seed=0)
    work = tmp_path / "work"
    _logged_baseline(work / "other.jsonl", prompts, "as run to the end on HF")
    _logged_baseline(work / "other.vllm.jsonl", prompts, "on vLLM")
    (work / "answers-160.jsonl").write_text('{"query": "q", "text": "t", "finished": true}\n')
    answers = {}
    for backend, early_stop in (("hf", False), ("vllm", False), ("hf", True)):
        b = Builder(
            tiny_lm, None, tmp_path / "out", work, n_prompts=3, seed=0, batch_size=4,
            backend=backend, early_stop=early_stop,
        )  # fmt: skip
        b.prefill_baseline(LANGS[1], prompts, "language")
        log = search_log(b.log_path(LANGS[1]))
        answers[b.log_path(LANGS[1]).name] = {r["response"] for r in log.records.values()}
    assert answers == {
        "language__response_language__it.jsonl": {"as run to the end on HF"},
        "language__response_language__it.vllm.jsonl": {"on vLLM"},
        "language__response_language__it.early.jsonl": set(),  # none logged early yet
    }


def test_an_early_stopping_build_searches_on_its_engine_into_its_own_log(builder, monkeypatch):
    from ifsteer.batcher import Batcher

    submitted = []  # language checks are never decided early: the decider is test_search's

    def engine(*args, **kwargs):
        queue = Batcher(*args, **kwargs)
        submit = queue.submit
        queue.submit = lambda job: submitted.append(job) or submit(job)
        return queue

    searched = []
    search = build.run_search
    monkeypatch.setattr(build, "run_search", lambda *a, **k: searched.append(k) or search(*a, **k))
    builder.engine, builder.early_stop, builder.setting = engine, True, ".early"
    builder.space = SearchSpace(
        layers=(1,), projection_scales=(), additive_scales=(), multi_layer=0, try_generated=False
    )
    builder.run(["language"], only=LANGS[:1])
    name = "language__response_language__de"
    assert (builder.work / f"{name}.early.jsonl").is_file()
    assert not (builder.work / f"{name}.jsonl").exists()
    assert (builder.work / f"{name}.early.summary.json").is_file()
    assert len(submitted) == 3 * 2  # no steering and layer 1, each on 3 prompts
    assert [(k["engine"], k["early_stop"]) for k in searched] == [(engine, True)]


def test_a_trained_build_holds_the_keyword_class_competition_over_its_searched_words(
    builder, monkeypatch
):
    """`vectors build --groups keywords --trained`: one class competition over the word files
    a search has calibrated (a pending word is left out), then the shipping of its winner;
    `--only` without the class leaves the keywords alone."""
    from ifsteer.instructions import keyword_instruction
    from ifsteer.training import TrainConfig

    monkeypatch.setattr(build, "keyword_words", lambda: ["ocean", "river"])
    monkeypatch.setitem(build.N_PAIRS, "keywords", 2)
    builder.pending(keyword_instruction("ocean").id, "keywords")
    builder.pending(keyword_instruction("river").id, "keywords")
    searched = builder.out / file_name(keyword_instruction("ocean").id)
    shipped = read_calibrated(searched)
    build.write_calibrated(
        searched, shipped.steerings(), shipped.calibration.updated(status="searched")
    )
    calls = []
    monkeypatch.setattr(build, "compete_class", lambda *a, **k: calls.append(("compete", a)))
    monkeypatch.setattr(build, "ship_class", lambda *a, **k: calls.append(("ship", a)) or 0)
    config = TrainConfig(layers=(1,))
    builder.trained(["keywords"], ["detectable_format:title"], config)
    assert calls == []
    builder.trained(["keywords"], [], config)
    (_, competed), (_, shipping) = calls
    assert competed[1] == build.KEYWORD_CLASS and competed[3] == [searched]
    assert shipping[1] == ["ocean"]
