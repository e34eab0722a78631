"""Validation prompts: held apart from extraction, enough per instruction, checkable."""

from __future__ import annotations

import pytest

from ifsteer.checks import check
from ifsteer.errors import IfsteerError
from ifsteer.instructions import list_instructions
from ifsteer.prompts import BASE_QUERIES
from ifsteer.rows import Row
from ifsteer.validation import (
    check_for,
    extraction_queries,
    keyword_validation,
    validation_prompts,
    validation_queries,
    validation_rows,
)


def test_validation_and_extraction_queries_split_the_base_queries():
    val, ext = validation_queries(), extraction_queries()
    assert not set(val) & set(ext)
    assert sorted(val + ext) == sorted(BASE_QUERIES)
    assert len(val) >= 20 and len(ext) >= 100


@pytest.mark.parametrize("instruction", list_instructions(), ids=lambda i: i.id)
def test_every_instruction_has_ten_checkable_prompts(instruction):
    prompts = validation_prompts(instruction.id, 10)
    assert len({p.query for p in prompts}) == 10
    assert {p.query for p in prompts} <= set(validation_queries())
    assert all(p.with_instruction.endswith(instruction.phrasings[0]) for p in prompts)
    # The kwargs are complete: the checker builds without drawing anything at random.
    first = [check(p.check_id, p.kwargs, p.query, "Some answer.").loose for p in prompts[:2]]
    assert first == [
        check(p.check_id, p.kwargs, p.query, "Some answer.").loose for p in prompts[:2]
    ]


def test_draws_are_seeded_and_differ_between_instructions():
    a = validation_prompts("detectable_format:title", 10)
    assert a == validation_prompts("detectable_format:title", 10)
    assert a != validation_prompts("detectable_format:title", 10, seed=1)
    assert [p.query for p in a] != [p.query for p in validation_prompts("startend:quotation", 10)]
    with pytest.raises(IfsteerError, match="n must be"):
        validation_prompts("detectable_format:title", 1000)


def test_checks_match_the_instruction():
    assert check_for("language:response_language:de") == (
        "language:response_language",
        {"language": "de"},
    )
    assert check_for("language:response_language:fr")[1] == {"language": "fr"}  # no file ships
    assert check_for("length:concise")[0] == "length_constraints:number_sentences"
    assert check_for("keywords:existence:river") == ("keywords:existence", {"keywords": ["river"]})
    with pytest.raises(IfsteerError, match="no validation check"):
        check_for("free:whatever")


def test_keyword_validation_has_one_question_per_word():
    picked = keyword_validation(10)
    words = [w for w, _ in picked]
    assert len(set(words)) == 10
    for word, prompt in picked:
        assert prompt.kwargs == {"keywords": [word]}
        assert check(prompt.check_id, prompt.kwargs, prompt.query, f"It is {word}.").loose


def _row(key: str, iid: str, kwargs: dict) -> Row:
    return Row(key, f"Describe {key}. Follow the rule.", f"Describe {key}.", (iid,), (kwargs,))


def test_validation_rows_are_our_queries_checked_as_ifeval_checks_them():
    members = [_row("a", "startend:quotation", {}), _row("b", "startend:quotation", {})]
    rows = validation_rows("startend:quotation", members, 10, seed=0)
    assert len(rows) == 10 and {r.key for r in rows}.isdisjoint({"a", "b"})
    assert {r.prompt_without_instruction for r in rows} <= set(validation_queries())
    assert all(r.vector_ids() == ["startend:quotation"] for r in rows)
    assert all(r.prompt.startswith(r.prompt_without_instruction + " ") for r in rows)
    assert validation_rows("startend:quotation", members, 10, seed=0) == rows  # seeded
    assert validation_rows("startend:quotation", members, 10, seed=1) != rows


def test_the_language_sweep_validates_on_every_language_its_rows_ask_for():
    group = "language:response_language"
    members = [
        _row("de", group, {"language": "de"}),
        _row("it", group, {"language": "it"}),
        _row("fr", group, {"language": "ko"}),
    ]
    rows = validation_rows(group, members, 10)
    languages = [r.kwargs[0]["language"] for r in rows]
    assert sorted(set(languages)) == ["de", "it", "ko"]
    assert sorted(languages.count(code) for code in ("de", "it", "ko")) == [3, 3, 4]
    with pytest.raises(IfsteerError, match="no rows"):
        validation_rows("detectable_format:title", members, 10)
