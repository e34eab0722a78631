"""The instruction catalogue: what each steering vector stands for, and how to ask for it in words.

A vector is the mean activation difference between a query with and without an instruction, so
every instruction carries several phrasings: varying the wording keeps the direction about the
instruction itself instead of one sentence. Ids follow IFEval where IFEval has one, so a vector
can be matched to the evaluation rows it serves. All phrasings are our own text.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, get_args

from ifsteer.errors import IfsteerError, UnknownInstruction
from ifsteer.phrasings import FORMAT, KEYWORD_TEMPLATES, LANGUAGE_TEMPLATES, LANGUAGES, LENGTH

Mode = Literal["projection", "additive"]
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass(frozen=True)
class Instruction:
    """One instruction: its id, the wordings used to build pairs, and how its vector is applied.

    `phrasings[0]` is the canonical wording shown to users; `mode` is the paper's default
    (projection for format and language, additive for length and keywords).
    """

    id: str
    phrasings: tuple[str, ...]
    mode: Mode
    description: str


FORMAT_INSTRUCTION_IDS: tuple[str, ...] = tuple(FORMAT)
LENGTH_LEVELS: tuple[str, ...] = tuple(LENGTH)

_LANGUAGE_PREFIX = "language:response_language:"
_LENGTH_PREFIX = "length:"
# IFEval's strict "less than": 3 is "at most two sentences", what extremely concise is checked as.
EXTREMELY_CONCISE_BELOW = 3
_KEYWORD_PREFIX = "keywords:existence:"
_KEYWORD_PATTERN = re.compile(r"[\w'-]+")
_KEYWORD_KWARGS = {"keywords:existence": "keywords", "keywords:forbidden_words": "forbidden_words"}
_SLUG_LENGTH = 48


def _format_instruction(instruction_id: str) -> Instruction:
    description, phrasings = FORMAT[instruction_id]
    return Instruction(instruction_id, phrasings, "projection", description)


def language_instruction(code: str, name: str | None = None) -> Instruction:
    name = name or LANGUAGES[code]
    phrasings = tuple(template.format(name=name) for template in LANGUAGE_TEMPLATES)
    return Instruction(_LANGUAGE_PREFIX + code, phrasings, "projection", f"Whole reply in {name}.")


def _length_instruction(level: str) -> Instruction:
    description, phrasings = LENGTH[level]
    return Instruction(_LENGTH_PREFIX + level, phrasings, "additive", description)


def _build_catalogue() -> dict[str, Instruction]:
    entries = [_format_instruction(i) for i in FORMAT_INSTRUCTION_IDS]
    entries += [language_instruction(code) for code in LANGUAGES]
    entries += [_length_instruction(level) for level in LENGTH_LEVELS]
    return {entry.id: entry for entry in entries}


_CATALOGUE: dict[str, Instruction] = _build_catalogue()


def _unknown(instruction_id: str) -> UnknownInstruction:
    """Name the bad id and the nearest real ones: most misses are typos or a dropped prefix."""
    typed = instruction_id.lower()
    suffix_hits = [known for known in _CATALOGUE if known.endswith(":" + typed)]
    close = difflib.get_close_matches(typed, list(_CATALOGUE), n=3, cutoff=0.6)
    suggestions = list(dict.fromkeys(suffix_hits + close))[:3]
    if not suggestions:
        return UnknownInstruction(
            f"unknown instruction {instruction_id!r}: run `ifsteer instructions` to list them"
        )
    options = " or ".join(repr(s) for s in suggestions)
    return UnknownInstruction(
        f"unknown instruction {instruction_id!r}: did you mean {options}? "
        "(`ifsteer instructions` lists them all)"
    )


def get_instruction(instruction_id: str) -> Instruction:
    """Look up a catalogue entry; keyword ids are built on demand since any word can be one."""
    found = _CATALOGUE.get(instruction_id)
    if found is not None:
        return found
    if instruction_id.startswith(_KEYWORD_PREFIX):
        return keyword_instruction(instruction_id[len(_KEYWORD_PREFIX) :])
    raise _unknown(instruction_id)


def list_instructions() -> list[Instruction]:
    """Every fixed entry (format, languages, length levels); keywords and free text are open."""
    return sorted(_CATALOGUE.values(), key=lambda entry: entry.id)


def keyword_instruction(word: str) -> Instruction:
    """The inclusion vector for one word; applied with a negative weight it excludes the word."""
    word = word.strip().lower()
    if not _KEYWORD_PATTERN.fullmatch(word):
        raise UnknownInstruction(
            f"cannot make a keyword instruction from {word!r}: give one word "
            "(letters, digits, hyphens or apostrophes)"
        )
    phrasings = tuple(template.format(word=word) for template in KEYWORD_TEMPLATES)
    return Instruction(_KEYWORD_PREFIX + word, phrasings, "additive", f'Mention the word "{word}".')


def _slug(text: str) -> str:
    """A filename-safe id part; hashed where truncation or a non-Latin script would lose it."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    if not slug:
        return f"text-{digest}"
    if len(slug) > _SLUG_LENGTH:
        return f"{slug[:_SLUG_LENGTH].rstrip('-')}-{digest}"
    return slug


def custom_instruction(
    text: str, instruction_id: str | None = None, mode: Mode = "projection"
) -> Instruction:
    """An instruction the user invented, steered from pairs that append exactly their text."""
    text = text.strip()
    if not text:
        raise IfsteerError("an instruction needs some text: pass the words to append to queries")
    if mode not in get_args(Mode):
        raise IfsteerError(f"unknown steering mode {mode!r}: use 'projection' or 'additive'")
    vector_id = instruction_id.strip() if instruction_id else f"free:{_slug(text)}"
    if not vector_id:
        raise IfsteerError("an instruction id cannot be blank: omit it to derive one from the text")
    return Instruction(vector_id, (text,), mode, text)


def _kwarg(kwargs: dict, key: str, instruction_id: str) -> object:
    value = kwargs.get(key)
    if value is None or value == "" or value == []:
        raise IfsteerError(f"an IFEval row with {instruction_id!r} lacks its {key!r} argument")
    return value


def vector_id_for(instruction_id: str, kwargs: dict | None) -> str | list[str]:
    """The id of the vector that serves one IFEval instruction, so evaluation can pick files.

    Format ids serve themselves. A response language serves `language:response_language:<code>`
    (any code; whether a vector exists is the vector directory's business). Keyword rows map to
    one inclusion vector per word, a list when there are several; for `keywords:forbidden_words`
    these are still *inclusion* vectors, which the caller applies with a negative weight.
    `length_constraints:number_sentences` with relation "less than" is served by the level
    whose own check is nearest: fewer than 3 sentences (at most two) by
    `length:extremely_concise`, a looser limit by `length:concise`; on the embedded model only
    the first steers (docs/shipped.md), and one "shorter" vector for every N would steer a
    five-sentence limit as hard as a one-sentence one. Anything else has no vector and raises
    UnknownInstruction.
    """
    args = {key: value for key, value in (kwargs or {}).items() if value is not None}
    if instruction_id in FORMAT:
        return instruction_id
    if instruction_id == "language:response_language":
        return f"{_LANGUAGE_PREFIX}{_kwarg(args, 'language', instruction_id)}"
    if instruction_id in _KEYWORD_KWARGS:
        words = _kwarg(args, _KEYWORD_KWARGS[instruction_id], instruction_id)
        if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
            raise IfsteerError(f"an IFEval row with {instruction_id!r} needs a list of words")
        ids = [keyword_instruction(word).id for word in words]
        return ids[0] if len(ids) == 1 else ids
    if instruction_id == "length_constraints:number_sentences":
        if args.get("relation") == "less than":
            limit = args.get("num_sentences")
            tight = isinstance(limit, int) and limit <= EXTREMELY_CONCISE_BELOW
            return _LENGTH_PREFIX + ("extremely_concise" if tight else "concise")
        raise UnknownInstruction(
            f"no steering vector serves {instruction_id!r} with relation "
            f"{args.get('relation')!r}: only 'less than' maps to a conciseness vector"
        )
    raise UnknownInstruction(
        f"no steering vector serves IFEval instruction {instruction_id!r}: vectors cover the "
        "format, language, keyword and 'at most N sentences' ids"
    )
