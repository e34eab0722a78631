"""The rebuild of calibrated vectors: pending files first, search, verify, resume."""

from __future__ import annotations

import pytest

from ifsteer.calibration import SearchSpace
from ifsteer.shipped import build, file_name, read_calibrated, shipped_ids
from ifsteer.shipped.build import Builder

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
