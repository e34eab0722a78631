"""IFEval rows and the rows each experiment builds from them; which vectors serve a row.

A row is one IFEval-format prompt: the full prompt, the query without its instruction, the
instruction ids and their kwargs. Evaluation answers rows, sweeps validate on them, and the
paper pipeline splits them; all three ask the same question of a row, "which vectors serve
it?", and get the one answer `Row.needs` gives: per instruction, the vector ids that steer it
(`ifsteer.instructions.vector_id_for`), each marked negated for a forbidden word (its inclusion
vector with the weight negated, docs/method.md §2), or none when no vector can serve it.

Experiments differ in how rows are prepared (`prepare_rows`):

- ``format`` and ``transfer``: rows as given.
- ``keywords_include`` / ``keywords_exclude``: rows that carry the keyword instruction.
- ``length``: "at most N sentences" rows. Rows that already carry
  ``length_constraints:number_sentences`` with relation "less than" are used as they are; any
  other row becomes its ``prompt_without_instruction`` plus our own sentence
  ``Answer in at most N sentences.``, N in 1..5 fixed by the row key (`sentence_limit`).
- ``composition``: a format row plus that same length sentence appended to its prompt.

`split_rows` sets a few rows of each instruction aside for sweeps and leaves the rest for
evaluation, deterministically and without overlap: the format set has only its 163 test
prompts, where the paper validates on separate ones.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ifsteer.checks import supported_instruction_ids
from ifsteer.errors import EvaluationError, IfsteerError, UnknownInstruction
from ifsteer.instructions import vector_id_for

__all__ = [
    "EXPERIMENTS",
    "SETTINGS",
    "STEERED",
    "WITH_INSTRUCTION",
    "Need",
    "Row",
    "by_group",
    "composition_row",
    "group_of",
    "length_instruction",
    "length_row",
    "load_rows",
    "prepare_rows",
    "sentence_limit",
]

# The paper's four settings: the query alone, query + vectors, the full prompt, both.
SETTINGS: tuple[str, ...] = ("no_instruction", "steer", "instruction", "instruction_steer")
STEERED = frozenset({"steer", "instruction_steer"})
WITH_INSTRUCTION = frozenset({"instruction", "instruction_steer"})
EXPERIMENTS: tuple[str, ...] = (
    "format",
    "keywords_include",
    "keywords_exclude",
    "length",
    "composition",
    "transfer",
)
LENGTH_ID = "length_constraints:number_sentences"
INCLUDE_ID = "keywords:existence"
EXCLUDE_ID = "keywords:forbidden_words"
MAX_SENTENCES = 5


@dataclass(frozen=True)
class Need:
    """One instruction of a row and the vectors that serve it: (vector id, negated) pairs,
    empty when no vector can (the instruction then runs unsteered). `problem` says why kwargs
    name no vector (a language row without its language): a sweep skips such a row, an
    evaluation refuses it, since IFEval cannot check it either."""

    instruction_id: str
    vectors: tuple[tuple[str, bool], ...]
    problem: str | None = None


@dataclass(frozen=True)
class Row:
    """One IFEval-format prompt. `kwargs` is None when the file gave none (checks need them)."""

    key: int | str
    prompt: str
    prompt_without_instruction: str | None
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...] | None
    source: str = field(default="", compare=False)  # "FILE:LINE", for messages

    def needs(self) -> list[Need]:
        """The one answer to "which vectors serve this row", instruction by instruction.

        A forbidden word is served by its inclusion vector, negated (docs/method.md §2). An
        instruction no vector serves has no vectors.
        """
        kwargs_list = self.kwargs or ({},) * len(self.instruction_id_list)
        needs = []
        for instruction_id, kwargs in zip(self.instruction_id_list, kwargs_list, strict=True):
            try:
                ids = vector_id_for(instruction_id, kwargs)
            except UnknownInstruction:
                needs.append(Need(instruction_id, ()))
                continue
            except IfsteerError as exc:
                needs.append(Need(instruction_id, (), f"{self.source}: {exc}"))
                continue
            negate = instruction_id == EXCLUDE_ID
            served = [ids] if isinstance(ids, str) else ids
            needs.append(Need(instruction_id, tuple((v, negate) for v in served)))
        return needs

    def served_vectors(self) -> list[tuple[str, bool]]:
        """(vector id, negated) for each instruction a vector can serve; others are skipped."""
        return [served for need in self.needs() for served in need.vectors]

    def vector_ids(self) -> list[str]:
        return [vector_id for vector_id, _ in self.served_vectors()]

    def fully_served(self, available: Collection[str] | None = None) -> bool:
        """Whether steering can reach every instruction of the row (with only the vectors in
        `available`, when given). Only such rows can calibrate a vector: a row one of whose
        instructions nothing steers passes or fails for reasons no layer changes."""
        needs = self.needs()
        return bool(needs) and all(
            need.vectors and (available is None or all(v in available for v, _ in need.vectors))
            for need in needs
        )

    def prompt_for(self, setting: str) -> str:
        if setting in WITH_INSTRUCTION:
            return self.prompt
        if self.prompt_without_instruction is None:
            raise EvaluationError(
                f"{self.source}: row {self.key!r} has no prompt_without_instruction"
            )
        return self.prompt_without_instruction


def load_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """Read IFEval-format rows; the first `limit` rows if given.

    Each line is a JSON object with `prompt` and `instruction_id_list`, and usually `kwargs`
    (one dict per instruction), `prompt_without_instruction` and `key` (the line number when
    absent; a key seen before becomes "KEY-2", "KEY-3"... so that every row has its own).
    Anything malformed is refused with one line that names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such data file")
    if limit is not None and limit < 0:
        raise EvaluationError(f"--limit must be positive, got {limit}")
    rows: list[Row] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            row = _parse_row(line, f"{path}:{number}", number)
            if str(row.key) in seen:
                # Resuming needs unique keys; the keyword sets reuse an IFEval key for each
                # word, so a repeat becomes "KEY-2", "KEY-3", ... in file order.
                copy = 2
                while f"{row.key}-{copy}" in seen:
                    copy += 1
                row = replace(row, key=f"{row.key}-{copy}")
            seen.add(str(row.key))
            rows.append(row)
    if not rows and limit != 0:
        raise EvaluationError(f"{path}: no rows")
    return rows


def _parse_row(line: str, source: str, number: int) -> Row:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{source}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise EvaluationError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvaluationError(f"{source}: 'prompt' must be a non-empty string")
    ids = raw.get("instruction_id_list")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise EvaluationError(f"{source}: 'instruction_id_list' must be a list of strings")
    kwargs = raw.get("kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise EvaluationError(
                f"{source}: 'kwargs' must be a list of {len(ids)} objects, one per instruction"
            )
        if not all(k is None or isinstance(k, dict) for k in kwargs):
            raise EvaluationError(f"{source}: every entry of 'kwargs' must be an object")
        kwargs = tuple({k: v for k, v in (k or {}).items() if v is not None} for k in kwargs)
    without = raw.get("prompt_without_instruction")
    if without is not None and (not isinstance(without, str) or not without.strip()):
        raise EvaluationError(f"{source}: 'prompt_without_instruction' must be a non-empty string")
    key = raw.get("key", number)
    if not isinstance(key, int | str) or isinstance(key, bool):
        raise EvaluationError(f"{source}: 'key' must be a number or a string")
    return Row(key, prompt, without, tuple(ids), kwargs, source)


def sentence_limit(key: int | str) -> int:
    """The N of "at most N sentences" for a row built by `length_row` / `composition_row`.

    1..5, fixed by the row key (a CRC of it), so reruns and resumes ask the same N.
    """
    return 1 + zlib.crc32(str(key).encode("utf-8")) % MAX_SENTENCES


def length_instruction(n: int) -> str:
    return f"Answer in at most {n} sentence{'s' if n != 1 else ''}."


def _length_kwargs(n: int) -> dict[str, Any]:
    # IFEval's relation "less than" is strict: at most n sentences is fewer than n + 1.
    return {"relation": "less than", "num_sentences": n + 1}


def _has_at_most(row: Row) -> bool:
    kwargs = row.kwargs or ({},) * len(row.instruction_id_list)
    return any(
        i == LENGTH_ID and k.get("relation") == "less than"
        for i, k in zip(row.instruction_id_list, kwargs, strict=True)
    )


def length_row(row: Row) -> Row:
    """An "at most N sentences" row: kept if it is one already, else built from its query."""
    if _has_at_most(row) and row.kwargs is not None:
        return row
    if row.prompt_without_instruction is None:
        raise EvaluationError(
            f"{row.source}: the length experiment builds its prompt from "
            "'prompt_without_instruction', which this row lacks"
        )
    n = sentence_limit(row.key)
    return replace(
        row,
        prompt=f"{row.prompt_without_instruction} {length_instruction(n)}",
        instruction_id_list=(LENGTH_ID,),
        kwargs=(_length_kwargs(n),),
    )


def composition_row(row: Row) -> Row:
    """A format row with "Answer in at most N sentences." appended: two instructions to score."""
    if LENGTH_ID in row.instruction_id_list:
        return row
    n = sentence_limit(row.key)
    return replace(
        row,
        prompt=f"{row.prompt} {length_instruction(n)}",
        instruction_id_list=(*row.instruction_id_list, LENGTH_ID),
        kwargs=None if row.kwargs is None else (*row.kwargs, _length_kwargs(n)),
    )


def prepare_rows(rows: Sequence[Row], experiment: str) -> list[Row]:
    """The rows an experiment evaluates, checked so that no error waits until mid-run."""
    if experiment not in EXPERIMENTS:
        raise EvaluationError(f"unknown experiment {experiment!r}; choose {', '.join(EXPERIMENTS)}")
    if experiment == "length":
        rows = [length_row(r) for r in rows]
    elif experiment == "composition":
        rows = [composition_row(r) for r in rows]
    required = {"keywords_include": INCLUDE_ID, "keywords_exclude": EXCLUDE_ID}.get(experiment)
    supported = set(supported_instruction_ids())
    for row in rows:
        if required and required not in row.instruction_id_list:
            raise EvaluationError(
                f"{row.source}: the {experiment} experiment needs rows with {required!r}, "
                f"this one has {list(row.instruction_id_list)}"
            )
        if row.kwargs is None and row.instruction_id_list:
            raise EvaluationError(
                f"{row.source}: row {row.key!r} has no 'kwargs'; IFEval checks need one object "
                "per instruction"
            )
        for instruction_id in row.instruction_id_list:
            if instruction_id not in supported:
                raise EvaluationError(f"{row.source}: IFEval has no checker for {instruction_id!r}")
    return list(rows)


# --- validation split -----------------------------------------------------------------------


def group_of(row: Row) -> str:
    """The sweep a row belongs to: its first IFEval instruction id.

    All response-language rows form one group ("language:response_language"): with one or two
    rows per language there is too little to sweep each language alone (the paper's sweep also
    uses one row per language), so the languages share one layer.
    """
    if not row.instruction_id_list:
        raise IfsteerError(f"{row.source}: row {row.key!r} has no instruction to sweep")
    return row.instruction_id_list[0]


def by_group(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows by the sweep they belong to (`group_of`), in their order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(group_of(row), []).append(row)
    return groups
