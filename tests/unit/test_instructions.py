from __future__ import annotations

import dataclasses

import pytest

from ifsteer.errors import IfsteerError, UnknownInstruction
from ifsteer.instructions import (
    FORMAT_INSTRUCTION_IDS,
    LANGUAGES,
    LENGTH_LEVELS,
    Instruction,
    custom_instruction,
    get_instruction,
    keyword_instruction,
    list_instructions,
    vector_id_for,
)

PAPER_FORMAT_IDS = (
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "detectable_format:constrained_response",
    "detectable_format:json_format",
    "detectable_format:multiple_sections",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:title",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
)

# Languages of IFEval's single-instruction response_language prompts (the paper's test set).
EVALUATED_LANGUAGES = set("ar de fa gu hi kn ko mr ne pa ru sw te ur".split())


def _assert_well_formed(instruction: Instruction, min_phrasings: int) -> None:
    assert len(set(instruction.phrasings)) == len(instruction.phrasings) >= min_phrasings
    for phrasing in instruction.phrasings:
        assert phrasing == phrasing.strip()
        assert "\n" not in phrasing
        assert phrasing[-1] in '.?!"'
    assert instruction.description.strip()


def test_format_ids_are_the_papers_twelve_in_order() -> None:
    assert FORMAT_INSTRUCTION_IDS == PAPER_FORMAT_IDS


@pytest.mark.parametrize("instruction_id", PAPER_FORMAT_IDS)
def test_format_instruction_resolves_with_varied_phrasings(instruction_id: str) -> None:
    instruction = get_instruction(instruction_id)
    assert instruction.id == instruction_id
    assert instruction.mode == "projection"
    _assert_well_formed(instruction, min_phrasings=5)


def test_constrained_response_phrasings_name_the_checked_phrases() -> None:
    for phrasing in get_instruction("detectable_format:constrained_response").phrasings:
        for answer in ("My answer is yes.", "My answer is no.", "My answer is maybe."):
            assert answer in phrasing


def test_title_phrasings_show_double_angular_brackets() -> None:
    phrasings = get_instruction("detectable_format:title").phrasings
    assert all("<<" in p and ">>" in p for p in phrasings)


def test_languages_are_19_iso_codes_covering_the_evaluated_ones() -> None:
    assert len(LANGUAGES) == 19
    assert all(len(code) == 2 and code.islower() for code in LANGUAGES)
    assert EVALUATED_LANGUAGES <= set(LANGUAGES)


@pytest.mark.parametrize("code", sorted(LANGUAGES))
def test_language_instruction_names_its_language(code: str) -> None:
    instruction = get_instruction(f"language:response_language:{code}")
    assert instruction.id == f"language:response_language:{code}"
    assert instruction.mode == "projection"
    _assert_well_formed(instruction, min_phrasings=4)
    assert all(LANGUAGES[code] in phrasing for phrasing in instruction.phrasings)


def test_length_levels_run_from_extremely_concise_to_extremely_verbose() -> None:
    assert LENGTH_LEVELS == (
        "extremely_concise",
        "concise",
        "moderate",
        "verbose",
        "extremely_verbose",
    )


@pytest.mark.parametrize("level", LENGTH_LEVELS)
def test_length_instruction_is_additive(level: str) -> None:
    instruction = get_instruction(f"length:{level}")
    assert instruction.id == f"length:{level}"
    assert instruction.mode == "additive"
    _assert_well_formed(instruction, min_phrasings=5)


def test_list_instructions_holds_every_fixed_entry_sorted() -> None:
    entries = list_instructions()
    ids = [entry.id for entry in entries]
    assert len(ids) == 12 + 19 + 5
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert set(PAPER_FORMAT_IDS) <= set(ids)
    assert all(get_instruction(entry.id) == entry for entry in entries)


def test_no_phrasing_is_shared_between_instructions() -> None:
    phrasings = [p for entry in list_instructions() for p in entry.phrasings]
    assert len(phrasings) == len(set(phrasings))


def test_instruction_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_instruction("punctuation:no_comma").mode = "additive"  # type: ignore[misc]


def test_typo_raises_unknown_instruction_with_suggestion() -> None:
    with pytest.raises(UnknownInstruction) as caught:
        get_instruction("length:consise")
    message = str(caught.value)
    assert "'length:consise'" in message
    assert "did you mean 'length:concise'" in message
    assert "ifsteer instructions" in message
    assert "\n" not in message


def test_missing_prefix_is_suggested() -> None:
    with pytest.raises(UnknownInstruction, match="change_case:english_lowercase"):
        get_instruction("english_lowercase")


def test_unknown_without_close_match_points_to_the_listing() -> None:
    with pytest.raises(UnknownInstruction) as caught:
        get_instruction("qqqq")
    assert isinstance(caught.value, IfsteerError)
    assert "did you mean" not in str(caught.value)
    assert "ifsteer instructions" in str(caught.value)


def test_unlisted_language_code_is_unknown() -> None:
    with pytest.raises(UnknownInstruction):
        get_instruction("language:response_language:xx")


def test_keyword_id_resolves_lowercased() -> None:
    instruction = get_instruction("keywords:existence:Ocean")
    assert instruction == keyword_instruction("ocean")
    assert instruction.id == "keywords:existence:ocean"
    assert instruction.mode == "additive"
    _assert_well_formed(instruction, min_phrasings=4)
    assert all('"ocean"' in phrasing for phrasing in instruction.phrasings)


@pytest.mark.parametrize("word", ["", "two words", "colon:word", "   "])
def test_keyword_instruction_rejects_non_words(word: str) -> None:
    with pytest.raises(UnknownInstruction):
        keyword_instruction(word)


def test_custom_instruction_defaults() -> None:
    instruction = custom_instruction("  Answer like a pirate.  ")
    assert instruction.id == "free:answer-like-a-pirate"
    assert instruction.phrasings == ("Answer like a pirate.",)
    assert instruction.mode == "projection"


def test_custom_instruction_keeps_given_id_and_mode() -> None:
    instruction = custom_instruction("Mention a cat.", instruction_id="cat", mode="additive")
    assert (instruction.id, instruction.mode) == ("cat", "additive")


def test_custom_instruction_slug_survives_non_latin_and_long_text() -> None:
    assert custom_instruction("用中文回答").id.startswith("free:text-")
    first = custom_instruction("Please answer " + "very " * 20 + "politely.")
    second = custom_instruction("Please answer " + "very " * 20 + "calmly.")
    assert first.id != second.id
    assert len(first.id) <= len("free:") + 48 + 9


@pytest.mark.parametrize(
    ("text", "mode"), [("", "projection"), ("   ", "projection"), ("Be kind.", "sideways")]
)
def test_custom_instruction_rejects_bad_input(text: str, mode: str) -> None:
    with pytest.raises(IfsteerError):
        custom_instruction(text, mode=mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("instruction_id", PAPER_FORMAT_IDS)
def test_vector_id_for_format_is_itself(instruction_id: str) -> None:
    assert vector_id_for(instruction_id, {}) == instruction_id


def test_vector_id_for_language() -> None:
    assert (
        vector_id_for("language:response_language", {"language": "fr"})
        == "language:response_language:fr"
    )


def test_vector_id_for_ignores_null_kwargs_of_hf_rows() -> None:
    kwargs = {"language": "de", "keywords": None, "num_bullets": None}
    assert vector_id_for("language:response_language", kwargs) == "language:response_language:de"


def test_vector_id_for_keywords() -> None:
    assert vector_id_for("keywords:existence", {"keywords": ["ocean", "Tide"]}) == [
        "keywords:existence:ocean",
        "keywords:existence:tide",
    ]
    assert vector_id_for("keywords:existence", {"keywords": ["ocean"]}) == (
        "keywords:existence:ocean"
    )


def test_vector_id_for_forbidden_words_gives_inclusion_ids() -> None:
    assert vector_id_for("keywords:forbidden_words", {"forbidden_words": ["BC", "culture"]}) == [
        "keywords:existence:bc",
        "keywords:existence:culture",
    ]


def test_vector_id_for_sentence_limit() -> None:
    def served(limit: int) -> str | list[str]:
        kwargs = {"relation": "less than", "num_sentences": limit}
        return vector_id_for("length_constraints:number_sentences", kwargs)

    assert [served(n) for n in (2, 3, 4, 6)] == [
        "length:extremely_concise",
        "length:extremely_concise",
        "length:concise",
        "length:concise",
    ]
    with pytest.raises(UnknownInstruction, match="at least"):
        vector_id_for(
            "length_constraints:number_sentences", {"relation": "at least", "num_sentences": 6}
        )


@pytest.mark.parametrize(
    "instruction_id", ["detectable_content:postscript", "combination:two_responses", "nonsense"]
)
def test_vector_id_for_unserved_id_raises(instruction_id: str) -> None:
    with pytest.raises(UnknownInstruction, match=instruction_id):
        vector_id_for(instruction_id, {})


@pytest.mark.parametrize(
    ("instruction_id", "kwargs"),
    [
        ("language:response_language", {}),
        ("language:response_language", None),
        ("keywords:existence", {"keywords": []}),
        ("keywords:forbidden_words", {"forbidden_words": "ocean"}),
    ],
)
def test_vector_id_for_malformed_kwargs_raise(instruction_id: str, kwargs: dict | None) -> None:
    with pytest.raises(IfsteerError):
        vector_id_for(instruction_id, kwargs)
