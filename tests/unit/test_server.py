"""The OpenAI-compatible server, run for real on a loopback port around a tiny random model.

Requests go through the real `openai` client and httpx; expected outputs come from
`ifsteer.generation.generate` called directly, so the server is checked against the library.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

import ifsteer.backends.vllm as adapter
from ifsteer.backends.hf import HFBackend
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import custom_instruction
from ifsteer.jobs import Job
from ifsteer.server import Limits, create_app, load_vector_dir
from ifsteer.server.body import parse_request
from ifsteer.server.jobs import chat_prompt
from ifsteer.server.schema import (
    ApiError,
    ChatCompletionRequest,
    Message,
    SteeringSpec,
)
from ifsteer.steering import Steering
from ifsteer.vectors import default_layer, extract_instruction, load_vector, save_vectors
from tests.bad_inputs import BAD, Served, replay
from tests.conftest import make_tiny, tiny_llama_config
from tests.unit.test_vectors import make_vector

MODEL = "tiny-llama"
MAX_TOKENS = 6
LIMITS = Limits(max_prompt_tokens=96, max_tokens=32, default_max_tokens=MAX_TOKENS)
PROMPTS = [
    "Describe a forest at dawn.",
    "Why is the sky blue?",
    "Write a note to a neighbour.",
    "Plan a picnic for a rainy afternoon with friends and family.",
    "What causes the tides in the ocean?",
    "Tell a story about a robot that learns to paint.",
    "How do bees find flowers?",
    "Explain compound interest.",
]


def _unit(seed: int, hidden: int = 64) -> torch.Tensor:
    d = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vectors")
    save_vectors(
        directory / "upper.safetensors",
        [make_vector(layer=1, mode="additive", weight=6.0, instruction_id="upper")],
    )
    save_vectors(
        directory / "lower.safetensors",
        [make_vector(layer=2, target=3.0, direction=_unit(7), instruction_id="lower")],
    )
    save_vectors(
        directory / "multi.safetensors",
        [
            make_vector(
                layer=layer,
                mode="additive",
                weight=5.0,
                direction=_unit(10 + layer),
                instruction_id="multi",
            )
            for layer in (1, 3)
        ],
        default=3,
    )
    save_vectors(
        directory / "foreign.safetensors",
        [make_vector(layer=1, model_id="other-model", instruction_id="foreign")],
    )
    return directory


@dataclass
class Running:
    url: str
    app: object

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_server() -> Iterator:
    servers = []

    def start(app) -> Running:
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        servers.append((server, thread))
        return Running(f"http://127.0.0.1:{port}", app)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def srv(tiny_lm, vector_dir, run_server) -> Running:
    app = create_app(
        tiny_lm,
        load_vector_dir(vector_dir),
        max_batch_size=32,
        limits=LIMITS,
        extract_pairs=4,
    )
    return run_server(app)


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(srv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


def _expected(lm, prompt, steering=(), *, formatted=True, max_tokens=MAX_TOKENS) -> str:
    sampling = Sampling(max_new_tokens=max_tokens)
    return generate(lm, [prompt], steering=list(steering), sampling=sampling, formatted=formatted)[
        0
    ].text


def _chat(prompt: str, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def _health(http) -> dict:
    return http.get("/health").json()["engine"]


# --- the OpenAI client, steered and not ---------------------------------------------------


def test_openai_client_gets_steered_and_unsteered_chat(client, tiny_lm, vector_dir):
    upper = load_vector(vector_dir / "upper.safetensors")
    plain = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    steered = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"steering": [{"vector": "upper"}]},
    )
    assert plain.choices[0].message.content == _expected(tiny_lm, PROMPTS[0])
    assert steered.choices[0].message.content == _expected(tiny_lm, PROMPTS[0], [Steering(upper)])
    assert plain.choices[0].message.content != steered.choices[0].message.content
    assert steered.usage.completion_tokens <= MAX_TOKENS
    assert steered.usage.prompt_tokens == len(tiny_lm.encode([PROMPTS[0]]).input_ids[0])
    assert steered.model_extra["steering"] == [
        {
            "source": "upper",
            "instruction_id": "upper",
            "layer": 1,
            "mode": "additive",
            "weight": 6.0,
        }
    ]


def test_completions_read_raw_text_and_mode_weight_overrides(client, tiny_lm, vector_dir):
    lower = load_vector(vector_dir / "lower.safetensors")
    raw = "Q: Why is the sky blue?\nA:"
    out = client.completions.create(
        model=MODEL,
        prompt=raw,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"steering": [{"vector": "lower", "mode": "additive", "weight": -9.0}]},
    )
    expected = _expected(
        tiny_lm, raw, [Steering(lower, mode="additive", weight=-9.0)], formatted=False
    )
    assert out.choices[0].text == expected
    assert out.choices[0].text != _expected(tiny_lm, raw, formatted=False)


def test_a_file_layer_other_than_the_default_can_be_asked_for(client, tiny_lm, vector_dir):
    layer1 = load_vector(vector_dir / "multi.safetensors", layer=1)
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"steering": [{"vector": "multi", "layer": 1}]},
    )
    assert out.choices[0].message.content == _expected(tiny_lm, PROMPTS[1], [Steering(layer1)])


def test_positions_narrow_a_steering_to_the_prompt_or_the_generated_tokens(
    client, http, tiny_lm, vector_dir
):
    upper = load_vector(vector_dir / "upper.safetensors")
    texts = {}
    for positions in ("all", "prompt", "generated"):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPTS[5]}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"steering": [{"vector": "upper", "positions": positions}]},
        )
        texts[positions] = out.choices[0].message.content
        expected = _expected(tiny_lm, PROMPTS[5], [Steering(upper, positions=positions)])
        assert texts[positions] == expected, positions
        shown = out.model_extra["steering"][0]
        assert shown.get("positions", "all") == positions
    assert len(set(texts.values()) | {_expected(tiny_lm, PROMPTS[5])}) == 4
    bad = http.post(
        "/v1/chat/completions",
        json=_chat(PROMPTS[0], steering=[{"vector": "upper", "positions": "middle"}]),
    )
    assert bad.status_code == 400, bad.text
    assert (bad.json()["error"]["code"], bad.json()["error"]["param"]) == (
        "invalid_value",
        "steering.0.positions",
    )


# --- streaming ----------------------------------------------------------------------------


def test_streamed_chat_adds_up_to_the_plain_answer(client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[2]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    whole = client.chat.completions.create(
        **body, extra_body={"steering": [{"vector": "upper", "weight": 3.0}]}
    )
    chunks = list(
        client.chat.completions.create(
            **body,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"steering": [{"vector": "upper", "weight": 3.0}]},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completions_of_several_prompts(http):
    body = {"model": MODEL, "prompt": PROMPTS[3:5], "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()
    texts = {0: "", 1: ""}
    finish = {}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert [texts[0], texts[1]] == [c["text"] for c in whole["choices"]]
    assert finish == {c["index"]: c["finish_reason"] for c in whole["choices"]}


# --- concurrency --------------------------------------------------------------------------


def _mixed_requests() -> list[tuple[str, dict]]:
    """32 requests: half steered with different vectors and weights, half not; chat and raw
    completions; most with MAX_TOKENS, some with fewer (a different batch group)."""
    steerings = [
        [{"vector": "upper"}],
        [{"vector": "lower"}],
        [{"vector": "multi"}],
        [{"vector": "upper", "weight": -4.0}, {"vector": "lower"}],
        [{"vector": "multi", "layer": 1, "mode": "additive", "weight": 2.5}],
    ]
    requests = []
    for i in range(32):
        prompt = PROMPTS[i % len(PROMPTS)]
        extra: dict = {"max_tokens": MAX_TOKENS - 2 if i % 8 == 7 else MAX_TOKENS}
        if i % 2 == 0:
            extra["steering"] = steerings[(i // 2) % len(steerings)]
        if i % 4 < 2:
            requests.append(("/v1/chat/completions", _chat(prompt, **extra)))
        else:
            requests.append(
                (
                    "/v1/completions",
                    {"model": MODEL, "prompt": f"Q: {prompt}\nA:", "temperature": 0, **extra},
                )
            )
    return requests


def _text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_concurrent_mixed_requests_equal_each_request_sent_alone(srv, http):
    requests = _mixed_requests()
    alone = []
    for path, body in requests:
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        alone.append(_text(response.json()))
    before = _health(http)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    together = [_text(r.json()) for r in responses]
    assert together == alone
    after = _health(http)
    assert after["largest_batch"] > 1  # the burst really was batched
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    assert after["steps"] - before["steps"] < tokens / 2  # rows decoded together, not in turn
    steered = {t for t, (_, body) in zip(alone, requests, strict=True) if "steering" in body}
    assert len(steered) > 1  # different vectors did different things


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_lm, vector_dir, run_server) -> Iterator[httpx.Client]:
    """The server the shared bad-input table is replayed against: a key, the table's vectors."""
    app = create_app(
        tiny_lm, load_vector_dir(vector_dir), api_key=Served.key, limits=LIMITS, extract_pairs=4
    )
    with httpx.Client(base_url=run_server(app).url, timeout=120) as c:
        yield c


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_and_the_next_request_succeeds(keyed, tiny_lm, case):
    served = Served(
        MODEL,
        tiny_lm.n_layers,
        LIMITS.max_prompt_tokens,
        LIMITS.max_tokens,
        missing_layer=2,
        max_body_bytes=LIMITS.max_body_bytes,
    )
    replay(keyed, served, BAD[case])
    good = keyed.post(
        "/v1/chat/completions",
        json=_chat(PROMPTS[0], max_tokens=1),
        headers={"authorization": f"Bearer {served.key}"},
    )
    assert good.status_code == 200, good.text


def test_a_base_model_chat_must_end_with_a_question(http):
    body = _chat(PROMPTS[1], max_tokens=1)
    body["messages"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (
        "invalid_request",
        "messages",
    )


def test_unknown_routes_answer_in_the_openai_error_shape(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# --- auth ---------------------------------------------------------------------------------


def test_auth_on_requires_the_bearer_key(tiny_tokenizer, run_server):
    # Its own copy of the model: each server's worker thread owns the model it steers.
    other = make_tiny(tiny_llama_config(), tiny_tokenizer, model_id=MODEL)
    running = run_server(create_app(other, {}, api_key="sekrit", limits=LIMITS))
    with httpx.Client(base_url=running.url, timeout=60) as http:
        missing = http.post("/v1/chat/completions", json=_chat(PROMPTS[0], max_tokens=1))
        wrong = http.post(
            "/v1/chat/completions",
            json=_chat(PROMPTS[0], max_tokens=1),
            headers={"Authorization": "Bearer nope"},
        )
        listing = http.get("/v1/models")
        health = http.get("/health")
    for response in (missing, wrong, listing):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert health.status_code == 200  # liveness probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=running.v1, api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=running.v1, api_key="sekrit", max_retries=0)
    out = good.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=2,
        temperature=0,
    )
    assert out.choices[0].message.content == _expected(other, PROMPTS[0], max_tokens=2)


def test_auth_off_accepts_requests_without_a_key(http):
    assert http.get("/v1/models").status_code == 200
    response = http.post(
        "/v1/chat/completions",
        json=_chat(PROMPTS[0], max_tokens=1),
        headers={"Authorization": "Bearer anything"},
    )
    assert response.status_code == 200


# --- listings and inline instructions -----------------------------------------------------


def test_models_and_vectors_are_listed(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    vectors = {v["id"]: v for v in http.get("/v1/vectors").json()["data"]}
    assert {"upper", "lower", "multi", "foreign"} <= set(vectors)
    assert vectors["foreign"]["fits_model"] is False and vectors["upper"]["fits_model"] is True
    assert vectors["multi"]["layers"] == [1, 3] and vectors["multi"]["layer"] == 3
    assert vectors["upper"]["mode"] == "additive" and vectors["upper"]["weight"] == 6.0


def test_inline_instruction_is_extracted_once_and_steers(srv, http, tiny_lm):
    text = "Reply only in lowercase letters."
    before = _health(http)["extractions"]
    body = _chat(PROMPTS[4], steering=[{"instruction": text}])

    async def twice() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(2))
            )

    first, second = asyncio.run(twice())
    third = http.post("/v1/chat/completions", json=body)
    assert _health(http)["extractions"] == before + 1  # concurrent and later requests reuse it
    layer = default_layer(tiny_lm.n_layers)
    vector = extract_instruction(tiny_lm, custom_instruction(text), [layer], n_pairs=4)[layer]
    expected = _expected(tiny_lm, PROMPTS[4], [Steering(vector)])
    assert _text(first.json()) == _text(second.json()) == _text(third.json()) == expected
    listing = http.get("/v1/vectors").text
    assert text not in listing  # another client's words stay theirs


# --- chat templates -----------------------------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_lm(tiny_tokenizer):
    """A chat model whose tokenizer, like Llama's or Gemma's, adds a BOS the template writes."""
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.chat_template = TEMPLATE
    return make_tiny(tiny_llama_config(), tok, model_id="tiny-chat")


def test_chat_prompts_reach_the_model_with_one_bos(chat_lm):
    messages = [Message(role="system", content="Be kind."), Message(role="user", content="Hi")]
    prompt = chat_prompt(chat_lm.tokenizer, messages)
    assert prompt.ids[:1] == (0,) and prompt.ids[1] != 0  # the template's BOS, alone
    assert list(prompt.ids) == chat_lm.tokenizer(prompt.text, add_special_tokens=False).input_ids
    assert chat_lm.tokenizer(prompt.text).input_ids[:2] == [0, 0]  # what adding one would do


def test_one_turn_chat_equals_the_cli_path(chat_lm):
    engine = HFBackend(chat_lm)
    prompt = chat_prompt(engine.tokenizer, [Message(role="user", content=PROMPTS[0])])
    v = make_vector(layer=2, mode="additive", weight=5.0, model_id="tiny-chat")
    job = Job(prompt.ids, (Steering(v),), Sampling(max_new_tokens=MAX_TOKENS))

    async def run() -> object:
        await engine.start()
        try:
            return await engine.generate(job)
        finally:
            await engine.close()

    completion = asyncio.run(run())
    cli = generate(
        chat_lm, [PROMPTS[0]], steering=[Steering(v)], sampling=Sampling(max_new_tokens=MAX_TOKENS)
    )[0]
    assert completion == cli
    assert completion.prompt_tokens == len(chat_lm.encode([PROMPTS[0]]).input_ids[0])


# --- the vLLM adapter's CPU-side parts ----------------------------------------------------


def test_the_server_parses_requests_for_every_engine():
    """The vLLM adapter has no request code of its own: it is a Backend behind `build_app`."""
    assert not {"SteeringSpec", "VectorStore", "build_job", "parse_request"} & set(dir(adapter))
    raw = json.dumps(_chat("hi", steering=[{"vector": "a", "mode": "additive", "weight": 2}]))
    parsed = parse_request(raw.encode(), ChatCompletionRequest, LIMITS)
    assert parsed.steering == [SteeringSpec(vector="a", mode="additive", weight=2.0)]
    with pytest.raises(ApiError) as bad:
        parse_request(raw.replace("additive", "sideways").encode(), ChatCompletionRequest, LIMITS)
    assert bad.value.param == "steering.0.mode"


def test_vllm_request_args_and_cache_salt():
    a, b = make_vector(layer=1), make_vector(layer=2, mode="additive")
    assert adapter.cache_salt([]) is None  # unsteered requests share the prefix cache
    salts = {
        adapter.cache_salt([Steering(a)]),
        adapter.cache_salt([Steering(a, weight=2.0)]),
        adapter.cache_salt([Steering(b)]),
        adapter.cache_salt([Steering(a), Steering(b)]),
        adapter.cache_salt([Steering(b), Steering(a)]),
    }
    assert len(salts) == 5
    assert adapter.cache_salt([Steering(a)]) == adapter.cache_salt([Steering(a)])
    assert adapter.steering_args([Steering(b, weight=3.0)]) == [
        {"key": adapter.vector_key(b), "mode": "additive", "weight": 3.0}
    ]
    entry = adapter.bank_entry(a)
    assert entry["layer"] == 1 and len(entry["direction"]) == 64
