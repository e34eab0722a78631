"""The vLLM adapter end to end on a GPU: the same HTTP face, served by vLLM's CUDA build.

tests/vllm runs the same checks (and more) with vLLM's CPU build on CI; this module keeps what
only a GPU shows: vLLM's CUDA kernels, memory settings, and its defaults (torch.compile and CUDA
graphs, which the steering op must be captured in) against the HF reference and against an
eager engine. The overhead is measured by `benchmarks/vllm_overhead.py` (see
`benchmarks/gpu_check.sh`), never asserted here.

Skipped, loudly (a warning in the summary, plus the skip reason), without CUDA or without vLLM
(`pip install 'ifsteer[vllm]'`, vllm==0.32.0). Uses the embedded SmolLM2-135M (its converted
Hugging Face directory) unless IFSTEER_VLLM_MODEL names another local directory; vectors are
extracted with the Hugging Face backend, the reference every check compares against.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import warnings
from typing import Any

import pytest

pytestmark = pytest.mark.gpu


def _skip(reason: str) -> None:
    warnings.warn(f"tests/gpu/test_vllm.py skipped: {reason}", stacklevel=2)
    pytest.skip(reason, allow_module_level=True)


try:
    import torch
except ImportError:  # pragma: no cover - torch is a core dependency
    _skip("torch is not importable")
if not torch.cuda.is_available():
    _skip("needs CUDA: the vLLM adapter runs on NVIDIA GPUs, none is visible here")
try:
    import vllm  # noqa: F401
except ImportError:
    _skip("needs vLLM: pip install 'ifsteer[vllm]' (targets vllm==0.32.0)")

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402

from ifsteer.backends.vllm import VLLMEngine  # noqa: E402
from ifsteer.chat import render_chat  # noqa: E402
from ifsteer.generation import Sampling, generate  # noqa: E402
from ifsteer.instructions import get_instruction  # noqa: E402
from ifsteer.jobs import Job  # noqa: E402
from ifsteer.models import DEFAULT_MODEL, cache_dir, load_model  # noqa: E402
from ifsteer.server import build_app  # noqa: E402
from ifsteer.steering import Steering  # noqa: E402
from ifsteer.vectors import default_layer, extract_instruction  # noqa: E402

PROMPTS = [
    "Describe a forest at dawn.",
    "Why is the sky blue?",
    "Write a note to a neighbour who lent you a ladder.",
    "Explain how bees tell the hive where flowers are.",
]
TOKENS = 24


@pytest.fixture(scope="module")
def hf():
    """The Hugging Face model (float32, CPU) and the vectors the tests steer with."""
    lm = load_model(os.environ.get("IFSTEER_VLLM_MODEL", DEFAULT_MODEL), "float32")
    layer = default_layer(lm.n_layers)
    lower = extract_instruction(
        lm, get_instruction("change_case:english_lowercase"), [layer], n_pairs=16
    )[layer]
    louder = lower.with_defaults(mode="additive", weight=4 * lower.norm)
    zero = lower.with_defaults(mode="additive", weight=0.0)
    return lm, {"lower": lower, "louder": louder, "zero": zero}


def _engine(lm, **settings) -> VLLMEngine:
    """The embedded model's (or IFSTEER_VLLM_MODEL's) engine in float32; `settings` are each
    fixture's share of the GPU and its compilation."""
    source = os.environ.get("IFSTEER_VLLM_MODEL") or str(cache_dir(DEFAULT_MODEL))
    return VLLMEngine(source, model_id=lm.model_id, dtype="float32", max_model_len=2048, **settings)


@pytest.fixture(scope="module")
def served(hf):
    lm, vectors = hf
    app = build_app(_engine(lm, gpu_memory_utilization=0.4), vectors)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while not server.started:
        assert thread.is_alive(), "server (vLLM engine) failed to start"
        assert time.monotonic() < deadline, "vLLM engine did not start in 10 minutes"
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", lm.model_id
    server.should_exit = True
    thread.join(timeout=120)


@pytest.fixture(scope="module")
def eager(hf):
    """The same engine with `enforce_eager=True`: the op run as plain calls, no graph."""
    lm, _ = hf
    engine = _engine(lm, gpu_memory_utilization=0.3, enforce_eager=True)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    yield loop, engine
    loop.run_until_complete(engine.close())
    loop.close()


def _chat(url: str, model: str, prompt: str, steering=None) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    extra = {"steering": steering} if steering else None
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=TOKENS,
        temperature=0,
        extra_body=extra,
    )
    return out.choices[0].message.content or ""


def _hf(lm, prompt: str, steering=()) -> str:
    return generate(
        lm, [prompt], steering=list(steering), sampling=Sampling(max_new_tokens=TOKENS)
    )[0].text


def test_the_engine_runs_compiled_with_cuda_graphs(served):
    url, _ = served
    stats = httpx.get(f"{url}/health").json()["engine"]
    assert stats["compilation_mode"] > 0 and stats["cudagraph_mode"] != "NONE", stats


def test_unsteered_and_steered_answers_match_the_hf_backend(served, hf):
    url, model = served
    lm, vectors = hf
    for prompt in PROMPTS[:2]:
        plain = _chat(url, model, prompt)
        steered = _chat(url, model, prompt, [{"vector": "louder"}])
        # Different kernels: compare the opening, where float32 greedy decoding agrees.
        assert plain[:20] == _hf(lm, prompt)[:20]
        assert steered[:20] == _hf(lm, prompt, [Steering(vectors["louder"])])[:20]
        assert steered != plain


def test_zero_weight_is_transparent(served):
    url, model = served
    assert _chat(url, model, PROMPTS[2], [{"vector": "zero"}]) == _chat(url, model, PROMPTS[2])


def test_prefix_cache_never_mixes_steered_and_unsteered_kv(served):
    url, model = served
    prompt = PROMPTS[3] + " " + "Take your time and be thorough. " * 20  # several KV blocks
    first_plain = _chat(url, model, prompt)
    steered = _chat(url, model, prompt, [{"vector": "louder"}])  # same prefix, other salt
    again_plain = _chat(url, model, prompt)  # may reuse the first plain run's blocks
    again_steered = _chat(url, model, prompt, [{"vector": "louder"}])
    assert again_plain == first_plain
    assert again_steered == steered != first_plain


def test_concurrent_mixed_requests_equal_each_sent_alone(served):
    url, model = served
    requests = [
        (PROMPTS[i % 4], [{"vector": ["lower", "louder"][i % 4 // 2]}] if i % 2 else None)
        for i in range(16)
    ]
    alone = [_chat(url, model, p, s) for p, s in requests]

    assert asyncio.run(_burst(url, model, requests)) == alone


def test_bad_steering_is_refused_by_the_shared_parser(served):
    url, model = served
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "steering": [{"vector": "nope"}],
        },
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "steering.0.vector"


def test_graph_replayed_steering_agrees_with_the_eager_engine(served, hf, eager):
    """One captured graph serves every plan: a concurrent burst mixing two steerings and none,
    replayed through CUDA graphs, gives the eager engine's answers (the op's calls without a
    graph). Compiled kernels round differently from eager ones, so a near-tie may flip one."""
    url, model = served
    _, vectors = hf
    loop, reference = eager
    requests = [(PROMPTS[i % 4], ["lower", "louder", None][i % 3]) for i in range(12)]

    async def alone(prompt: str, name: str | None) -> str:
        steering = (Steering(vectors[name]),) if name else ()
        rendered = render_chat(reference.tokenizer, [("user", prompt)])
        job = Job(rendered.ids, steering, Sampling(max_new_tokens=TOKENS))
        return (await reference.generate(job)).text

    expected = [loop.run_until_complete(alone(p, n)) for p, n in requests]
    steered = [(p, [{"vector": n}] if n else None) for p, n in requests]
    graphed = asyncio.run(_burst(url, model, steered))
    agree = sum(a == b for a, b in zip(graphed, expected, strict=True))
    assert agree >= 10, list(zip(graphed, expected, strict=True))
    assert len(set(expected)) >= 8  # the steerings really differ


async def _burst(url: str, model: str, requests: list[tuple[str, Any]]) -> list[str]:
    """Every (prompt, steering or None) sent at once to the server, greedy; the answers."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        responses = await asyncio.gather(
            *(
                c.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": p}],
                        "max_tokens": TOKENS,
                        "temperature": 0,
                        **({"steering": s} if s else {}),
                    },
                )
                for p, s in requests
            )
        )
    return [r.json()["choices"][0]["message"]["content"] for r in responses]
