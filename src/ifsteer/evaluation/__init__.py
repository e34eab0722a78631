"""Evaluation of the paper's four settings, by concern.

- `plan`: which steerings each row gets (vectors read once, overrides by id or glob);
- `store`: the resumable ``responses.jsonl``;
- `run`: `run_evaluation`, the loop that answers, checks and appends;
- `summary`: the tables and the paper's published numbers (torch-free).

Names resolve on first use (`__getattr__`) rather than at import: the report and the CLI import
`ifsteer.evaluation.summary`, which runs this file first, and an eager import of `run` here
would load torch and transformers for a page that needs neither.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VectorPlan": "plan",
    "VectorSource": "plan",
    "plan_vectors": "plan",
    "read_responses": "store",
    "DEFAULT_SAMPLING": "run",
    "Summary": "run",
    "count_pending": "run",
    "run_evaluation": "run",
    "HEADLINE_METRIC": "summary",
    "PAPER_RESULTS": "summary",
    "summarize": "summary",
    "wilson_interval": "summary",
    "write_summary": "summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ifsteer.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ifsteer.evaluation.{module}"), name)
