"""Rule targets: the model's own answer rewritten so that it satisfies one instruction.

A trained vector needs answers that follow the instruction, and a 135M model rarely writes them
even when asked. For most format instructions a rule can write them from the model's own
unsteered answer (lowercase it, wrap it in quotes, turn its sentences into three bullets), so
the vector learns the instruction and nothing else: the content stays the model's. Every rule's
output passes IFEval's own check with the kwargs calibration validates on
(`validation.check_for`), which `tests/unit/test_training_rules.py` holds on many answers.

A rule sees the answer as text plus whether the model finished it. Rules that change a whole
answer in place (case, commas, capital words, highlights, a title) keep its length and its end;
rules that close a structure (quotes, JSON, sections, bullets, an end phrase, a length bound)
are built from its first whole sentences and always end the turn, because a structure the model
never closes fails its check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import langdetect
import nltk

from ifsteer.checks import ensure_punkt  # also seeds langdetect, as IFEval's check runs it
from ifsteer.validation import check_for

__all__ = ["Rewrite", "has_rule", "rewrite"]


@dataclass(frozen=True)
class Rewrite:
    """A target answer and whether the turn ends after it (the target then ends with EOS)."""

    text: str
    finished: bool


Rule = Callable[[str, bool, Mapping[str, Any]], Rewrite | None]
_CLOSING_SENTENCES = 3  # how much of the answer a closed structure keeps


def sentences(text: str, finished: bool) -> list[str]:
    """Whole sentences, one line each, markdown emphasis and list marks dropped; a cut-off
    last sentence (the answer ran out of tokens) is left out."""
    ensure_punkt()
    flat = re.sub(r"[*#`_]+", "", text)
    flat = re.sub(r"^\s*(?:\d+\.|[-•])\s+", "", flat, flags=re.MULTILINE)
    found = [" ".join(s.split()) for s in nltk.sent_tokenize(flat)]
    found = [s for s in found if re.search(r"[A-Za-z]", s)]
    if found and not finished and not re.search(r"[.!?][\"')\]]*$", found[-1]):
        found.pop()
    return found


def _in_place(change: Callable[[str], str]) -> Rule:
    def rule(text: str, finished: bool, _kwargs: Mapping[str, Any]) -> Rewrite | None:
        changed = change(text.strip())
        return Rewrite(changed, finished) if changed else None

    return rule


def _closed(build: Callable[[list[str], Mapping[str, Any]], str | None]) -> Rule:
    def rule(text: str, finished: bool, kwargs: Mapping[str, Any]) -> Rewrite | None:
        found = sentences(text, finished)
        if not found:
            return None
        built = build(found, kwargs)
        return None if built is None else Rewrite(built, True)

    return rule


def _upper_english(text: str) -> str:
    """The answer in capitals, where IFEval's language detector still reads it as English:
    langdetect takes some short capitalised English for German, and such a target would teach
    the vector an answer the check refuses."""
    shouted = text.upper()
    try:
        return shouted if langdetect.detect(shouted) == "en" else ""
    except langdetect.LangDetectException:
        return ""


def _capital_words(text: str, kwargs: Mapping[str, Any]) -> str:
    """The first long words in capitals, one more than the check asks for."""
    wanted = int(kwargs.get("capital_frequency", 3)) + 1
    done = 0

    def shout(match: re.Match[str]) -> str:
        nonlocal done
        if done >= wanted:
            return match.group(0)
        done += 1
        return match.group(0).upper()

    shouted = re.sub(r"\b[A-Za-z]{5,}\b", shout, text)
    return shouted if done >= wanted else ""


def _title(text: str) -> str:
    first = sentences(text, True)
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", first[0] if first else "")[:5]
    if not words:
        return ""
    return f"<<{' '.join(w.capitalize() for w in words)}>>\n\n{text}"


def _highlights(found: list[str], kwargs: Mapping[str, Any]) -> str | None:
    n = int(kwargs.get("num_highlights", 2))
    if len(found) < n:
        return None
    kept = found[: max(n, _CLOSING_SENTENCES)]
    return " ".join(f"*{s}*" if i < n else s for i, s in enumerate(kept))


def _json(found: list[str], _kwargs: Mapping[str, Any]) -> str:
    body = json.dumps({"answer": found[:_CLOSING_SENTENCES]}, indent=2, ensure_ascii=False)
    return f"```json\n{body}\n```"


def _sections(found: list[str], kwargs: Mapping[str, Any]) -> str | None:
    n = int(kwargs.get("num_sections", 3))
    splitter = str(kwargs.get("section_spliter", "SECTION"))
    if len(found) < n:
        return None
    kept = found[: max(n, _CLOSING_SENTENCES)]
    parts = [kept[i::n] for i in range(n)]  # round-robin keeps every section non-empty
    return "\n\n".join(f"{splitter} {i + 1}\n{' '.join(p)}" for i, p in enumerate(parts))


def _bullets(found: list[str], kwargs: Mapping[str, Any]) -> str | None:
    n = int(kwargs.get("num_bullets", 3))
    return "\n".join(f"* {s}" for s in found[:n]) if len(found) >= n else None


def _constrained(found: list[str], _kwargs: Mapping[str, Any]) -> str:
    return " ".join(["My answer is yes.", *found[:2]])


def _end_phrase(found: list[str], kwargs: Mapping[str, Any]) -> str:
    phrase = str(kwargs.get("end_phrase", "Is there anything else I can help with?"))
    return f"{' '.join(found[:_CLOSING_SENTENCES])}\n\n{phrase}"


def _quoted(found: list[str], _kwargs: Mapping[str, Any]) -> str:
    return '"' + " ".join(found[:_CLOSING_SENTENCES]).replace('"', "'") + '"'


def _at_most(found: list[str], kwargs: Mapping[str, Any]) -> str | None:
    """Whole sentences under a "less than N sentences" bound; no rule can lengthen an answer."""
    if kwargs.get("relation") != "less than":
        return None
    return " ".join(found[: int(kwargs["num_sentences"]) - 1])


_RULES: dict[str, Rule] = {
    "change_case:english_lowercase": _in_place(str.lower),
    "change_case:english_capital": _in_place(_upper_english),
    "change_case:capital_word_frequency": lambda t, f, k: (
        Rewrite(shouted, f) if (shouted := _capital_words(t.strip(), k)) else None
    ),
    "punctuation:no_comma": _in_place(lambda t: t.replace(",", "")),
    "detectable_format:title": _in_place(_title),
    "detectable_format:number_highlighted_sections": _closed(_highlights),
    "detectable_format:json_format": _closed(_json),
    "detectable_format:multiple_sections": _closed(_sections),
    "detectable_format:number_bullet_lists": _closed(_bullets),
    "detectable_format:constrained_response": _closed(_constrained),
    "startend:end_checker": _closed(_end_phrase),
    "startend:quotation": _closed(_quoted),
}
_LENGTH_PREFIX = "length:"


def has_rule(instruction_id: str) -> bool:
    if instruction_id.startswith(_LENGTH_PREFIX):
        return check_for(instruction_id)[1].get("relation") == "less than"
    return instruction_id in _RULES


def rewrite(instruction_id: str, answer: str, finished: bool) -> Rewrite | None:
    """The answer rewritten to follow the instruction, or None where this answer cannot be
    (too few sentences for three bullets). Raises KeyError for an id without a rule."""
    _check_id, kwargs = check_for(instruction_id)
    if instruction_id.startswith(_LENGTH_PREFIX):
        rule = _closed(_at_most)
    else:
        rule = _RULES[instruction_id]
    return rule(answer, finished, kwargs)
