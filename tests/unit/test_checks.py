"""IFEval verification: our own hand-written responses, checked against IFEval's references."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nltk
import pytest

from ifsteer import checks
from ifsteer.checks import CheckResult, check, check_row, ensure_punkt, supported_instruction_ids
from ifsteer.datasets import data_path
from ifsteer.errors import UnknownInstruction

PROMPT = "Tell me about a short trip."
END_PHRASE = "Is there anything else I can help with?"

AT_LEAST_3 = {"capital_frequency": 3, "capital_relation": "at least"}
LESS_THAN_2 = {"capital_frequency": 2, "capital_relation": "less than"}

# (instruction id, kwargs, response, strict, loose): every response is our own text.
# fmt: off
CASES = [
    ("change_case:capital_word_frequency", AT_LEAST_3,
     "The NASA and ESA teams met at CERN today.", True, True),
    ("change_case:capital_word_frequency", AT_LEAST_3,
     "The NASA team met today.", False, False),
    ("change_case:capital_word_frequency", LESS_THAN_2,
     "Only ONE word shouts here.", True, True),
    ("change_case:capital_word_frequency", LESS_THAN_2,
     "BOTH WORDS shout.", False, False),
    ("change_case:english_capital", {},
     "THE WEATHER TODAY IS SUNNY AND WARM, WITH A LIGHT BREEZE FROM THE WEST.", True, True),
    ("change_case:english_capital", {},
     "The weather today is sunny and warm, with a light breeze from the west.", False, False),
    ("change_case:english_capital", {},
     "Sure, here is my answer:\nTHE WEATHER TODAY IS SUNNY AND WARM.", False, True),
    ("change_case:english_lowercase", {},
     "the weather today is sunny and warm, with a light breeze from the west.", True, True),
    ("change_case:english_lowercase", {},
     "The Weather Today Is Sunny And Warm, With A Light Breeze From The West.", False, False),
    ("change_case:english_lowercase", {},  # lowercase, but not English
     "le temps est beau aujourd'hui et il fait chaud dans toute la ville.", False, False),
    ("change_case:english_lowercase", {},
     "Sure, here it is:\nthe weather today is sunny and warm, with a light breeze.", False, True),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Yes, I think so.", False, False),
    ("detectable_format:constrained_response", {}, "My answer is *maybe*.", False, True),
    ("detectable_format:json_format", {}, '{"city": "Paris", "days": 3}', True, True),
    ("detectable_format:json_format", {}, '```json\n{"city": "Paris", "days": 3}\n```', True, True),
    ("detectable_format:json_format", {}, "city: Paris, days: 3", False, False),
    ("detectable_format:json_format", {},
     'Here is the JSON you asked for:\n{"city": "Paris", "days": 3}', False, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nWe plan the trip.\nSection 2\nWe pack the bags.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nWe plan the trip and pack the bags.", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "* Pack light.\n* Book early.\n* Learn a few words.", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "* Pack light.\n* Book early.", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "* Pack light.\n* Book early.\n* Learn a few words.\n- That is all.", False, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "Visit the *old town* first, then walk to the *harbour*.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "Visit the *old town* first, then walk to the harbour.", False, False),
    ("detectable_format:title", {}, "<<A Day in Kyoto>>\nWe walked all day.", True, True),
    ("detectable_format:title", {}, "A Day in Kyoto\nWe walked all day.", False, False),
    ("detectable_format:title", {}, "<< >>\nWe walked all day.", False, False),
    ("punctuation:no_comma", {}, "We walked to the park and then we went home.", True, True),
    ("punctuation:no_comma", {}, "We walked to the park, and then we went home.", False, False),
    ("punctuation:no_comma", {},
     "Sure, here is my answer:\nWe walked to the park and then we went home.", False, True),
    ("punctuation:no_comma", {}, "   \n  ", False, False),  # IFEval: an empty response fails
    ("startend:end_checker", {"end_phrase": END_PHRASE},
     f"Kyoto has many temples. {END_PHRASE}", True, True),
    ("startend:end_checker", {"end_phrase": END_PHRASE}, "Kyoto has many temples.", False, False),
    ("startend:end_checker", {"end_phrase": END_PHRASE},
     f"Kyoto has many temples. {END_PHRASE}\n(Written by a model.)", False, True),
    ("startend:end_checker", {"end_phrase": END_PHRASE},
     f"Kyoto has many temples. **{END_PHRASE}**", False, True),
    ("startend:quotation", {}, '"Kyoto is lovely in spring."', True, True),
    ("startend:quotation", {}, "Kyoto is lovely in spring.", False, False),
    ("startend:quotation", {}, 'Here you go:\n"Kyoto is lovely in spring."', False, True),
    ("language:response_language", {"language": "de"},
     "Heute ist das Wetter sehr schön, und wir gehen am Nachmittag in den Park.", True, True),
    ("language:response_language", {"language": "de"},
     "Today the weather is lovely, and we walk in the park in the afternoon.", False, False),
    ("keywords:existence", {"keywords": ["harbour", "lantern"]},
     "The LANTERN glowed over the Harbour all night.", True, True),
    ("keywords:existence", {"keywords": ["harbour", "lantern"]},
     "The lantern glowed all night.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "stone"]},
     "The band played loud music on a rocky hill.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "stone"]},
     "The band played Rock music all night.", False, False),
    # punkt must know "Dr." for this to be two sentences, not three.
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith went home. He was tired.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "It rained. We stayed in. We read books.", False, False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "It rained. We stayed in.\nWe read books. Then we slept.", False, True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "It rained. We stayed in.", True, True),
]
CASE_IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

PAPER_FORMAT_IDS = {
    "change_case:capital_word_frequency", "change_case:english_capital",
    "change_case:english_lowercase", "detectable_format:constrained_response",
    "detectable_format:json_format", "detectable_format:multiple_sections",
    "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
    "detectable_format:title", "punctuation:no_comma", "startend:end_checker",
    "startend:quotation", "language:response_language",
}
# fmt: on


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "response", "strict", "loose"), CASES, ids=CASE_IDS
)
def test_hand_written_cases(instruction_id, kwargs, response, strict, loose):
    assert check(instruction_id, kwargs, PROMPT, response) == CheckResult(
        instruction_id, strict, loose
    )


def test_cases_cover_every_paper_id_with_a_pass_and_a_fail():
    ids = PAPER_FORMAT_IDS | {
        "keywords:existence",
        "keywords:forbidden_words",
        "length_constraints:number_sentences",
    }
    assert {c[0] for c in CASES if c[3]} >= ids
    assert {c[0] for c in CASES if not c[4]} >= ids
    assert any(not c[3] and c[4] for c in CASES)


def test_supported_ids_are_the_ifeval_registry():
    ids = supported_instruction_ids()
    assert ids == sorted(set(ids)) and len(ids) == 25
    assert PAPER_FORMAT_IDS <= set(ids)
    assert {"keywords:frequency", "combination:repeat_prompt"} <= set(ids)


def test_unknown_instruction_names_the_id():
    with pytest.raises(UnknownInstruction, match="detectable_format:haiku") as err:
        check("detectable_format:haiku", {}, PROMPT, "text")
    assert "\n" not in str(err.value)


def test_none_kwargs_are_dropped_and_bad_kwargs_are_our_error():
    padded = {"num_bullets": 2, "section_spliter": None, "language": None}
    assert check("detectable_format:number_bullet_lists", padded, PROMPT, "* a\n* b").strict
    assert check("punctuation:no_comma", None, PROMPT, "no commas").strict
    with pytest.raises(UnknownInstruction, match="num_bullets"):
        check("punctuation:no_comma", {"num_bullets": 2}, PROMPT, "text")


def test_check_row_keeps_the_order_of_the_ids():
    response = 'Sure, here it is:\n{"a": 1}'
    results = check_row(
        ["detectable_format:json_format", "punctuation:no_comma"], [{}, None], PROMPT, response
    )
    assert results == [
        CheckResult("detectable_format:json_format", False, True),
        CheckResult("punctuation:no_comma", False, True),
    ]
    with pytest.raises(ValueError, match="kwargs"):
        check_row(["punctuation:no_comma"], [], PROMPT, response)


def test_agrees_with_lm_eval_ifeval(monkeypatch):
    """lm-eval's IFEval task is the reference implementation of strict and loose."""
    ensure_punkt()  # lm-eval downloads punkt at import when nltk cannot find it
    monkeypatch.setattr(nltk, "download", _refuse_network)
    utils = pytest.importorskip("lm_eval.tasks.ifeval.utils")
    for instruction_id, kwargs, response, _, _ in CASES:
        example = utils.InputExample(
            key=0, instruction_id_list=[instruction_id], prompt=PROMPT, kwargs=[kwargs]
        )
        strict = utils.test_instruction_following_strict(example, response)
        loose = utils.test_instruction_following_loose(example, response)
        ours = check(instruction_id, kwargs, PROMPT, response)
        expected = (strict.follow_instruction_list[0], loose.follow_instruction_list[0])
        assert (ours.strict, ours.loose) == expected, (instruction_id, response)


def test_agrees_with_if_verifiable_entry_point():
    """The package's own evaluation, where it does not strip whitespace or think blocks."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    for instruction_id, kwargs, response, _, _ in CASES:
        if response != response.strip():
            continue  # the entry point strips the response; IFEval does not
        sample = IFEvalSample(
            key=0, prompt=PROMPT, instruction_id_list=[instruction_id], kwargs=[kwargs]
        )
        [theirs], _ = evaluate_output_for_sample("ifeval", sample, response)
        ours = check(instruction_id, kwargs, PROMPT, response)
        assert (ours.strict, ours.loose) == (theirs.strict_pass, theirs.loose_pass), (
            instruction_id,
            response,
        )


def test_think_blocks_are_judged_as_ifeval_judges_them():
    """IFEval sees the whole response; if-verifiable's entry point would drop the think block."""
    result = check(
        "change_case:english_capital", {}, PROMPT, "<think>plan it</think>\nTHE SKY IS BLUE TODAY."
    )
    assert (result.strict, result.loose) == (False, True)


def test_import_leaves_datasets_and_the_real_package_alone():
    code = (
        "import sys, ifsteer.checks\n"
        "assert 'datasets' not in sys.modules and 'if_verifiable' not in sys.modules\n"
        "from if_verifiable import evaluate_output_for_sample\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(checks.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _refuse_network(*args, **kwargs):
    raise AssertionError("network used")


def test_sentence_splitting_offline_from_a_fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("IFSTEER_HOME", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(nltk, "download", _refuse_network)
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    with pytest.raises(LookupError):
        nltk.sent_tokenize("One. Two.")

    root = ensure_punkt()

    assert root == tmp_path / "nltk_data"
    assert (root / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()
    text = "Dr. Smith met Mr. J. S. Bach at 5 p.m. on Jan. 3rd. They talked. It rained!"
    assert nltk.sent_tokenize(text) == [
        "Dr. Smith met Mr. J. S. Bach at 5 p.m. on Jan. 3rd.",
        "They talked.",
        "It rained!",
    ]
    import punkt

    assert nltk.sent_tokenize(text) == punkt.sent_tokenize(text)
    assert nltk.word_tokenize("It rained. We stayed in.")[:3] == ["It", "rained", "."]
    nltk.tokenize._get_punkt_tokenizer.cache_clear()


def test_ensure_punkt_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("IFSTEER_HOME", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = ensure_punkt()
    files = sorted((root / "tokenizers" / "punkt_tab" / "english").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert ensure_punkt() == root
    assert nltk.data.path.count(str(root)) == 1
    assert sorted((root / "tokenizers" / "punkt_tab" / "english").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


@pytest.mark.parametrize(
    "name",
    [
        "ifeval_single_instr_format.jsonl",
        "ifeval_single_keyword_include.jsonl",
        "ifeval_single_keyword_exclude.jsonl",
    ],
)
def test_every_data_row_builds_without_random_parameters(name):
    path = data_path(name)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            given = {k: v for k, v in kwargs.items() if v is not None}
            checker = checks._build_checker(instruction_id, kwargs, row["prompt"])
            args = checker.get_instruction_args()
            drawn = {k: v for k, v in (args or {}).items() if v is not None and k not in given}
            assert not drawn, (row["key"], instruction_id, drawn)
        results = check_row(
            row["instruction_id_list"], row["kwargs"], row["prompt"], "A short answer."
        )
        assert [r.instruction_id for r in results] == row["instruction_id_list"]
