"""The layout of a run directory, and the one way its JSON files are written.

Evaluation, calibration, the paper pipeline and the report all read or write the same
directory; its file names live here so they agree:

```
RUN/
  responses.jsonl     every response, appended as made (evaluation; resumable)
  summary.json        the tables, recomputed from responses.jsonl
  split.json          validation / evaluation keys (run-paper)
  run.json            options, stages, timings (run-paper)
  vectors/<id>.safetensors
  sweeps/<id>.json    a sweep's grid and choice (+ <id>.responses.jsonl, <id>.png)
  figures/*.png       report.html's figures
  report.html
```

JSON goes through a hidden temporary file and a rename, so a reader (or a resumed run) never
sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWERS",
    "FIGURES",
    "REPORT",
    "RESPONSES",
    "RUN",
    "SPLIT",
    "SUMMARY",
    "SWEEPS",
    "VECTORS",
    "file_stem",
    "sweep_path",
    "vector_path",
    "write_json",
]

RESPONSES = "responses.jsonl"
SUMMARY = "summary.json"
SPLIT = "split.json"
RUN = "run.json"
VECTORS = "vectors"
SWEEPS = "sweeps"
ANSWERS = "answers.jsonl"  # in SWEEPS: every sweep answer, as it finished
FIGURES = "figures"
REPORT = "report.html"


def file_stem(instruction_id: str) -> str:
    """An instruction id as a file name: ':' becomes '__', so ids are valid names everywhere."""
    return instruction_id.replace(":", "__").replace("/", "_")


def vector_path(run_dir: Path, vector_id: str) -> Path:
    return run_dir / VECTORS / f"{file_stem(vector_id)}.safetensors"


def sweep_path(sweeps_dir: Path, group: str) -> Path:
    return sweeps_dir / f"{file_stem(group)}.json"


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented UTF-8 JSON, atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
