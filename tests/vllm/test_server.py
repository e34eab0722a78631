"""The HTTP server over the vLLM engine: the OpenAI client, streaming, inline instructions, auth
and the HF server's errors, on a real uvicorn server (loopback port) and one vLLM engine."""

from __future__ import annotations

import json
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
from ifsteer.server import build_app
from ifsteer.steering import Steering
from ifsteer.vectors import default_layer, extract_instruction

from .conftest import vllm_model_dir

pytestmark = pytest.mark.vllm
KEY = "sekrit"
PROMPTS = ["Why is the sky blue?", "Tell me about the moon."]
TOKENS = 16


@pytest.fixture(scope="module")
def hf():
    lm = load_model(DEFAULT_MODEL, "float32")
    layer = default_layer(lm.n_layers)
    upper = extract_instruction(
        lm, get_instruction("change_case:english_capital"), [layer], n_pairs=16
    )[layer].with_defaults(weight=2.0)
    return lm, upper


@pytest.fixture(scope="module")
def url(hf):
    lm, upper = hf
    engine = VLLMEngine(
        str(vllm_model_dir()), model_id=lm.model_id, dtype="float32", max_model_len=1024,
        kv_cache_memory_bytes=256 << 20, extract_pairs=16,
    )
    app = build_app(engine, {"upper": upper}, api_key=KEY)
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
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS,
        temperature=0, extra_body={"steering": steering} if steering else None, **extra,
    )
    return out.choices[0].message.content or ""


def test_the_openai_client_gets_the_hf_backends_answers(hf, client):
    lm, upper = hf
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
    lm, _ = hf
    stream = client.chat.completions.create(
        model=lm.model_id, messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=TOKENS, temperature=0, stream=True,
        extra_body={"steering": [{"vector": "upper"}]},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == _chat(client, lm.model_id, PROMPTS[0], [{"vector": "upper"}])


def test_inline_instructions_are_extracted_once_and_steer(hf, client):
    lm, _ = hf
    layer = default_layer(lm.n_layers)
    inline = [{"instruction": "Answer in capital letters only.", "layer": layer}]
    first = _chat(client, lm.model_id, PROMPTS[1], inline)
    assert first != _chat(client, lm.model_id, PROMPTS[1])
    assert _chat(client, lm.model_id, PROMPTS[1], inline) == first


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ('{"model": "m", "messages": [', 400, "invalid_json", None),
    ({"steering": [{"vector": "nope"}]}, 404, "vector_not_found", "steering.0.vector"),
    ({"steering": [{"vector": "upper", "mode": "add"}]}, 400, "invalid_value", "steering.0.mode"),
    ({"steering": [{"vector": "upper", "wieght": 2}]}, 400, "invalid_value",
     "steering.0.wieght"),
    ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
    ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"max_tokens": 1000}, 400, "context_length_exceeded", "max_tokens"),
    ({"stop": ["."]}, 400, "unsupported_parameter", "stop"),
])
def test_bad_input_gets_the_hf_servers_4xx(hf, url, body, status, code, param):
    lm, _ = hf
    if isinstance(body, dict):
        body = json.dumps({
            "model": lm.model_id, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, **body,
        })
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=120, headers={
        "content-type": "application/json", "authorization": f"Bearer {KEY}",
    })
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_requests_without_the_key_are_refused(hf, url):
    lm, _ = hf
    response = httpx.post(f"{url}/v1/chat/completions", json={
        "model": lm.model_id, "messages": [{"role": "user", "content": "hi"}],
    })
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
