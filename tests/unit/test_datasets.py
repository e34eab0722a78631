"""The shipped sets: every name resolves to a file with the rows it claims, unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ifsteer.datasets import DATASETS, UnknownDataset, data_path, resolve_data

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_shipped_set_has_its_rows(name: str) -> None:
    lines = resolve_data(name).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert len(rows) == DATASETS[name].rows
    assert all("prompt" in row and "instruction_id_list" in row for row in rows)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the checkout")
@pytest.mark.parametrize(
    "filename",
    [d.filename for d in DATASETS.values()]
    + ["ifeval_keywords_include.txt", "ifeval_keywords_exclude.txt"],
)
def test_shipped_files_are_the_sources_unchanged(filename: str) -> None:
    assert data_path(filename).read_bytes() == (SHARED / filename).read_bytes()


def test_a_path_passes_through(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("{}\n")
    assert resolve_data(str(path)) == path


def test_unknown_name_names_the_choices() -> None:
    with pytest.raises(UnknownDataset, match="neither a file nor a shipped set.*format"):
        resolve_data("formatt")


def test_notice_names_both_licences() -> None:
    notice = data_path("NOTICE").read_text()
    assert "Apache License 2.0" in notice and "MIT License" in notice
