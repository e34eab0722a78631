"""When an IFEval verdict is settled before the answer ends, so its row can stop generating.

A decider looks at the answer so far and says True only when *no continuation* can change
either reading of the check. Strict reads the answer as it is. Loose passes if any of IFEval's
variants passes: the answer with its first line, its last line or both removed, each also with
`*` deleted. Two consequences shape every decider here:
- A strict pass is a loose pass (the answer itself is one of the variants), so a check that is
  passed for good (all required keywords present) is decided at once.
- A violation decides a loose failure only where every variant keeps it: in a line that is not
  the first and is already followed by a newline (it can never become the last line). A capital
  letter in "Sure! Here is..." on line one decides nothing.

Decidable here: `change_case:english_lowercase` (a capital letter), `change_case:english_capital`
(a lowercase letter), `punctuation:no_comma` (a comma), `keywords:forbidden_words` (a forbidden
word, bounded on both sides), `keywords:existence` (every keyword present). The checkers fail
these without consulting langdetect, which is what makes them monotone.
Decided on a failure at the start: `startend:quotation` and `detectable_format:json_format`
need the (stripped) answer to begin with `"`, or with what a JSON value or a code fence can
begin with. Every loose variant begins either where the answer does or on its second line, so
once both starts are written and neither can begin a pass, no continuation passes.

Not decided early, and why:
- the end of the answer matters: `startend:end_checker`, `detectable_format:constrained_response`
  (its phrase may come at any point), and a pass of quotation or JSON;
- the whole text is judged at once: `language:response_language` (langdetect may change its
  mind as text grows), `detectable_format:multiple_sections`, `combination:*`;
- exact counts, or counts that loose variants can lower: `length_constraints:*`,
  `detectable_format:number_bullet_lists`, `change_case:capital_word_frequency`,
  `keywords:frequency`, `keywords:letter_frequency`, `detectable_content:number_placeholders`,
  `detectable_format:number_highlighted_sections`. Their "at least" forms could be decided on a
  pass the way `keywords:existence` is; they are not yet, as no sweep needs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Decider = Callable[[str], bool]


def _settled(text: str) -> str:
    """The lines every loose variant keeps whatever follows: not the first, not the last."""
    return "\n".join(text.split("\n")[1:-1])


def _fails_once(violates: Callable[[str], bool]) -> Decider:
    """Decided when a violation sits in the settled lines, with and without `*`."""

    def decided(text: str) -> bool:
        settled = _settled(text)
        return violates(settled) and violates(settled.replace("*", ""))

    return decided


def _start_fails(may_begin: Callable[[str], bool]) -> Decider:
    """Decided when the answer's start and its second line's start are both written (a
    character other than whitespace) and `may_begin` rules each out, with and without `*`."""

    def starts(text: str) -> list[str] | None:
        first = text.lstrip()
        _, newline, later = text.partition("\n")
        second = later.lstrip()
        return [first, second] if first and newline and second else None

    def decided(text: str) -> bool:
        for variant in (text, text.replace("*", "")):
            found = starts(variant)
            if found is None or any(may_begin(start) for start in found):
                return False
        return True

    return decided


# Python's json.loads, which IFEval calls, also reads NaN and Infinity.
_JSON_LITERALS = ("true", "false", "null", "NaN", "Infinity")


def _may_begin_json(text: str) -> bool:
    """Whether a JSON value (or a ``` fence around one) can begin like `text`."""
    if text[0] in '{["-0123456789`':
        return True
    return any(literal.startswith(text[: len(literal)]) for literal in _JSON_LITERALS)


def _has_upper(text: str) -> bool:
    return any(c.isupper() for c in text)


def _has_lower(text: str) -> bool:
    return any(c.islower() for c in text)


def _forbidden(words: Sequence[str]) -> Decider:
    patterns = [re.compile(r"\b" + w + r"\b", flags=re.IGNORECASE) for w in words]
    return _fails_once(lambda text: any(p.search(text) for p in patterns))


def _all_present(keywords: Sequence[str]) -> Decider:
    patterns = [re.compile(k, flags=re.IGNORECASE) for k in keywords]
    return lambda text: all(p.search(text) for p in patterns)


def failure(instruction_id: str, kwargs: Mapping[str, Any] | None = None) -> Decider | None:
    """A decider that fires only on a settled *failure* (never on a settled pass), or None.

    Sweeps stop on failures alone: a failed answer scores nothing whatever its fluency, while a
    pass counts only if the whole answer reads well, so passes must be generated to the end.
    """
    if instruction_id == "keywords:existence":
        return None  # decided on a pass
    return decider(instruction_id, kwargs)


def decider(instruction_id: str, kwargs: Mapping[str, Any] | None = None) -> Decider | None:
    """A decider for one instruction, or None where its verdict waits for the whole answer."""
    kwargs = kwargs or {}
    if instruction_id == "change_case:english_lowercase":
        return _fails_once(_has_upper)
    if instruction_id == "change_case:english_capital":
        return _fails_once(_has_lower)
    if instruction_id == "punctuation:no_comma":
        return _fails_once(lambda text: "," in text)
    if instruction_id == "keywords:forbidden_words" and kwargs.get("forbidden_words"):
        return _forbidden(list(kwargs["forbidden_words"]))
    if instruction_id == "keywords:existence" and kwargs.get("keywords"):
        return _all_present(list(kwargs["keywords"]))
    if instruction_id == "startend:quotation":
        return _start_fails(lambda start: start[0] == '"')
    if instruction_id == "detectable_format:json_format":
        return _start_fails(_may_begin_json)
    return None


def row_decider(
    instruction_ids: Sequence[str], kwargs: Sequence[Mapping[str, Any] | None]
) -> Decider | None:
    """A row with several instructions is decided only when every one of its checks is."""
    parts = [decider(i, k) for i, k in zip(instruction_ids, kwargs, strict=True)]
    if not parts or any(p is None for p in parts):
        return None
    checks = [p for p in parts if p is not None]
    return lambda text: all(d(text) for d in checks)


def row_failure(
    instruction_ids: Sequence[str], kwargs: Sequence[Mapping[str, Any] | None] = ()
) -> Decider | None:
    """A row fails (loosely) as soon as any one of its checks has failed for good."""
    padded = list(kwargs) + [None] * (len(instruction_ids) - len(kwargs))
    found = (failure(i, k) for i, k in zip(instruction_ids, padded, strict=True))
    checks = [d for d in found if d is not None]
    if not checks:
        return None
    return lambda text: any(d(text) for d in checks)
