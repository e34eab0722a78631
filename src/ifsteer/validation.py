"""Validation prompts for calibration, built from our own base queries.

The paper validates each instruction on prompts kept apart from its test prompts. Our only test
prompts for format are IFEval's 163 rows, so calibrating on some of them would leave fewer to
report; instead a validation prompt is one of our base queries plus the arguments IFEval's
checker needs (`kwargs`). All 163 rows stay held out.

The base queries are split once, by a hash of their text, into an extraction share and a
validation share: vectors are extracted from the first (`extraction_queries`) and scored on the
second, so a calibration never rewards a vector for reproducing the prompts it was built from.

Checker arguments are fixed per instruction (`FORMAT_KWARGS`): a vector carries the instruction
without its numbers, so we validate on the value IFEval's format rows use most often (3
sections, 3 bullets, 2 highlights, the usual end phrase). Keyword vectors validate on the
shipped inclusion set, whose questions were written for their words.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ifsteer.datasets import resolve_data
from ifsteer.errors import IfsteerError
from ifsteer.instructions import EXTREMELY_CONCISE_BELOW, get_instruction
from ifsteer.prompts import BASE_QUERIES
from ifsteer.rows import Row, group_of

__all__ = [
    "FORMAT_KWARGS",
    "LENGTH_CHECKS",
    "ValidationPrompt",
    "check_for",
    "extraction_queries",
    "keyword_validation",
    "validation_prompts",
    "validation_queries",
    "validation_rows",
]

# One query in VALIDATION_SHARE goes to validation (41 of our 182), the rest to extraction.
VALIDATION_SHARE = 5

FORMAT_KWARGS: dict[str, dict[str, Any]] = {
    "change_case:capital_word_frequency": {"capital_relation": "at least", "capital_frequency": 3},
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "detectable_format:constrained_response": {},
    "detectable_format:json_format": {},
    "detectable_format:multiple_sections": {"section_spliter": "SECTION", "num_sections": 3},
    "detectable_format:number_bullet_lists": {"num_bullets": 3},
    "detectable_format:number_highlighted_sections": {"num_highlights": 2},
    "detectable_format:title": {},
    "punctuation:no_comma": {},
    "startend:end_checker": {"end_phrase": "Is there anything else I can help with?"},
    "startend:quotation": {},
}

# Length levels as IFEval sentence counts: the paper checks conciseness as "at most N
# sentences"; the other levels get the matching bound so each level has a verdict.
LENGTH_CHECKS: dict[str, dict[str, Any]] = {
    "extremely_concise": {"relation": "less than", "num_sentences": EXTREMELY_CONCISE_BELOW},
    "concise": {"relation": "less than", "num_sentences": 5},
    "moderate": {"relation": "at least", "num_sentences": 5},
    "verbose": {"relation": "at least", "num_sentences": 10},
    "extremely_verbose": {"relation": "at least", "num_sentences": 15},
}
_LENGTH_CHECK_ID = "length_constraints:number_sentences"
_LANGUAGE_PREFIX = "language:response_language:"
_LENGTH_PREFIX = "length:"
_KEYWORD_PREFIX = "keywords:existence:"


@dataclass(frozen=True)
class ValidationPrompt:
    """A query without the instruction, the instruction's text, and how IFEval checks it."""

    query: str
    instruction: str
    check_id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def with_instruction(self) -> str:
        return f"{self.query} {self.instruction}"


def _is_validation(query: str) -> bool:
    return int(hashlib.sha1(query.encode("utf-8")).hexdigest(), 16) % VALIDATION_SHARE == 0


def validation_queries() -> list[str]:
    return [q for q in BASE_QUERIES if _is_validation(q)]


def extraction_queries() -> list[str]:
    return [q for q in BASE_QUERIES if not _is_validation(q)]


def check_for(instruction_id: str) -> tuple[str, dict[str, Any]]:
    """The IFEval checker id and kwargs that verify one vector's instruction."""
    if instruction_id in FORMAT_KWARGS:
        return instruction_id, dict(FORMAT_KWARGS[instruction_id])
    if instruction_id.startswith(_LANGUAGE_PREFIX):
        code = instruction_id[len(_LANGUAGE_PREFIX) :]
        if code:  # any code IFEval's checker knows, shipped or not (`generate -i ...:fr --check`)
            return "language:response_language", {"language": code}
    if instruction_id.startswith(_LENGTH_PREFIX):
        level = instruction_id[len(_LENGTH_PREFIX) :]
        if level in LENGTH_CHECKS:
            return _LENGTH_CHECK_ID, dict(LENGTH_CHECKS[level])
    if instruction_id.startswith(_KEYWORD_PREFIX):
        return "keywords:existence", {"keywords": [instruction_id[len(_KEYWORD_PREFIX) :]]}
    raise IfsteerError(f"no validation check for {instruction_id!r}")


def validation_prompts(
    instruction_id: str, n: int = 10, *, seed: int = 0
) -> list[ValidationPrompt]:
    """`n` validation queries for one instruction, drawn without repeats, same seed same draw.

    The draw is seeded by the instruction id too, so instructions do not all share one set of
    queries (which would make one odd query weigh on every calibration).
    """
    queries = validation_queries()
    if not 1 <= n <= len(queries):
        raise IfsteerError(f"n must be in 1..{len(queries)} validation queries, got {n}")
    instruction = get_instruction(instruction_id)
    check_id, kwargs = check_for(instruction_id)
    rng = random.Random(f"{seed}:{instruction_id}")
    chosen = rng.sample(queries, n)
    return [ValidationPrompt(q, instruction.phrasings[0], check_id, kwargs) for q in chosen]


def keyword_validation(n: int = 10, *, seed: int = 0) -> list[tuple[str, ValidationPrompt]]:
    """(word, prompt) pairs from the shipped inclusion validation set, one per distinct word.

    Keywords are calibrated as one class (PAPER.md §3): one layer and weight for every word.
    """
    rows = [
        json.loads(line)
        for line in resolve_data("inclusion-validation").read_text("utf-8").splitlines()
        if line.strip()
    ]
    by_word: dict[str, dict[str, Any]] = {}
    for row in rows:
        word = str(row["kwargs"][0]["keywords"][0]).lower()
        by_word.setdefault(word, row)
    words = sorted(by_word)
    random.Random(seed).shuffle(words)
    picked = []
    for word in words[:n]:
        row = by_word[word]
        instruction = get_instruction(_KEYWORD_PREFIX + word)
        prompt = ValidationPrompt(
            row["prompt_without_instruction"],
            instruction.phrasings[0],
            "keywords:existence",
            {"keywords": [word]},
        )
        picked.append((word, prompt))
    return picked


def validation_rows(group: str, members: Sequence[Row], n: int = 10, *, seed: int = 0) -> list[Row]:
    """`n` validation rows for the sweep of `group`, as IFEval-format rows, none of `members`.

    A format group validates on its own instruction; the language group, which sweeps one
    layer for every language, on the languages its rows ask for in turn.
    """
    ids = sorted({v for row in members if group_of(row) == group for v in row.vector_ids()})
    if not ids:
        raise IfsteerError(f"no rows of {group!r} to build validation prompts for")
    rows = []
    for i, vector_id in enumerate(ids):
        share = len(range(i, n, len(ids)))  # round-robin: ids[j % len(ids)] for j < n
        prompts = validation_prompts(vector_id, share, seed=seed) if share else []
        for j, prompt in enumerate(prompts):
            rows.append(
                Row(
                    key=f"validation:{vector_id}:{j}",
                    prompt=prompt.with_instruction,
                    prompt_without_instruction=prompt.query,
                    instruction_id_list=(prompt.check_id,),
                    kwargs=(dict(prompt.kwargs),),
                    source="validation",
                )
            )
    return rows
