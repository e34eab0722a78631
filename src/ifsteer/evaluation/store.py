"""The responses file: one JSON line per answer, appended as made, so a run can resume.

A rerun into the same directory reads what is there, cuts a torn last line (a killed write),
locks the file against a second writer and skips every (experiment, setting, key) already
answered. `check_resume` refuses to mix answers made another way (model, sampling, vectors)
into one experiment's numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ifsteer.errors import EvaluationError
from ifsteer.rows import STEERED

__all__ = ["check_resume", "done_key", "open_for_append", "read_responses", "repair_log"]

log = logging.getLogger("ifsteer.evaluation")


def done_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
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


def repair_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log about to be appended to, its torn tail cut first: a line a
    kill cut short is dropped from the file, and a whole last record whose newline never made
    it gets one, so the next record starts a line of its own. Evaluation's responses and the
    calibration answer logs (`calibration.answers`) are such logs."""
    records, intact = _scan(path)
    size = path.stat().st_size if path.is_file() else 0
    if intact < size:
        os.truncate(path, intact)
    elif size:
        with path.open("rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    return records


@contextlib.contextmanager
def open_for_append(path: Path) -> Iterator[tuple[IO[bytes], list[dict[str, Any]]]]:
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
        yield handle, repair_log(path)


def check_resume(
    existing: Sequence[Mapping[str, Any]],
    experiment: str,
    model_id: str,
    sampling: Mapping[str, Any],
    planned: Mapping[str, Sequence[Mapping[str, Any]]],
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
        if record.get("setting") not in STEERED or key not in planned:
            continue
        old, new = record.get("vectors") or [], planned[key]
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
