"""The evaluation and validation sets that ship inside the package, by name.

A user who installs ifsteer from PyPI has no checkout and no data folder, yet `ifsteer eval`
and `ifsteer run-paper` need the paper's sets; so the sets are package data and a command takes
either a name from `DATASETS` or a path. Sources and licences are in NOTICE beside the files.
Torch-free: the CLI resolves names before it loads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ifsteer.errors import IfsteerError

__all__ = [
    "DATASETS",
    "EXCLUSION_WORDS",
    "INCLUSION_WORDS",
    "Dataset",
    "UnknownDataset",
    "data_path",
    "keyword_words",
    "resolve_data",
]


class UnknownDataset(IfsteerError):
    """A --data value that is neither a shipped set's name nor an existing file."""


@dataclass(frozen=True)
class Dataset:
    name: str
    filename: str
    rows: int
    description: str


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "format",
            "ifeval_single_instr_format.jsonl",
            163,
            "IFEval prompts with one format or language instruction (the paper's format set)",
        ),
        Dataset(
            "keywords-include",
            "ifeval_single_keyword_include.jsonl",
            86,
            "IFEval prompts rewritten to carry one keywords:existence instruction",
        ),
        Dataset(
            "keywords-exclude",
            "ifeval_single_keyword_exclude.jsonl",
            117,
            "IFEval prompts rewritten to carry one keywords:forbidden_words instruction",
        ),
        Dataset(
            "inclusion-validation",
            "inclusion_validation.jsonl",
            276,
            "generated questions with one word to include (keyword validation set)",
        ),
        Dataset(
            "exclusion-validation",
            "exclusion_validation.jsonl",
            276,
            "generated questions with one word to exclude (keyword validation set)",
        ),
        Dataset(
            "ifeval",
            "ifeval_full.jsonl",
            541,
            "all of IFEval, with each prompt's request stripped of its constraints",
        ),
    )
}


def data_path(filename: str) -> Path:
    """A file shipped in `ifsteer/data` (the sets above and the keyword word lists)."""
    path = Path(str(resources.files("ifsteer") / "data" / filename))
    if not path.is_file():
        raise UnknownDataset(f"ifsteer/data/{filename} is missing: reinstall ifsteer")
    return path


INCLUSION_WORDS, EXCLUSION_WORDS = "ifeval_keywords_include.txt", "ifeval_keywords_exclude.txt"


def keyword_words(lists: Sequence[str] = (INCLUSION_WORDS, EXCLUSION_WORDS)) -> list[str]:
    """Every word the keyword test sets `lists` name, lowercased, in file order: the order the
    shipped build trains them in."""
    words: dict[str, None] = {}
    for name in lists:
        for line in data_path(name).read_text("utf-8").splitlines():
            if line.strip():
                words[line.strip().lower()] = None
    return list(words)


def resolve_data(name_or_path: str | Path) -> Path:
    """A shipped set's name or a path to a jsonl file, as the file to read."""
    text = str(name_or_path)
    if text in DATASETS:
        return data_path(DATASETS[text].filename)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = ", ".join(DATASETS)
    raise UnknownDataset(f"--data {text!r} is neither a file nor a shipped set ({names})")
