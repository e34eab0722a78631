"""The paper's four settings over an IFEval-format jsonl, resumable (PAPER.md §5).

Every row is answered in up to four settings: **no_instruction** (the query alone), **steer**
(the query plus the row's vectors), **instruction** (the full IFEval prompt) and
**instruction_steer** (both). Each response is checked with IFEval's strict and loose checkers,
scored for fluency, and appended to ``responses.jsonl`` as soon as its batch is done; a rerun
into the same directory skips what is there, so a killed run resumes where it stopped. The
summary is recomputed from that file alone (`summarize`), so a resumed run and a clean one
report the same numbers.

Vectors are picked per row by instruction id (`ifsteer.instructions.vector_id_for`) from a
directory of vector files; rows of different instructions share a batch through per-row
steering. A row whose vector has no file runs unsteered in the steered settings, is recorded
with ``vectors: []`` and its missing ids, and counted in the summary (``n_unsteered``), so a
partial vector set still gives a full, honest table.

Experiments reuse that one loop and differ in how rows are prepared:

- ``format`` and ``transfer``: rows as given; ``transfer`` accepts vectors of another model of
  the same hidden size (a different hidden size is refused).
- ``keywords_include`` / ``keywords_exclude``: one inclusion vector per word; a forbidden word
  gets its inclusion vector with the weight negated (−w).
- ``length``: "at most N sentences" rows, steered by the conciseness vector. Rows that already
  carry ``length_constraints:number_sentences`` with relation "less than" are used as they are;
  any other row becomes its ``prompt_without_instruction`` plus our own sentence
  ``Answer in at most N sentences.``, N in 1..5 fixed by the row key (`sentence_limit`).
- ``composition``: a format row plus that same length sentence appended to its prompt: both
  instructions are scored, and both vectors (format and conciseness) steer at their own layers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import statistics
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from ifsteer import quality
from ifsteer.checks import check_row, ensure_punkt, supported_instruction_ids
from ifsteer.errors import IfsteerError, InvalidSteering, UnknownInstruction
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import vector_id_for
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering
from ifsteer.vectors import MODES, Mode, SteeringVector, load_vector, load_vectors

__all__ = [
    "EXPERIMENTS",
    "HEADLINE_METRIC",
    "PAPER_RESULTS",
    "SETTINGS",
    "EvaluationError",
    "Row",
    "Summary",
    "composition_row",
    "count_pending",
    "length_instruction",
    "length_row",
    "load_rows",
    "prepare_rows",
    "read_responses",
    "run_evaluation",
    "sentence_limit",
    "summarize",
    "vector_directory",
    "wilson_interval",
]

log = logging.getLogger(__name__)

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
RESPONSES = "responses.jsonl"
SUMMARY = "summary.json"
LENGTH_ID = "length_constraints:number_sentences"
INCLUDE_ID = "keywords:existence"
EXCLUDE_ID = "keywords:forbidden_words"
MAX_SENTENCES = 5
Z_95 = 1.959963984540054
# Greedy, as in the paper; long enough for most IFEval answers to finish.
DEFAULT_SAMPLING = Sampling(max_new_tokens=256)

# The paper's published four-setting numbers (PAPER.md §6), for tables that show ours beside
# theirs: (no_instruction, steer, instruction, instruction_steer), in the metric of
# HEADLINE_METRIC. Length and composition are Phi-3 at "at most N sentences".
PAPER_RESULTS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "format": {
        "Phi-3-mini": (0.110, 0.307, 0.699, 0.773),
        "Gemma-2-2B-it": (0.129, 0.307, 0.693, 0.761),
        "Mistral-7B-Instruct": (0.067, 0.141, 0.626, 0.638),
        "Gemma-2-9B-it": (0.123, 0.307, 0.865, 0.871),
    },
    "keywords_include": {"Phi-3-mini": (0.291, 0.453, 0.895, 0.965)},
    "keywords_exclude": {"Phi-3-mini": (0.641, 0.855, 0.863, 0.932)},
    "length": {"Phi-3-mini": (0.23, 0.51, 0.75, 0.88)},
    "composition": {"Phi-3-mini": (0.031, 0.227, 0.479, 0.546)},
}
HEADLINE_METRIC: dict[str, str] = {
    "format": "prompt_loose",
    "transfer": "prompt_loose",
    "keywords_include": "prompt_strict",
    "keywords_exclude": "prompt_strict",
    "length": "prompt_loose",
    "composition": "prompt_loose",
}

Progress = Callable[[int], None]


class EvaluationError(IfsteerError):
    """Evaluation input that cannot be used: a malformed data row, a mismatched resume."""


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One IFEval-format prompt. `kwargs` is None when the file gave none (checks need them)."""

    key: int | str
    prompt: str
    prompt_without_instruction: str | None
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...] | None
    source: str = field(default="", compare=False)  # "FILE:LINE", for messages

    def served_vectors(self) -> list[tuple[str, bool]]:
        """(vector id, negated) for each instruction a vector can serve; others are skipped.

        A forbidden word is served by its inclusion vector, negated (PAPER.md §2).
        """
        served: list[tuple[str, bool]] = []
        kwargs_list = self.kwargs or ({},) * len(self.instruction_id_list)
        for instruction_id, kwargs in zip(self.instruction_id_list, kwargs_list, strict=True):
            try:
                ids = vector_id_for(instruction_id, kwargs)
            except IfsteerError:
                continue
            negate = instruction_id == EXCLUDE_ID
            served += [(v, negate) for v in ([ids] if isinstance(ids, str) else ids)]
        return served

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
                raise EvaluationError(
                    f"{row.source}: IFEval has no checker for {instruction_id!r}"
                )
    return list(rows)


# --- vectors --------------------------------------------------------------------------------


def vector_directory(path: str | Path) -> dict[str, Path]:
    """Every `*.safetensors` vector file of a directory, by the instruction id it stores."""
    directory = Path(path)
    if not directory.is_dir():
        raise EvaluationError(f"{directory}: not a directory of vector files")
    found: dict[str, Path] = {}
    for file in sorted(directory.glob("*.safetensors")):
        if file.name.startswith("."):
            continue  # a half-written file of save_vectors
        vectors, default = load_vectors(file)  # MalformedVectorFile names the file
        instruction_id = vectors[default].instruction_id
        if instruction_id in found:
            raise EvaluationError(
                f"{found[instruction_id]} and {file} both hold {instruction_id!r}; keep one"
            )
        found[instruction_id] = file
    return found


VectorSource = str | Path | Mapping[str, "str | Path | SteeringVector"]


@dataclass(frozen=True)
class _Plan:
    """What steers each row: steerings by row key, their JSON records, ids without a file."""

    steerings: dict[str, list[Steering]]
    records: dict[str, list[dict[str, Any]]]
    missing: dict[str, list[str]]

    @property
    def missing_ids(self) -> tuple[str, ...]:
        return tuple(sorted({i for ids in self.missing.values() for i in ids}))


def _override(table: Mapping[str, Any], vector_id: str) -> Any:
    """Exact id first, then the first glob pattern (`keywords:*`) that matches it."""
    if vector_id in table:
        return table[vector_id]
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(vector_id, pattern):
            return value
    return None


def _plan_vectors(
    lm: LoadedModel,
    rows: Sequence[Row],
    source: VectorSource | None,
    *,
    weights: Mapping[str, float],
    modes: Mapping[str, Mode],
    layers: Mapping[str, int],
    allow_transfer: bool,
) -> _Plan:
    available: Mapping[str, str | Path | SteeringVector]
    if source is None:
        available = {}
    elif isinstance(source, str | Path):
        available = vector_directory(source)
    else:
        available = source
    loaded: dict[str, SteeringVector] = {}
    made: dict[tuple[str, bool], tuple[Steering, dict[str, Any]]] = {}
    plan = _Plan({}, {}, {})
    for row in rows:
        key = str(row.key)
        plan.steerings[key], plan.records[key], plan.missing[key] = [], [], []
        for instruction_id, kwargs in zip(row.instruction_id_list, row.kwargs or (), strict=True):
            try:
                served = vector_id_for(instruction_id, kwargs)
            except UnknownInstruction:
                plan.missing[key].append(instruction_id)  # no vector can serve it
                continue
            negate = instruction_id == EXCLUDE_ID
            for vector_id in [served] if isinstance(served, str) else served:
                if vector_id not in available:
                    plan.missing[key].append(vector_id)
                    continue
                if (vector_id, negate) not in made:
                    if vector_id not in loaded:
                        vector = _load(available[vector_id], _override(layers, vector_id))
                        vector.check_fits(
                            lm.model_id, lm.hidden_size, lm.n_layers, allow_transfer=allow_transfer
                        )
                        loaded[vector_id] = vector
                    made[(vector_id, negate)] = _steering(
                        loaded[vector_id], vector_id, negate, weights, modes
                    )
                steering, record = made[(vector_id, negate)]
                plan.steerings[key].append(steering)
                plan.records[key].append(record)
    return plan


def _load(item: str | Path | SteeringVector, layer: int | None) -> SteeringVector:
    if isinstance(item, SteeringVector):
        if layer is not None and layer != item.layer:
            raise InvalidSteering(
                f"vector {item.instruction_id!r} is at layer {item.layer}; pass its file to "
                f"choose layer {layer}"
            )
        return item
    return load_vector(item, layer)


def _steering(
    vector: SteeringVector,
    vector_id: str,
    negate: bool,
    weights: Mapping[str, float],
    modes: Mapping[str, Mode],
) -> tuple[Steering, dict[str, Any]]:
    mode = _override(modes, vector_id)
    if mode is not None and mode not in MODES:
        raise InvalidSteering(
            f"unknown mode {mode!r} for {vector_id!r}; choose projection or additive"
        )
    weight = _override(weights, vector_id)
    weight = vector.weight if weight is None else float(weight)
    steering = Steering(vector, mode=mode, weight=-weight if negate else weight)
    steering.validate()
    record = {
        "instruction_id": vector_id,
        "layer": vector.layer,
        "mode": steering.effective_mode,
        "weight": steering.effective_weight,
        "model": vector.model_id,
    }
    return steering, record


# --- the response file ----------------------------------------------------------------------


def _done_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(record.get("experiment")), str(record.get("setting")), str(record.get("key")))


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a responses file; a partial last line (a killed write) is dropped."""
    records, _end = _scan(Path(path))
    return records


def _scan(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records, and the byte length of the file's intact part (a torn tail is past it)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)  # the bytes after the final newline, if any
        end = offset + len(raw) + (0 if last else 1)
        if raw.strip():
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                if last:
                    log.warning("%s: dropping a partial last line (an interrupted write)", path)
                    return records, offset
                raise EvaluationError(
                    f"{path}:{number}: not a JSON object; the file is damaged (fix or remove "
                    "that line to resume)"
                ) from None
            records.append(record)
        offset = end
    return records, offset


@contextlib.contextmanager
def _open_for_append(path: Path) -> Iterator[tuple[IO[bytes], list[dict[str, Any]]]]:
    """Lock the file against a second writer, cut a torn tail, and give what is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvaluationError(
                f"{path} is being written by another evaluation; wait for it or use another --out"
            ) from None
        except ImportError:  # not POSIX: no lock, resume still works
            pass
        records, intact = _scan(path)
        size = path.stat().st_size
        if intact < size:
            os.ftruncate(handle.fileno(), intact)
        elif size and not path.read_bytes().endswith(b"\n"):
            handle.write(b"\n")  # a whole last record whose newline never made it
        yield handle, records


def _check_resume(
    existing: Sequence[Mapping[str, Any]],
    experiment: str,
    model_id: str,
    sampling: Mapping[str, Any],
    plan: _Plan,
    path: Path,
) -> None:
    """Refuse to mix responses made another way into one experiment's numbers."""
    for record in existing:
        if record.get("experiment") != experiment:
            continue
        if record.get("model") != model_id:
            raise EvaluationError(
                f"{path} holds {experiment!r} responses of model {record.get('model')!r}, not "
                f"{model_id!r}; use another --out"
            )
        if record.get("sampling") != sampling:
            raise EvaluationError(
                f"{path} holds {experiment!r} responses made with {record.get('sampling')}, not "
                f"{dict(sampling)}; resume with the same settings or use another --out"
            )
        key = str(record.get("key"))
        if record.get("setting") not in STEERED or key not in plan.records:
            continue
        old, new = record.get("vectors") or [], plan.records[key]
        if not _same_vectors(old, new):
            raise EvaluationError(
                f"{path}: row {key} ({record.get('setting')}) was steered with "
                f"{_describe(old)}, now with {_describe(new)}; resume with the same vectors "
                "or use another --out"
            )


def _same_vectors(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> bool:
    def fields(v: Mapping[str, Any]) -> tuple[Any, ...]:
        return v.get("instruction_id"), v.get("layer"), v.get("mode"), v.get("model")

    return len(old) == len(new) and all(
        fields(a) == fields(b)
        and math.isclose(float(a.get("weight", math.nan)), float(b["weight"]), rel_tol=1e-6)
        for a, b in zip(old, new, strict=True)
    )


def _describe(vectors: Sequence[Mapping[str, Any]]) -> str:
    if not vectors:
        return "no vector"
    return ", ".join(
        f"{v.get('instruction_id')} (layer {v.get('layer')}, {v.get('mode')}, "
        f"weight {v.get('weight')})"
        for v in vectors
    )


# --- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """What a run left in `out_dir`: the summary (as in summary.json) and what this call did."""

    data: dict[str, Any]
    out_dir: Path
    generated: int
    skipped: int
    missing_vectors: tuple[str, ...] = ()

    @property
    def responses_path(self) -> Path:
        return self.out_dir / RESPONSES

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY

    def experiment(self, name: str) -> dict[str, Any]:
        return dict(self.data["experiments"].get(name, {}))


def _check_settings(settings: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise EvaluationError(
            f"unknown settings {unknown or '(none)'}; choose among {', '.join(SETTINGS)}"
        )
    return tuple(s for s in SETTINGS if s in settings)


def count_pending(
    out_dir: str | Path, rows: Sequence[Row], *, experiment: str = "format",
    settings: Sequence[str] = SETTINGS,
) -> int:
    """How many responses a `run_evaluation` into `out_dir` still has to generate."""
    done = {_done_key(r) for r in read_responses(Path(out_dir) / RESPONSES)}
    return sum(
        (experiment, s, str(r.key)) not in done for s in _check_settings(settings) for r in rows
    )


def _sentences(text: str) -> int:
    import nltk  # type: ignore[import-untyped]

    return len(nltk.sent_tokenize(text)) if text.strip() else 0


def run_evaluation(
    lm: LoadedModel,
    rows: Sequence[Row],
    vectors: VectorSource | None,
    out_dir: str | Path,
    *,
    settings: Sequence[str] = SETTINGS,
    experiment: str = "format",
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int = 8,
    allow_transfer: bool = False,
    weights: Mapping[str, float] | None = None,
    modes: Mapping[str, Mode] | None = None,
    layers: Mapping[str, int] | None = None,
    judge: quality.Judge | None = None,
    perplexity: bool = True,
    fluency_lm: LoadedModel | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Answer `rows` in each setting, append every response to out_dir/responses.jsonl, and
    write out_dir/summary.json; responses already in the file are skipped (resume).

    `vectors` is a vector directory or a mapping from vector id to file (or SteeringVector).
    `weights`, `modes`, `layers` override what the files store, by vector id or glob
    (`{"keywords:*": 100}`); an excluded word always gets the negated weight. `transfer`
    (or `allow_transfer`) accepts vectors of another model with the same hidden size.
    Perplexity is computed unsteered under `fluency_lm` (default: `lm` itself). Greedy text
    is likely under the model that wrote it by construction (SmolLM2's own greedy answers score
    1.2-2.5), so the paper's "perplexity < 2.5 is degenerate" rule, made for an independent
    scorer (GPT-2), is applied only when `fluency_lm` is another model; with `lm` itself a
    response is degenerate by repetition alone. `progress(n)` is called after each batch is
    on disk.
    """
    started = time.perf_counter()
    settings = _check_settings(settings)
    rows = prepare_rows(rows, experiment)
    if batch_size < 1:
        raise EvaluationError("batch_size must be at least 1")
    if any(s not in WITH_INSTRUCTION for s in settings):
        lacking = [r for r in rows if r.prompt_without_instruction is None]
        if lacking:
            raise EvaluationError(
                f"{len(lacking)} rows (first: {lacking[0].source}) have no "
                "'prompt_without_instruction', which the no_instruction and steer settings "
                "need; run only --settings instruction,instruction_steer"
            )
    allow_transfer = allow_transfer or experiment == "transfer"
    steered = [s for s in settings if s in STEERED]
    if steered and vectors is None:
        raise EvaluationError(
            f"settings {', '.join(steered)} need vectors: pass a vector directory (--vectors)"
        )
    plan = _plan_vectors(
        lm, rows, vectors if steered else None, weights=weights or {}, modes=modes or {},
        layers=layers or {}, allow_transfer=allow_transfer,
    )
    if steered and plan.missing_ids:
        n_rows = sum(bool(m) for m in plan.missing.values())
        log.warning(
            "no vector file for %s: %d of %d rows run unsteered (or partly steered) in the "
            "steered settings", ", ".join(plan.missing_ids), n_rows, len(rows),
        )
    ensure_punkt()
    out = Path(out_dir)
    path = out / RESPONSES
    sampling_record = {
        "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
        "top_p": sampling.top_p, "seed": sampling.seed,
    }
    generated = skipped = 0
    with _open_for_append(path) as (handle, existing):
        _check_resume(existing, experiment, lm.model_id, sampling_record, plan, path)
        done = {_done_key(r) for r in existing}
        batches = _schedule(lm, rows, settings, experiment, done, batch_size)
        skipped = len(rows) * len(settings) - sum(len(chunk) for _, chunk in batches)
        for number, (setting, chunk) in enumerate(batches, start=1):
            records = _answer(
                lm, chunk, setting, experiment, plan, sampling, sampling_record,
                judge=judge, perplexity=perplexity, fluency_lm=fluency_lm,
            )
            payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            handle.write(payload.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            generated += len(chunk)
            if progress is not None:
                progress(len(chunk))
            if number % (4 * len(settings)) == 0:
                _write_summary(out)  # a partial table to look at while a long run goes on
    data = _write_summary(out)
    elapsed = time.perf_counter() - started
    log.info("evaluation %s: %d responses in %.1fs", experiment, generated, elapsed)
    return Summary(data, out, generated, skipped, plan.missing_ids if steered else ())


def _schedule(
    lm: LoadedModel,
    rows: Sequence[Row],
    settings: Sequence[str],
    experiment: str,
    done: set[tuple[str, str, str]],
    batch_size: int,
) -> list[tuple[str, list[Row]]]:
    """The batches still to run, a batch of every setting in turn.

    Rows go longest prompt first, so a batch holds prompts of similar length; taking the
    settings in turn means a run stopped at any point has answered about the same rows in
    every setting, so its partial table already compares like with like.
    """
    length = {str(r.key): len(lm.tokenizer(r.prompt).input_ids) for r in rows}
    ordered = sorted(rows, key=lambda r: -length[str(r.key)])
    per_setting = []
    for setting in settings:
        todo = [r for r in ordered if (experiment, setting, str(r.key)) not in done]
        per_setting.append(
            [(setting, todo[i : i + batch_size]) for i in range(0, len(todo), batch_size)]
        )
    rounds = max((len(chunks) for chunks in per_setting), default=0)
    return [chunks[i] for i in range(rounds) for chunks in per_setting if i < len(chunks)]


def _answer(
    lm: LoadedModel,
    rows: Sequence[Row],
    setting: str,
    experiment: str,
    plan: _Plan,
    sampling: Sampling,
    sampling_record: Mapping[str, Any],
    *,
    judge: quality.Judge | None,
    perplexity: bool,
    fluency_lm: LoadedModel | None,
) -> list[dict[str, Any]]:
    """One batch: generate (per-row steering), check, score fluency; records in row order."""
    t0 = time.perf_counter()
    prompts = [r.prompt_for(setting) for r in rows]
    steer = setting in STEERED
    per_row = [plan.steerings[str(r.key)] if steer else [] for r in rows]
    completions = generate(
        lm, prompts, per_row=per_row, sampling=sampling, batch_size=len(rows),
        allow_transfer=True,  # every vector was checked against the model when planned
    )
    texts = [c.text for c in completions]
    scorer = fluency_lm or lm
    independent = scorer is not lm
    ppl: list[float | None] = (
        list(quality.perplexities(scorer, prompts, texts, batch_size=len(rows)))
        if perplexity
        else [None] * len(rows)
    )
    records = []
    for row, prompt, completion, p in zip(rows, prompts, completions, ppl, strict=True):
        results = check_row(row.instruction_id_list, row.kwargs or (), row.prompt, completion.text)
        p = None if p is None or math.isnan(p) else p
        score = None
        if judge is not None:
            score = judge.score(row.prompt_without_instruction or row.prompt, completion.text)
        records.append(
            {
                "experiment": experiment,
                "setting": setting,
                "key": row.key,
                "instruction_id_list": list(row.instruction_id_list),
                "kwargs": list(row.kwargs or ()),
                "prompt": prompt,
                "response": completion.text,
                "strict": [r.strict for r in results],
                "loose": [r.loose for r in results],
                "vectors": plan.records[str(row.key)] if steer else [],
                "missing_vectors": plan.missing[str(row.key)] if steer else [],
                "fluency": {
                    "repetition": quality.repetition_rate(completion.text),
                    "perplexity": p,
                    "degenerate": quality.is_degenerate(
                        completion.text, p if independent else None
                    ),
                },
                "fluency_model": scorer.model_id if perplexity else None,
                "judge": score,
                "sentences": _sentences(completion.text),
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
                "sampling": dict(sampling_record),
                "model": lm.model_id,
            }
        )
    seconds = (time.perf_counter() - t0) / len(rows)
    for record in records:
        record["seconds"] = round(seconds, 4)
    return records


# --- summary --------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion; (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _stat(successes: int, n: int) -> dict[str, float | None]:
    if n == 0:
        return {"mean": None, "low": None, "high": None}
    low, high = wilson_interval(successes, n)
    return {"mean": successes / n, "low": low, "high": high}


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _setting_summary(records: Sequence[Mapping[str, Any]], setting: str) -> dict[str, Any]:
    strict = [list(map(bool, r["strict"])) for r in records]
    loose = [list(map(bool, r["loose"])) for r in records]
    fluency = [r.get("fluency") or {} for r in records]
    perplexities = [
        float(f["perplexity"]) for f in fluency
        if f.get("perplexity") is not None and math.isfinite(float(f["perplexity"]))
    ]
    judged = [float(r["judge"]) for r in records if r.get("judge") is not None]
    sentences = [int(r["sentences"]) for r in records if r.get("sentences") is not None]
    n = len(records)
    return {
        "n": n,
        "prompt_strict": _stat(sum(all(s) for s in strict), n),
        "prompt_loose": _stat(sum(all(s) for s in loose), n),
        "instruction_strict": _stat(sum(map(sum, strict)), sum(map(len, strict))),
        "instruction_loose": _stat(sum(map(sum, loose)), sum(map(len, loose))),
        "fluency": {
            "repetition": _mean([float(f.get("repetition", 0.0)) for f in fluency]),
            "perplexity": statistics.median(perplexities) if perplexities else None,
            "degenerate": _mean([float(bool(f.get("degenerate"))) for f in fluency]),
        },
        "judge": _mean(judged),
        "sentences": _mean(sentences),
        "n_unsteered": sum(not r.get("vectors") for r in records) if setting in STEERED else 0,
        "n_missing_vectors": sum(bool(r.get("missing_vectors")) for r in records),
        "seconds": round(sum(float(r.get("seconds") or 0.0) for r in records), 3),
    }


def summarize(responses_jsonl_path: str | Path) -> dict[str, Any]:
    """The summary of a responses file, computed from that file alone.

    Duplicate (experiment, setting, key) records count once (the first). Accuracy is IFEval's:
    prompt-level (every instruction of the row followed) and instruction-level, strict and
    loose, each with a 95% Wilson interval; instruction-level intervals treat instructions as
    independent, as IFEval does.
    """
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for record in read_responses(responses_jsonl_path):
        key = _done_key(record)
        if key not in seen:
            seen.add(key)
            records.append(record)
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_experiment.setdefault(str(record["experiment"]), []).append(record)
    experiments: dict[str, Any] = {}
    timing: dict[str, float] = {}
    for name, group in by_experiment.items():
        by_setting: dict[str, list[dict[str, Any]]] = {}
        for record in group:
            by_setting.setdefault(str(record["setting"]), []).append(record)
        order = [s for s in SETTINGS if s in by_setting] + sorted(set(by_setting) - set(SETTINGS))
        experiments[name] = {
            "n_rows": len({str(r["key"]) for r in group}),
            "settings": {s: _setting_summary(by_setting[s], s) for s in order},
            "per_instruction": _per_instruction(group, order),
            "vector_models": sorted(
                {str(v.get("model")) for r in group for v in r.get("vectors") or []}
            ),
        }
        timing[name] = round(sum(float(r.get("seconds") or 0.0) for r in group), 3)
    models = sorted({str(r.get("model")) for r in records})
    return {
        "model": ", ".join(models) if models else None,
        "experiments": experiments,
        "timing_s": timing,
    }


def _per_instruction(
    records: Sequence[Mapping[str, Any]], order: Sequence[str]
) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, list[int]]] = {}  # id -> setting -> [n, strict, loose]
    for record in records:
        for instruction_id, s, lo in zip(
            record["instruction_id_list"], record["strict"], record["loose"], strict=True
        ):
            tally = counts.setdefault(instruction_id, {}).setdefault(record["setting"], [0, 0, 0])
            tally[0] += 1
            tally[1] += bool(s)
            tally[2] += bool(lo)
    return {
        instruction_id: {
            setting: {"n": t[0], "loose": _stat(t[2], t[0]), "strict": _stat(t[1], t[0])}
            for setting in order
            if (t := by_setting.get(setting)) is not None
        }
        for instruction_id, by_setting in sorted(counts.items())
    }


def _write_summary(out_dir: Path) -> dict[str, Any]:
    data = summarize(out_dir / RESPONSES)
    target = out_dir / SUMMARY
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(target)
    return data
