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


_FORMAT: dict[str, tuple[str, tuple[str, ...]]] = {
    "change_case:capital_word_frequency": (
        "A few whole words in capitals for emphasis.",
        (
            "Emphasize key terms by writing at least 3 whole words in ALL CAPS.",
            "Stress the important ideas by typing several words entirely in capital letters, "
            "at least 4 of them.",
            "Include at least 2 words spelled completely in uppercase to make them stand out.",
            "Make your main points pop by writing at least 5 words in full capitals.",
            "Somewhere in the reply, put at least 3 crucial words in all capital letters.",
            "Use uppercase-only words for emphasis, at least twice in your answer.",
        ),
    ),
    "change_case:english_capital": (
        "Whole reply in English, all capital letters.",
        (
            "Write your whole reply in English using only capital letters.",
            "Every letter of your answer must be uppercase, and the answer must be in English.",
            "Respond in English, typing everything in ALL CAPS.",
            "Use uppercase letters exclusively for the entire response, written in English.",
            "Do not use a single lowercase letter anywhere in your English reply.",
            "Answer in English as if caps lock were on from the first word to the last.",
        ),
    ),
    "change_case:english_lowercase": (
        "Whole reply in English, all lowercase letters.",
        (
            "Write your whole reply in English using only lowercase letters.",
            "Do not use any capital letters anywhere in your English response.",
            "Respond in English, keeping every letter lowercase, even at the start of a sentence.",
            "Your entire answer should be in English and contain no uppercase characters at all.",
            "Type everything in lower case, in English, with no capitalization whatsoever.",
            "Keep the full response in English and entirely in small letters, names included.",
        ),
    ),
    "detectable_format:constrained_response": (
        "Answer with one of three fixed yes/no/maybe phrases.",
        (
            'Reply with exactly one of these options: "My answer is yes.", "My answer is no.", '
            'or "My answer is maybe."',
            "Your response must contain one of the following phrases word for word: "
            "My answer is yes. / My answer is no. / My answer is maybe.",
            "Settle the question by picking one phrase from this set and writing it exactly: "
            '"My answer is yes.", "My answer is no.", "My answer is maybe."',
            'Choose a single verdict among "My answer is yes.", "My answer is no." and '
            '"My answer is maybe." and state it verbatim.',
            "Conclude with precisely one of the three fixed answers: "
            '"My answer is yes.", "My answer is no.", "My answer is maybe."',
        ),
    ),
    "detectable_format:json_format": (
        "Whole reply as JSON.",
        (
            "Format your entire output as valid JSON.",
            "Return the whole answer as a JSON object and nothing outside it.",
            "Wrap everything you write in JSON; markdown code fences around it are fine.",
            "Structure the complete reply as JSON data with meaningful keys.",
            "Produce only JSON in your response, with no prose before or after it.",
            "Encode your answer as a single well-formed JSON document.",
        ),
    ),
    "detectable_format:multiple_sections": (
        "Reply split into numbered sections (SECTION 1, SECTION 2, ...).",
        (
            "Divide your answer into 3 parts and start each one with SECTION X, "
            "where X is its number.",
            "Organize the response into 4 sections, labelling the start of each as Section 1, "
            "Section 2, and so on.",
            "Split what you write into 2 sections, each opening with the marker SECTION "
            "followed by its number.",
            "Break the reply into 5 numbered sections, beginning every section with 'Section N'.",
            "Your response needs exactly 3 sections; mark where each begins with SECTION 1, "
            "SECTION 2 and SECTION 3.",
        ),
    ),
    "detectable_format:number_bullet_lists": (
        "An exact number of markdown bullet points.",
        (
            "Give your answer as exactly 3 markdown bullet points, each starting with '* '.",
            "Use precisely 4 bullet points in markdown format, each line beginning with '* '.",
            "Present the response as a markdown list of exactly 5 bullets, marked with asterisks.",
            "Your reply must contain exactly 2 bullet points written with the markdown '* ' "
            "prefix, and no other bullets.",
            "Lay out your answer in exactly 3 markdown bullets, putting * at the start of each.",
            "Answer using no more and no fewer than 4 asterisk bullet points in markdown.",
        ),
    ),
    "detectable_format:number_highlighted_sections": (
        "Several passages highlighted with *asterisks*.",
        (
            "Highlight at least 2 parts of your answer with markdown, like *this highlighted "
            "part*.",
            "Mark at least 3 key passages by surrounding them with single asterisks, "
            "e.g. *key idea*.",
            "Use markdown emphasis (*like this*) to highlight at least 4 parts of the response.",
            "Make sure at least 2 phrases are highlighted by wrapping them in asterisks, as in "
            "*important phrase*.",
            "Draw attention to at least 3 segments of your reply by enclosing each in single "
            "asterisks.",
        ),
    ),
    "detectable_format:title": (
        "A title in double angular brackets, <<like this>>.",
        (
            "Give your response a title wrapped in double angular brackets, such as <<my title>>.",
            "Start with a title enclosed in double angle brackets, for example <<A Fitting "
            "Title>>.",
            "Include a heading placed inside << and >>, like <<heading here>>.",
            "Your answer must carry a title written between double angular brackets, "
            "e.g. <<Title>>.",
            "Put a title at the top of the reply, surrounded by double chevrons: <<like this>>.",
        ),
    ),
    "punctuation:no_comma": (
        "No commas anywhere.",
        (
            "Do not use any commas in your response.",
            "Write the whole answer without a single comma.",
            "Avoid commas entirely; use other punctuation instead.",
            "Your reply must contain zero commas.",
            "Leave out every comma from your response, rephrasing where needed.",
            "Refrain from using the comma character anywhere in what you write.",
        ),
    ),
    "startend:end_checker": (
        "End with an exact closing phrase.",
        (
            'Finish your response with the exact phrase "Is there anything else I can help '
            'with?" and add nothing after it.',
            'End your reply with the sentence "Let me know if you have more questions." '
            "with no words following it.",
            'The very last words of your answer must be "Hope this helps!" and nothing may come '
            "after them.",
            'Close your response with exactly this line: "Is there anything else I can help with?"',
            'Make "That is all for now." the final sentence of your reply, with nothing after it.',
        ),
    ),
    "startend:quotation": (
        "Whole reply wrapped in double quotation marks.",
        (
            "Wrap your entire response in double quotation marks.",
            "Put the whole answer inside a pair of double quotes.",
            "Begin and end your reply with a double quotation mark so that everything is quoted.",
            "Enclose everything you write between double quote characters.",
            "Surround your full response with double quotes, from the first character to the last.",
        ),
    ),
}

FORMAT_INSTRUCTION_IDS: tuple[str, ...] = tuple(_FORMAT)

# IFEval's 31 response-language rows use 22 codes; these 19 include all 14 of its
# single-instruction evaluation prompts. IFEval's langdetect checker supports every one of them.
LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "bn": "Bengali",
    "de": "German",
    "fa": "Persian",
    "gu": "Gujarati",
    "hi": "Hindi",
    "it": "Italian",
    "kn": "Kannada",
    "ko": "Korean",
    "mr": "Marathi",
    "ne": "Nepali",
    "pa": "Punjabi",
    "pt": "Portuguese",
    "ru": "Russian",
    "sw": "Swahili",
    "te": "Telugu",
    "th": "Thai",
    "ur": "Urdu",
    "vi": "Vietnamese",
}

_LANGUAGE_TEMPLATES: tuple[str, ...] = (
    "Write your entire response in {name}; no other language is allowed.",
    "Reply only in {name}, without using any other language.",
    "Your whole answer must be written in the {name} language.",
    "Respond exclusively in {name}.",
    "Use {name} and nothing else for the complete reply.",
)

_LENGTH: dict[str, tuple[str, tuple[str, ...]]] = {
    "extremely_concise": (
        "As short as possible: a sentence at most.",
        (
            "Answer in as few words as possible.",
            "Keep your reply extremely short: a single sentence at most.",
            "Be as brief as you possibly can.",
            "Respond with the bare minimum, one short sentence.",
            "Give an ultra-short answer with no elaboration at all.",
        ),
    ),
    "concise": (
        "Short and to the point.",
        (
            "Keep your answer short and to the point.",
            "Be concise.",
            "Respond briefly, in just a few sentences.",
            "Give a compact answer without unnecessary detail.",
            "Please keep it brief.",
        ),
    ),
    "moderate": (
        "Medium length, neither terse nor lengthy.",
        (
            "Give an answer of moderate length.",
            "Respond with a medium-length answer, neither terse nor lengthy.",
            "Aim for a balanced amount of detail in your reply.",
            "Write a reply of typical length, a couple of paragraphs at most.",
            "Provide a reasonably sized answer, not too short and not too long.",
        ),
    ),
    "verbose": (
        "Long and thorough.",
        (
            "Give a detailed and thorough answer.",
            "Respond at length, covering the topic in depth.",
            "Be generous with detail and explanation in your reply.",
            "Write a long, comprehensive response.",
            "Elaborate fully, with examples and explanations.",
        ),
    ),
    "extremely_verbose": (
        "As long and exhaustive as possible.",
        (
            "Write an extremely long and exhaustive answer, covering every aspect you can "
            "think of.",
            "Be as verbose as possible and go into exhaustive detail.",
            "Give the longest, most elaborate response you can, leaving nothing out.",
            "Respond with an extensive essay that explores every angle in depth.",
            "Make your answer exceptionally lengthy and thorough, with many examples and "
            "digressions.",
        ),
    ),
}

LENGTH_LEVELS: tuple[str, ...] = tuple(_LENGTH)

_KEYWORD_TEMPLATES: tuple[str, ...] = (
    'Be sure the word "{word}" appears in your answer.',
    'Use the word "{word}" somewhere in your response.',
    'Your reply must include the word "{word}".',
    'Work the word "{word}" into what you write.',
    'Include the keyword "{word}" at least once.',
)

_LANGUAGE_PREFIX = "language:response_language:"
_LENGTH_PREFIX = "length:"
# IFEval's strict "less than": 3 is "at most two sentences", what extremely concise is checked as.
EXTREMELY_CONCISE_BELOW = 3
_KEYWORD_PREFIX = "keywords:existence:"
_KEYWORD_PATTERN = re.compile(r"[\w'-]+")
_KEYWORD_KWARGS = {"keywords:existence": "keywords", "keywords:forbidden_words": "forbidden_words"}
_SLUG_LENGTH = 48


def _format_instruction(instruction_id: str) -> Instruction:
    description, phrasings = _FORMAT[instruction_id]
    return Instruction(instruction_id, phrasings, "projection", description)


def language_instruction(code: str, name: str | None = None) -> Instruction:
    name = name or LANGUAGES[code]
    phrasings = tuple(template.format(name=name) for template in _LANGUAGE_TEMPLATES)
    return Instruction(_LANGUAGE_PREFIX + code, phrasings, "projection", f"Whole reply in {name}.")


def _length_instruction(level: str) -> Instruction:
    description, phrasings = _LENGTH[level]
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
    phrasings = tuple(template.format(word=word) for template in _KEYWORD_TEMPLATES)
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
    if instruction_id in _FORMAT:
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
