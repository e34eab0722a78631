"""The HTTP server over the vLLM engine: the OpenAI client, streaming, inline instructions, auth
and the HF server's errors, on a real uvicorn server (loopback port) and one vLLM engine."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from ifsteer.backends.vllm import VLLMEngine
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.models import DEFAULT_MODEL, load_model
from ifsteer.server import Limits, NamedVector, build_app
from ifsteer.steering import Steering
from ifsteer.vectors import default_layer, extract_instruction
from tests.bad_inputs import BAD, Served, replay

from .conftest import vllm_model_dir

pytestmark = pytest.mark.vllm
KEY = Served.key
LIMITS = Limits(max_prompt_tokens=512, max_tokens=64)
PROMPTS = ["Why is the sky blue?", "Tell me about the moon."]
TOKENS = 16


@pytest.fixture(scope="module")
def hf():
    lm = load_model(DEFAULT_MODEL, "float32")
    layer = default_layer(lm.n_layers)
    extracted = extract_instruction(
        lm, get_instruction("change_case:english_capital"), [layer, layer + 2], n_pairs=16
    )
    upper = extracted[layer].with_defaults(weight=2.0)
    return lm, upper, extracted


@pytest.fixture(scope="module")
def url(hf):
    """The server, holding the vectors the shared bad-input table names."""
    lm, upper, extracted = hf
    engine = VLLMEngine(
        str(vllm_model_dir()),
        model_id=lm.model_id,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=256 << 20,
        extract_pairs=16,
    )
    named = {
        "upper": upper,
        "foreign": dataclasses.replace(upper, model_id="other-model"),
        "multi": NamedVector(upper, extracted),  # two layers apart: lacks the one between
    }
    app = build_app(engine, named, api_key=KEY, limits=LIMITS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while not server.started:
        assert thread.is_alive(), "the server (vLLM engine) failed to start"
        assert time.monotonic() < deadline, "the vLLM engine did not start in 10 minutes"
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=120)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)


def _chat(client, model: str, prompt: str, steering=None, **extra) -> str:
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"steering": steering} if steering else None,
        **extra,
    )
    return out.choices[0].message.content or ""


def test_the_openai_client_gets_the_hf_backends_answers(hf, client):
    lm, upper, _ = hf
    for prompt in PROMPTS:
        plain = _chat(client, lm.model_id, prompt)
        steered = _chat(client, lm.model_id, prompt, [{"vector": "upper"}])
        hf_plain, hf_steered = (
            generate(lm, [prompt], steering=s, sampling=Sampling(max_new_tokens=TOKENS))[0].text
            for s in ([], [Steering(upper)])
        )
        assert (plain, steered) == (hf_plain, hf_steered)
        assert steered != plain


def test_streamed_text_is_the_whole_answer(hf, client):
    lm, *_ = hf
    stream = client.chat.completions.create(
        model=lm.model_id,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_body={"steering": [{"vector": "upper"}]},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == _chat(client, lm.model_id, PROMPTS[0], [{"vector": "upper"}])


def test_inline_instructions_are_extracted_once_and_steer(hf, client):
    lm, *_ = hf
    layer = default_layer(lm.n_layers)
    inline = [{"instruction": "Answer in capital letters only.", "layer": layer}]
    first = _chat(client, lm.model_id, PROMPTS[1], inline)
    assert first != _chat(client, lm.model_id, PROMPTS[1])
    assert _chat(client, lm.model_id, PROMPTS[1], inline) == first


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_the_hf_servers_4xx(hf, url, case):
    lm, *_ = hf
    served = Served(
        lm.model_id,
        lm.n_layers,
        LIMITS.max_prompt_tokens,
        LIMITS.max_tokens,
        missing_layer=default_layer(lm.n_layers) + 1,
        max_body_bytes=LIMITS.max_body_bytes,
        key=KEY,
    )
    with httpx.Client(base_url=url, timeout=120) as client:
        replay(client, served, BAD[case])
