from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from ifsteer.errors import IfsteerError
from ifsteer.instructions import LANGUAGES, get_instruction
from ifsteer.prompts import BASE_QUERIES, PromptPair, build_pairs, load_queries

# Anything that would already ask for a format, a length, a case or a language.
INSTRUCTION_LIKE = re.compile(
    r"\b(lower ?case|upper ?case|capital|caps\b|json|bullet|comma|quot|title|section|highlight"
    r"|sentence|paragraph|words?\b|short|brief|concise|long\b|lengthy|detail|verbose|english"
    r"|language|markdown|format|list\b|asterisk|yes or no)",
    re.IGNORECASE,
)
LANGUAGE_NAMES = re.compile(r"\b(" + "|".join(LANGUAGES.values()) + r")\b", re.IGNORECASE)


def test_base_queries_are_many_and_unique() -> None:
    assert len(BASE_QUERIES) >= 150
    assert len({query.lower() for query in BASE_QUERIES}) == len(BASE_QUERIES)


@pytest.mark.parametrize("query", BASE_QUERIES)
def test_base_query_carries_no_instruction(query: str) -> None:
    assert INSTRUCTION_LIKE.search(query) is None
    assert LANGUAGE_NAMES.search(query) is None
    assert query == query.strip() and "\n" not in query
    assert query[-1] in ".?"
    assert len(re.findall(r"[.?!](?:\s|$)", query)) <= 2


def test_build_pairs_differ_exactly_by_an_appended_phrasing() -> None:
    instruction = get_instruction("punctuation:no_comma")
    for pair in build_pairs(instruction, 40):
        assert pair.without_instruction in BASE_QUERIES
        prefix = pair.without_instruction + " "
        assert pair.with_instruction.startswith(prefix)
        assert pair.with_instruction[len(prefix) :] in instruction.phrasings


def test_build_pairs_is_deterministic_per_seed() -> None:
    instruction = get_instruction("detectable_format:title")
    assert build_pairs(instruction, 30, seed=3) == build_pairs(instruction, 30, seed=3)
    assert build_pairs(instruction, 30, seed=3) != build_pairs(instruction, 30, seed=4)


def test_build_pairs_uses_distinct_queries_when_it_can() -> None:
    pairs = build_pairs(get_instruction("length:concise"), len(BASE_QUERIES))
    assert len({pair.without_instruction for pair in pairs}) == len(BASE_QUERIES)


def test_build_pairs_cycles_queries_evenly() -> None:
    queries = ["What is rust?", "Why is snow white?", "Who built Petra?"]
    pairs = build_pairs(get_instruction("length:verbose"), 7, queries=queries)
    counts = Counter(pair.without_instruction for pair in pairs)
    assert set(counts) == set(queries)
    assert sorted(counts.values()) == [2, 2, 3]


@pytest.mark.parametrize("n_pairs", [1, 5, 23, 50])
def test_build_pairs_balances_phrasings(n_pairs: int) -> None:
    instruction = get_instruction("startend:quotation")
    pairs = build_pairs(instruction, n_pairs, seed=7)
    used = Counter(p.with_instruction[len(p.without_instruction) + 1 :] for p in pairs)
    counts = [used.get(phrasing, 0) for phrasing in instruction.phrasings]
    assert sum(counts) == n_pairs
    assert max(counts) - min(counts) <= 1


def test_build_pairs_strips_queries_and_skips_blank_ones() -> None:
    pairs = build_pairs(
        get_instruction("punctuation:no_comma"), 2, queries=["  Why?  ", " ", "How?"]
    )
    assert {pair.without_instruction for pair in pairs} == {"Why?", "How?"}
    assert all("  " not in pair.with_instruction for pair in pairs)


def test_prompt_pair_fields() -> None:
    pair = PromptPair(with_instruction="Q? Be concise.", without_instruction="Q?")
    assert (pair.with_instruction, pair.without_instruction) == ("Q? Be concise.", "Q?")


@pytest.mark.parametrize(("n_pairs", "queries"), [(0, BASE_QUERIES), (-2, BASE_QUERIES), (3, ())])
def test_build_pairs_rejects_bad_arguments(n_pairs: int, queries: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        build_pairs(get_instruction("length:concise"), n_pairs, queries=queries)


def test_load_queries_from_text(tmp_path: Path) -> None:
    path = tmp_path / "queries.txt"
    path.write_text("What is rust?\n\n   Why is snow white?  \n\n", encoding="utf-8")
    assert load_queries(path) == ["What is rust?", "Why is snow white?"]


def test_load_queries_from_jsonl_prefers_the_instruction_free_prompt(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Write a poem. Use no commas.", "prompt_without_instruction": "Write a poem."},
        {"prompt": "Describe a harbor."},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    assert load_queries(path) == ["Write a poem.", "Describe a harbor."]


def test_load_queries_names_the_bad_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "Fine."}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(IfsteerError, match=r"broken\.jsonl, line 2"):
        load_queries(path)


def test_load_queries_names_a_row_without_a_prompt(tmp_path: Path) -> None:
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "No prompt field."}\n', encoding="utf-8")
    with pytest.raises(IfsteerError, match="line 1") as caught:
        load_queries(path)
    assert "\n" not in str(caught.value)


def test_load_queries_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(IfsteerError, match="absent.txt"):
        load_queries(path)


def test_load_queries_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(IfsteerError, match="no queries"):
        load_queries(path)
