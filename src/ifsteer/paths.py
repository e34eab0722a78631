"""Where ifsteer keeps what it derives once: converted models, nltk data, assembled GGUFs.

A module of its own, free of torch, so the IFEval checks can use it without loading a model
stack.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("IFSTEER_HOME", Path.home() / ".cache" / "ifsteer"))


def build_home(model_id: str) -> Path:
    """Where `ifsteer vectors build` keeps a model's answers and trained vectors by default;
    `ifsteer train` and the keyword benchmarks read the same answers there."""
    return cache_home() / "build" / model_id
