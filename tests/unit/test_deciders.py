"""Deciders against IFEval's own checker: once decided, no continuation changes a verdict."""

from __future__ import annotations

import pytest

from ifsteer.checks import check
from ifsteer.deciders import decider, row_decider

CONTINUATIONS = [
    "",
    "\n",
    "\nthe end",
    "\nTHE END, SAID ONE",
    " and more",
    "\n\n*all*\nquiet",
    '\n"all quiet"',
    '\n{"a": 1}\n',
]
CASES = [
    # (instruction id, kwargs, a prefix that decides, a prefix that does not yet)
    ("change_case:english_lowercase", {}, "sure!\nhere is Paris\nit", "Sure! Here is"),
    ("change_case:english_capital", {}, "OK\nTHIS is IT\nNOW", "OK HERE it"),
    ("punctuation:no_comma", {}, "fine\na, b\n", "fine\na, b"),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["cat"]},
        "pets\nmy cat sleeps\n",
        "pets\nmy cat",  # may still become "cats" or the last line
    ),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "a river of stone", "a river of"),
    ("startend:quotation", {}, "Sure!\nHere it is", "Sure!\n  "),
    ("startend:quotation", {}, "Sure!\n\nIt is", '"Sure!\nIt'),
    ("detectable_format:json_format", {}, "Here is the data:\nThe city", "Here is the data:\n"),
    ("detectable_format:json_format", {}, "Sure\nno way", "Sure\nnul"),
]

PASSING = [  # answers IFEval passes, one of whose prefixes a failure decider must not stop
    ("startend:quotation", '"Paris is the capital."'),
    ("startend:quotation", 'Here you go:\n"Paris is the capital."'),
    ("startend:quotation", '*"Paris"*'),
    ("detectable_format:json_format", '{"city": "Paris", "rank": 1}'),
    ("detectable_format:json_format", 'Sure:\n```json\n{"city": "Paris"}\n```'),
    ("detectable_format:json_format", "Here it is\n[1, 2, 3]"),
    ("detectable_format:json_format", "-1.5"),
    ("detectable_format:json_format", "null"),
    ("detectable_format:json_format", "NaN"),
    ("detectable_format:json_format", 'The answer:\n"Paris"'),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "settled", "open_"), CASES)
def test_a_decided_verdict_survives_every_continuation(instruction_id, kwargs, settled, open_):
    decided = decider(instruction_id, kwargs)
    assert decided is not None
    assert decided(settled) and not decided(open_)
    verdict = check(instruction_id, kwargs, "", settled)
    for tail in CONTINUATIONS:
        later = check(instruction_id, kwargs, "", settled + tail)
        assert (later.strict, later.loose) == (verdict.strict, verdict.loose), tail


@pytest.mark.parametrize(("instruction_id", "answer"), PASSING)
def test_no_prefix_of_a_passing_answer_is_decided(instruction_id, answer):
    assert check(instruction_id, {}, "", answer).loose
    decided = decider(instruction_id, {})
    assert decided is not None
    assert not any(decided(answer[:i]) for i in range(len(answer) + 1))


def test_an_undecided_prefix_can_still_go_either_way():
    """Why line one never decides: the loose reading may drop it."""
    lowercase = "change_case:english_lowercase"
    assert check(lowercase, {}, "", "Sure!\nhere is paris, the city of light.").loose
    assert not decider(lowercase)("Sure!\nhere is paris, the city of light.")


def test_checks_that_need_the_whole_answer_have_no_decider():
    for instruction_id in (
        "startend:end_checker",
        "language:response_language",
        "length_constraints:number_words",
        "detectable_format:constrained_response",
    ):
        assert decider(instruction_id, {}) is None
    assert decider("keywords:forbidden_words", {}) is None  # nothing to look for


def test_a_row_is_decided_when_all_its_checks_are():
    both = row_decider(["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["sun"]}])
    assert both is not None
    assert not both("x\na, b\n") and not both("sun") and both("sun\na, b\n")
    assert row_decider(["punctuation:no_comma", "startend:end_checker"], [{}, {}]) is None


def test_failure_deciders_never_fire_on_a_pass():
    from ifsteer.deciders import failure, row_failure

    keywords = {"keywords": ["paris"]}
    assert decider("keywords:existence", keywords)("Paris is nice.")  # a pass, settled
    assert failure("keywords:existence", keywords) is None  # sweeps must not stop on it
    lower = failure("change_case:english_lowercase")
    assert lower is not None and lower("sure\nHere it is\n") and not lower("here it is\n")
    # a row fails as soon as any one of its checks has failed for good
    both = row_failure(["change_case:english_lowercase", "startend:end_checker"])
    assert both is not None and both("hi\nA capital\n") and not both("hi\nall lower\n")
    assert row_failure(["startend:end_checker"]) is None
