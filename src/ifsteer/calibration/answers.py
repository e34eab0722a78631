"""The answers a sweep has generated, on disk as they finish, so a killed run resumes.

A sweep's cost is its answers; its scoring is cheap and deterministic. So each answer is
appended to a JSONL file the moment the engine finishes it, keyed by everything that decides
its text (the sweep, the point, the prompt, the decoding settings), and a rerun submits only
the answers the file lacks. The vectors are not in the key: a log belongs to one run
directory, whose vector files are extracted once and then only read. A line cut short by a
kill is ignored (that answer is generated again).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ifsteer.jobs import Completion

__all__ = ["AnswerLog"]


class AnswerLog:
    """Answers by key, read from `path` once and appended to as new ones finish."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._known: dict[str, Completion] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self._known[record["key"]] = Completion(**record["completion"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # the line a kill cut short

    @staticmethod
    def key(*parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> Completion | None:
        return self._known.get(key)

    def recorder(self, key: str) -> Callable[[Completion], None]:
        """An `on_done` that appends the finished answer under `key`."""

        def record(completion: Completion) -> None:
            self._known[key] = completion
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "completion": completion.__dict__}, ensure_ascii=False)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

        return record
