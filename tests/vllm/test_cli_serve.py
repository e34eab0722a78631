"""`ifsteer serve --backend vllm` as users start it: a real subprocess (`python -m ifsteer.cli`)
on a loopback port, with an API key and a vectors directory, serving the embedded model by
name. One server for the module. (Agreement with the HF backend's answers is test_server.py's
and test_engine.py's; here, what the command adds: resolution, settings, routes, auth.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from ifsteer.models import DEFAULT_MODEL
from ifsteer.vectors import SteeringVector, default_layer, save_vectors

from .conftest import vllm_model_dir

pytestmark = pytest.mark.vllm
KEY = "cli-sekrit"
PROMPT = "Describe the city of Paris."
TOKENS = 12
FIRST_TOKEN_PROMPTS = [
    PROMPT,
    "Tell me a story.",
    "What should I cook tonight?",
    "Hi!",
    "Give me one word.",
]
LIMITS = ["--max-prompt-tokens", "512", "--max-tokens-limit", "64"]


@pytest.fixture(scope="module")
def vector() -> SteeringVector:
    """A vector for the embedded model, as `ifsteer extract` would name and size it (a random
    direction: what is checked here is that it fits, steers and narrows to its positions)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(vllm_model_dir(), local_files_only=True)
    direction = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(3))
    return SteeringVector(
        direction=direction / direction.norm(),
        norm=4.0,
        layer=default_layer(config.num_hidden_layers),
        target=0.0,
        model_id=DEFAULT_MODEL,
        hidden_size=config.hidden_size,
        instruction="Answer oddly.",
        instruction_id="odd",
        mode="additive",
        weight=16.0,
    )


@pytest.fixture(scope="module")
def url(vector, tmp_path_factory) -> Iterator[str]:
    vectors = tmp_path_factory.mktemp("vectors")
    save_vectors(vectors / "odd.safetensors", [vector])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        sys.executable,
        "-m",
        "ifsteer.cli",
        "serve",
        "--backend",
        "vllm",
        "--model",
        DEFAULT_MODEL,
        "--vectors",
        str(vectors),
        "--port",
        str(port),
        "--api-key",
        KEY,
        *LIMITS,
        "--kv-cache-gib",
        "0.25",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    with log.open("w") as sink:
        # its own process group: vLLM's engine processes are stopped with the server
        server = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"ifsteer serve exited with {server.returncode}:\n" + log.read_text()[-3000:]
                )
            assert time.monotonic() - started < 600, "no /health in 10 minutes"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        print(f"\nifsteer serve --backend vllm: /health after {time.monotonic() - started:.0f} s")
        yield base
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)


def _chat(client, steering=None, tokens: int = TOKENS, prompt: str = PROMPT) -> str:
    out = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=0,
        extra_body={"steering": steering} if steering else None,
    )
    return out.choices[0].message.content or ""


def test_the_model_is_served_under_the_hf_backends_id_and_compiled(url, client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    health = httpx.get(f"{url}/health").json()
    assert health["model"] == DEFAULT_MODEL
    assert health["engine"]["compilation_mode"] > 0  # vLLM's default, not forced eager


def test_plain_and_steered_answers(client):
    plain, steered = _chat(client), _chat(client, [{"vector": "odd"}])
    assert plain.strip()
    assert steered != plain
    assert _chat(client, [{"vector": "odd", "weight": 0.0}]) == plain


def test_streamed_deltas_join_to_the_answer(client):
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_body={"steering": [{"vector": "odd"}]},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == _chat(client, [{"vector": "odd"}])


def test_positions_split_the_prompt_from_the_generated_tokens(client):
    steered = [{"vector": "odd"}]
    prompt_only = [{"vector": "odd", "positions": "prompt"}]
    generated = [{"vector": "odd", "positions": "generated"}]
    # The first token is read off the last prompt position: "generated" leaves it as unsteered,
    # "prompt" makes it as "all" does (which changes it on some of these prompts).
    firsts = {
        prompt: [
            _chat(client, s, tokens=1, prompt=prompt)
            for s in (None, generated, steered, prompt_only)
        ]
        for prompt in FIRST_TOKEN_PROMPTS
    }
    assert all(plain == narrowed for plain, narrowed, _, _ in firsts.values()), firsts
    assert all(whole == prompted for _, _, whole, prompted in firsts.values()), firsts
    assert any(plain != whole for plain, _, whole, _ in firsts.values()), firsts
    assert _chat(client, generated) != _chat(client)


def test_requests_without_the_key_are_refused(url):
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ('{"model": "m", "messages": [', 400, "invalid_json", None),
        ({"steering": [{"vector": "nope"}]}, 404, "vector_not_found", "steering.0.vector"),
        (
            {"steering": [{"vector": "odd", "positions": "middle"}]},
            400,
            "invalid_value",
            "steering.0.positions",
        ),
        (
            {"steering": [{"vector": "odd", "weight": "heavy"}]},
            400,
            "invalid_value",
            "steering.0.weight",
        ),
        ({"steering": [{"vector": "odd", "layer": 2}]}, 422, "vector_mismatch", "steering.0.layer"),
        ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
        ({"max_tokens": 65}, 400, "invalid_value", "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "forest " * 600}]},
            400,
            "context_length_exceeded",
            "messages",
        ),
        ({"n": 2}, 400, "invalid_value", "n"),
        ({"stop": ["."]}, 400, "unsupported_parameter", "stop"),
    ],
)
def test_bad_input_gets_the_hf_servers_4xx(url, body, status, code, param):
    if isinstance(body, dict):
        body = json.dumps(
            {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                **body,
            }
        )
    response = httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        timeout=120,
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {KEY}",
        },
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_the_vector_directory_is_listed(url):
    listing = httpx.get(f"{url}/v1/vectors", headers={"authorization": f"Bearer {KEY}"}).json()
    files = [(v["id"], v["fits_model"]) for v in listing["data"] if v["source"] == "file"]
    assert files == [("odd", True)]
    # the embedded model's shipped points are listed beside it, with their validation scores
    shipped = {v["instruction_id"]: v for v in listing["data"] if v["source"] == "shipped"}
    assert shipped["detectable_format:title"]["recommended"]
    assert shipped["detectable_format:title"]["score"] is not None
