"""Rows: loading, the experiments' rows, the validation split, and which vectors serve a row."""

from __future__ import annotations

import json

import pytest

from ifsteer.errors import EvaluationError
from ifsteer.rows import (
    Need,
    Row,
    composition_row,
    length_row,
    load_rows,
    prepare_rows,
    sentence_limit,
)
from ifsteer.splits import split_rows
from tests.unit.test_evaluation import DATA, LOWER, NO_COMMA, ifeval_row, write_jsonl

# --- loading and preparing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"instruction_id_list": []}', "'prompt' must be a non-empty string"),
        ('{"prompt": "Hi", "instruction_id_list": "x"}', "'instruction_id_list' must be a list"),
        ('{"prompt": "Hi", "instruction_id_list": ["a"], "kwargs": []}', "list of 1 objects"),
        ('{"prompt": "Hi", "instruction_id_list": [], "key": [1]}', "'key' must be a number"),
    ],
)
def test_load_rows_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ifeval_row(1)) + "\n\n" + line + "\n")
    with pytest.raises(EvaluationError, match=message) as err:
        load_rows(path)
    assert f"{path}:3" in str(err.value) and "\n" not in str(err.value)


def test_load_rows_reads_rows_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ifeval_row(k) for k in (7, 8, 9)])
    rows = load_rows(path)
    assert [r.key for r in rows] == [7, 8, 9]
    assert rows[0].instruction_id_list == (LOWER,) and rows[0].kwargs == ({},)
    assert [r.key for r in load_rows(path, limit=2)] == [7, 8]
    with pytest.raises(EvaluationError, match="no such data file"):
        load_rows(tmp_path / "missing.jsonl")


def test_repeated_keys_get_their_own_suffix(tmp_path):
    # The shared keyword sets reuse one IFEval key per word; resuming needs unique keys.
    path = write_jsonl(
        tmp_path / "d.jsonl", [ifeval_row(5), ifeval_row(5), ifeval_row(6), ifeval_row(5)]
    )
    assert [r.key for r in load_rows(path)] == [5, "5-2", 6, "5-3"]


def test_length_and_composition_rows():
    row = Row(42, "Describe a forest. No commas.", "Describe a forest.", (NO_COMMA,), ({},))
    n = sentence_limit(42)
    assert 1 <= n <= 5 and n == sentence_limit("42")
    length = length_row(row)
    assert length.prompt == f"Describe a forest. Answer in at most {n} sentence{'s' * (n > 1)}."
    assert length.instruction_id_list == ("length_constraints:number_sentences",)
    assert length.kwargs == ({"relation": "less than", "num_sentences": n + 1},)
    assert length_row(length) == length  # already an "at most" row
    both = composition_row(row)
    assert both.prompt.startswith(row.prompt + " Answer in at most")
    assert both.instruction_id_list == (NO_COMMA, "length_constraints:number_sentences")
    assert both.prompt_without_instruction == "Describe a forest."
    assert composition_row(both) == both
    assert {sentence_limit(k) for k in range(50)} == {1, 2, 3, 4, 5}


def test_prepare_rows_checks_experiment_and_rows():
    row = Row(1, "Hi. Use lowercase.", "Hi.", (LOWER,), ({},), "d.jsonl:1")
    with pytest.raises(EvaluationError, match="d.jsonl:1: the keywords_include experiment needs"):
        prepare_rows([row], "keywords_include")
    with pytest.raises(EvaluationError, match="unknown experiment 'fromat'"):
        prepare_rows([row], "fromat")
    with pytest.raises(EvaluationError, match="no checker for 'made:up'"):
        prepare_rows([Row(1, "Hi.", None, ("made:up",), ({},), "d.jsonl:1")], "format")
    with pytest.raises(EvaluationError, match="has no 'kwargs'"):
        prepare_rows([Row(1, "Hi.", None, (LOWER,), None, "d.jsonl:1")], "format")


@pytest.mark.skipif(not DATA.is_dir(), reason="shared development data not present")
@pytest.mark.parametrize(
    ("name", "experiment", "n"),
    [
        ("ifeval_single_instr_format.jsonl", "format", 163),
        ("ifeval_single_instr_format.jsonl", "composition", 163),
        ("ifeval_single_keyword_include.jsonl", "keywords_include", 86),
        ("ifeval_single_keyword_exclude.jsonl", "keywords_exclude", 117),
        ("ifeval_wo_instructions.jsonl", "length", 541),
    ],
)
def test_shared_data_files_load_and_prepare(name, experiment, n):
    rows = prepare_rows(load_rows(DATA / name), experiment)
    assert len(rows) == n and all(r.prompt_without_instruction for r in rows)


# --- which vectors serve a row ----------------------------------------------------------------

UNSERVED = "length_constraints:number_words"  # IFEval has a checker; no vector serves it
WORDS = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"


def test_needs_answer_per_instruction_with_negation_for_forbidden_words():
    row = Row(
        1,
        "p",
        "q",
        (LOWER, UNSERVED, WORDS, FORBIDDEN),
        (
            {},
            {"num_words": 50, "relation": "less than"},
            {"keywords": ["ocean", "tide"]},
            {"forbidden_words": ["storm"]},
        ),
    )
    needs = row.needs()
    assert [n.instruction_id for n in needs] == list(row.instruction_id_list)
    assert needs[0] == Need(LOWER, ((LOWER, False),))
    assert needs[1] == Need(UNSERVED, ())
    assert needs[2].vectors == (
        ("keywords:existence:ocean", False),
        ("keywords:existence:tide", False),
    )
    assert needs[3].vectors == (("keywords:existence:storm", True),)
    assert row.vector_ids() == [
        LOWER,
        "keywords:existence:ocean",
        "keywords:existence:tide",
        "keywords:existence:storm",
    ]


def test_a_row_mixing_served_and_unserved_instructions_is_not_fully_served():
    mixed = Row(1, "p", "q", (LOWER, UNSERVED), ({}, {"num_words": 5, "relation": "less than"}))
    served = Row(2, "p", "q", (LOWER, NO_COMMA), ({}, {}))
    assert not mixed.fully_served() and mixed.vector_ids() == [LOWER]
    assert served.fully_served() and served.fully_served({LOWER, NO_COMMA})
    assert not served.fully_served({LOWER})  # one of its vectors has no file
    assert not Row(3, "p", "q", (), ()).fully_served()


def test_kwargs_that_name_no_vector_leave_the_instruction_unserved_with_the_reason():
    row = Row(1, "p", "q", ("language:response_language",), ({},), "d.jsonl:1")
    (need,) = row.needs()
    assert need.vectors == () and not row.fully_served()
    assert need.problem is not None and need.problem.startswith("d.jsonl:1: ")
    assert "lacks its 'language'" in need.problem


# --- split ------------------------------------------------------------------------------------


def _row(key, instruction=LOWER, kwargs=None):
    return Row(
        key,
        f"Question {key}. Instruction.",
        f"Question {key}.",
        (instruction,),
        (kwargs or {},),
        f"data.jsonl:{key}",
    )


def test_split_is_deterministic_disjoint_and_capped():
    rows = [_row(i) for i in range(6)] + [_row(100 + i, "punctuation:no_comma") for i in range(3)]
    rows += [_row(200, "detectable_format:title")]  # a single row: nothing to validate on
    rows += [
        _row(300 + i, "language:response_language", {"language": lang})
        for i, lang in enumerate(["de", "de", "de", "ru", "ko"])
    ]
    split = split_rows(rows, 3, seed=1)
    assert split == split_rows(list(reversed(rows)), 3, seed=1)
    validation = [r.key for group in split.validation.values() for r in group]
    evaluation = [r.key for r in split.evaluation]
    assert not set(validation) & set(evaluation)
    assert sorted(validation + evaluation) == sorted(r.key for r in rows)
    assert len(split.validation[LOWER]) == 3
    assert len(split.validation["punctuation:no_comma"]) == 1  # at most half of 3
    assert "detectable_format:title" not in split.validation
    languages = [r.kwargs[0]["language"] for r in split.validation["language:response_language"]]
    assert len(languages) == 2 and len(set(languages)) == 2  # distinct languages first
    # round-robin: the first rows of the evaluation cover every instruction
    first = {r.instruction_id_list[0] for r in split.evaluation[:4]}
    assert len(first) == 4
    assert split_rows(rows, 3, seed=2) != split
