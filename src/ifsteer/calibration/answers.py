"""The answers a calibration has generated, on disk as they finish, so a killed run resumes.

A calibration's cost is its answers; its scoring is cheap and deterministic. So each answer is
appended to a JSONL file the moment it is made, under a key of everything that decides its
text, and a rerun makes only the answers the file lacks. The paper's sweep keys an answer by
its sweep, point, prompt and decoding settings and stores the completion (`get`, `recorder`);
the staged search keys a scored record by (point, prompt index), so a rerun with other fluency
thresholds needs no generation either. The vectors are not in the key: a log belongs to one run
(or build) directory, whose vector files are extracted once and then only read.

A line cut short by a kill is dropped from the file when it is opened (`evaluation.store`'s
`repair_log`, shared with evaluation's responses): that answer is made again.

A log holds the answers of one *setting*, which its name carries (`setting_suffix`): an answer
a decider stopped early is cut short, and vLLM's answers differ numerically from the HF
engine's, so reusing one setting's answers under another would change later scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from ifsteer.evaluation.store import repair_log
from ifsteer.jobs import Completion

__all__ = ["AnswerLog", "made_as", "search_key", "setting_suffix"]

_SETTING_TAGS = ("vllm", "early")

Record = dict[str, Any]


def _sweep_key(record: Record) -> Hashable:
    return record["key"]


def setting_suffix(backend: str = "hf", early_stop: bool = False) -> str:
    """What a log's name adds (before `.jsonl`) to say how its answers were made: nothing for
    the HF engine run to the end (so the logs of earlier builds stay valid), else `.vllm`,
    `.early` or `.vllm.early`."""
    on = (backend == "vllm", early_stop)
    return "".join(f".{tag}" for tag, used in zip(_SETTING_TAGS, on, strict=True) if used)


def made_as(path: Path) -> str:
    """The setting a log's name carries (`setting_suffix` of it)."""
    parts = path.name.split(".")[1:-1]
    return "".join(f".{tag}" for tag in _SETTING_TAGS if tag in parts)


def search_key(record: Record) -> Hashable:
    """A search record's key: its point and the index of its validation prompt."""
    return (record["point"], int(record["prompt"]))


class AnswerLog:
    """Records by key, read from `path` once and appended to as new ones come; with no path,
    in memory only."""

    def __init__(
        self, path: str | Path | None, key: Callable[[Record], Hashable] = _sweep_key
    ) -> None:
        self.path = None if path is None else Path(path)
        self.key_of = key
        self.records: dict[Hashable, Record] = {}
        if self.path is not None and self.path.is_file():
            for record in repair_log(self.path):
                self.records[key(record)] = record

    def add(self, records: Sequence[Record]) -> None:
        for record in records:
            self.records[self.key_of(record)] = record
        if self.path is not None and records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # --- the sweep's answers: a completion under a key of its settings --------------------------

    @staticmethod
    def key(*parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> Completion | None:
        record = self.records.get(key)
        return None if record is None else Completion(**record["completion"])

    def recorder(self, key: str) -> Callable[[Completion], None]:
        """An `on_done` that appends the finished answer under `key`."""

        def record(completion: Completion) -> None:
            self.add([{"key": key, "completion": completion.__dict__}])

        return record
