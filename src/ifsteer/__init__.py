"""ifsteer: make language models follow instructions better by activation steering.

The names a library user needs, from one place (`from ifsteer import load_model, steer`).
They resolve on first use (`__getattr__`): `import ifsteer` stays cheap, so the CLI's `--help`
and the modules that only need `__version__` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IfsteerError": "errors",
    "LoadedModel": "models",
    "load_model": "models",
    "Instruction": "instructions",
    "custom_instruction": "instructions",
    "get_instruction": "instructions",
    "list_instructions": "instructions",
    "Row": "rows",
    "load_rows": "rows",
    "prepare_rows": "rows",
    "split_rows": "splits",
    "SteeringVector": "vectors",
    "VectorFile": "vectors",
    "extract_instruction": "vectors",
    "extract_vectors": "vectors",
    "load_vector": "vectors",
    "load_vector_directory": "vectors",
    "read_vector_file": "vectors",
    "save_vectors": "vectors",
    "Steering": "steering",
    "steer": "steering",
    "Completion": "generation",
    "Sampling": "generation",
    "generate": "generation",
    "run_evaluation": "evaluation",
    "summarize": "evaluation",
    "apply_choice": "calibration",
    "calibrate": "calibration",
    "sweep_layers": "calibration",
    "sweep_weights": "calibration",
    "render_report": "report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ifsteer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ifsteer.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
