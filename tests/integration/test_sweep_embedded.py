"""Sweeps and searches on the embedded model: stopping decided failures early changes no
score."""

from __future__ import annotations

import pytest

from ifsteer.calibration import SearchSpace, run_search, sweep
from ifsteer.calibration.scoring import search_log
from ifsteer.instructions import get_instruction
from ifsteer.jobs import Sampling
from ifsteer.rows import Row
from ifsteer.validation import ValidationPrompt
from ifsteer.vectors import extract_instruction, save_vectors
from tests.integration.conftest import requires_smollm2

pytestmark = pytest.mark.integration
LOWER = "change_case:english_lowercase"
ROWS = [
    Row(k, f"{q} Use only lowercase letters.", q, (LOWER,), ({},), f"v:{k}")
    for k, q in enumerate(
        [
            "List three fruits, one per line.",
            "Write a short poem about rain.",
            "Give two tips for sleeping well, as a list.",
        ]
    )
]


@requires_smollm2
def test_early_stop_on_decided_failures_keeps_every_score(smollm2, tmp_path):
    vectors = extract_instruction(smollm2, get_instruction(LOWER), [12], n_pairs=4)
    file = save_vectors(tmp_path / "lower.safetensors", [vectors[12]])
    points = [(None, None), (12, None)]
    sampling = Sampling(max_new_tokens=40)
    full = sweep(smollm2, file, ROWS, points, sampling=sampling, early_stop=False)
    early = sweep(smollm2, file, ROWS, points, sampling=sampling)
    cut = [r for r in early.responses if r["decided"]]
    assert cut, "no row was decided: the test would not exercise early stopping"
    for short, whole in zip(early.responses, full.responses, strict=True):
        assert whole["response"].startswith(short["response"])
        assert all(short["loose"]) == all(whole["loose"])
        assert not (short["decided"] and all(short["loose"]))  # only failures stop
    assert [(p.accuracy, p.score) for p in early.grid] == [(p.accuracy, p.score) for p in full.grid]
    assert (early.chosen.point, early.chosen.score) == (full.chosen.point, full.chosen.score)


@requires_smollm2
def test_a_search_stopped_early_keeps_every_score(smollm2, tmp_path):
    vectors = extract_instruction(smollm2, get_instruction(LOWER), [12], n_pairs=4)
    # The sweep's queries, each asking for lines; steering *away* from lowercase (a negative
    # additive scale) makes capitals in the middle lines, which settle a failure.
    prompts = [ValidationPrompt(row.prompt_without_instruction, "", LOWER) for row in ROWS]
    space = SearchSpace(layers=(12,), projection_scales=(), additive_scales=(-4.0,), multi_layer=0)
    options = dict(sampling=Sampling(max_new_tokens=40), batch_size=8)
    full = run_search(smollm2, LOWER, prompts, [vectors] * 3, space, **options)
    early = run_search(
        smollm2,
        LOWER,
        prompts,
        [vectors] * 3,
        space,
        early_stop=True,
        log_path=tmp_path / "early.jsonl",
        **options,
    )
    records = search_log(tmp_path / "early.jsonl").records.values()
    cut = [r for r in records if r["finish"] == "decided"]
    assert cut, "no answer was decided: the test would not exercise early stopping"
    assert all(r["point"] != "none" and not r["passed"] for r in cut)
    scores = [(r.point, r.accuracy, r.score) for r in early.results]
    assert scores == [(r.point, r.accuracy, r.score) for r in full.results]
    assert early.chosen.point == full.chosen.point
