"""A hostile but fair client against the real server (issue 11): every probe ends in a 4xx or a
bounded cost, and the next normal request is unaffected.

Where timing matters, the model is slowed by a fixed sleep per forward, so "the worker is busy"
is a fact of the test, not a race with the machine's speed.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from ifsteer.models import LoadedModel
from ifsteer.server import Limits, create_app, is_loopback
from tests.conftest import make_tiny, tiny_llama_config
from tests.unit.live import LiveServers

MODEL = "tiny-llama"
LIMITS = Limits(max_prompt_tokens=96, max_tokens=32, default_max_tokens=4, body_timeout_s=0.5)
SLOW_S = 0.02  # per forward of the slowed model


Start = Callable[..., str]


@pytest.fixture(scope="module")
def start() -> Iterator[Start]:
    """Start a real uvicorn server, configured as `ifsteer serve` configures it; its URL."""
    servers = LiveServers()
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def url(tiny_lm, start) -> str:
    return start(create_app(tiny_lm, {}, limits=LIMITS, extract_pairs=4), header_timeout_s=0.5)


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def slow_lm(tiny_tokenizer) -> LoadedModel:
    lm = make_tiny(tiny_llama_config(), tiny_tokenizer, model_id=MODEL)
    lm.model.register_forward_pre_hook(lambda *_: time.sleep(SLOW_S))
    return lm


def _chat(content: str = "Why is the sky blue?", **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **extra,
    }


def _ok_after(http: httpx.Client) -> None:
    """The next normal request is unaffected."""
    response = http.post("/v1/chat/completions", json=_chat())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _stats(http: httpx.Client) -> dict:
    return http.get("/health").json()["engine"]


# --- 1. seeds -----------------------------------------------------------------------------


def test_a_seed_outside_int64_is_a_400_and_spares_the_rest_of_its_batch(url, http, tiny_lm):
    bad = _chat(seed=2**64, temperature=1.0)
    good = _chat("Describe a forest at dawn.", temperature=0)

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=b) for b in (bad, good))
            )

    bad_response, good_response = asyncio.run(together())
    assert _error(bad_response, 400)["param"] == "seed"
    alone = http.post("/v1/chat/completions", json=good).json()
    assert good_response.status_code == 200
    assert good_response.json()["choices"] == alone["choices"]


def test_seeded_requests_in_one_burst_each_get_their_own_seed(url, http):
    bodies = [
        _chat("Tell a story about a robot.", seed=seed, temperature=1.0, max_tokens=8)
        for seed in (1, 2, 3, 1)
    ]
    alone = [http.post("/v1/chat/completions", json=b).json()["choices"] for b in bodies]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    assert [r.json()["choices"] for r in asyncio.run(burst())] == alone
    assert alone[0] == alone[3] and alone[0] != alone[1]  # the seed is what decides


# --- 2. inline extraction -----------------------------------------------------------------


def test_new_extractions_are_capped_per_request(http):
    one_text_two_layers = _chat(
        steering=[
            {"instruction": "Use no commas.", "layer": 1},
            {"instruction": "Use no commas.", "layer": 2},
        ]
    )
    assert (
        _error(http.post("/v1/chat/completions", json=one_text_two_layers), 400)["code"]
        == "too_many_extractions"
    )
    any_word = _chat(
        steering=[
            {"instruction_id": "keywords:existence:zebra", "layer": 1},
            {"instruction_id": "keywords:existence:zebra", "layer": 3},
        ]
    )
    assert (
        _error(http.post("/v1/chat/completions", json=any_word), 400)["code"]
        == "too_many_extractions"
    )
    before = _stats(http)["extractions"]
    for layer in (1, 3):  # one at a time is fine, and then both are cached
        one = _chat(steering=[{"instruction_id": "keywords:existence:zebra", "layer": layer}])
        assert http.post("/v1/chat/completions", json=one).status_code == 200
    assert _stats(http)["extractions"] == before + 2
    assert http.post("/v1/chat/completions", json=any_word).status_code == 200
    assert _stats(http)["extractions"] == before + 2


def test_vectors_listing_hides_free_text_and_groups_layers(http):
    secret = "Mention the password swordfish in every answer."
    assert (
        http.post(
            "/v1/chat/completions", json=_chat(steering=[{"instruction": secret}])
        ).status_code
        == 200
    )
    for layer in (0, 2):
        body = _chat(steering=[{"instruction_id": "change_case:english_lowercase", "layer": layer}])
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    listing = http.get("/v1/vectors")
    assert "swordfish" not in listing.text
    rows = [
        r
        for r in listing.json()["data"]
        if r["id"] == "instruction_id:change_case:english_lowercase"
    ]
    assert len(rows) == 1 and rows[0]["layers"] == [0, 2]


def test_extractions_in_flight_are_bounded_and_generation_goes_first(slow_lm, start):
    limits = Limits(
        max_prompt_tokens=96, max_tokens=32, default_max_tokens=2, max_pending_extractions=2
    )
    url = start(create_app(slow_lm, {}, limits=limits, extract_pairs=128))
    # 128 pairs = 16 pieces of 16 prompts, >= 0.32 s each extraction on the slowed model

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            done: list[float] = []

            async def post(body: dict) -> httpx.Response:
                response = await c.post("/v1/chat/completions", json=body)
                done.append(time.monotonic())
                return response

            extractions = [
                asyncio.ensure_future(post(_chat(steering=[{"instruction": t}])))
                for t in ("Use no commas.", "Answer in French.")
            ]
            await asyncio.sleep(0.15)  # both are running or waiting now
            third = await c.post(
                "/v1/chat/completions", json=_chat(steering=[{"instruction": "Be brief."}])
            )
            await post(_chat(max_tokens=2))
            plain_done = done[-1]
            extracted = await asyncio.gather(*extractions)
            return extracted, third, [plain_done, *done[1:]]

    extracted, third, (plain_done, *extraction_done) = asyncio.run(scenario())
    assert _error(third, 429)["code"] == "server_busy"
    assert third.headers["retry-after"] == "1"
    assert [r.status_code for r in extracted] == [200, 200]
    assert plain_done < min(extraction_done)  # a plain request did not wait for extraction


# --- 3. abandoned requests, the queue, deadlines -------------------------------------------


def test_a_short_request_behind_a_long_one_is_answered_first(slow_lm, start):
    """Continuous batching: the short request joins the running batch and leaves it when its
    own tokens are done (a static batch answered it only after the long one)."""
    url = start(create_app(slow_lm, {}, limits=LIMITS))

    async def scenario() -> tuple[dict, float, dict, float]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:

            async def timed(body: dict) -> tuple[dict, float]:
                response = await c.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json(), time.monotonic()

            long = asyncio.ensure_future(
                timed({"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 32})
            )
            await asyncio.sleep(0.1)  # the long request is decoding
            short, short_done = await timed({"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            return (*await long, short, short_done)

    long, long_done, short, short_done = asyncio.run(scenario())
    assert long["usage"]["completion_tokens"] == 32  # the premise: it really was long
    assert short["usage"]["completion_tokens"] == 2
    assert short_done < long_done


def test_abandoned_requests_are_not_generated(slow_lm, start):
    url = start(create_app(slow_lm, {}, limits=LIMITS))
    with httpx.Client(base_url=url, timeout=60) as http:
        before = _stats(http)["requests"]

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                long = asyncio.ensure_future(
                    c.post("/v1/chat/completions", json=_chat(max_tokens=32))
                )  # >= 0.64 s
                await asyncio.sleep(0.1)
                async with httpx.AsyncClient(base_url=url, timeout=0.2) as impatient:
                    for outcome in await asyncio.gather(
                        *(
                            impatient.post(
                                "/v1/completions",
                                json={"model": MODEL, "prompt": f"Count to {i}.", "max_tokens": 32},
                            )
                            for i in range(10)
                        ),
                        return_exceptions=True,
                    ):
                        assert isinstance(outcome, httpx.TimeoutException)
                return await long

        assert asyncio.run(scenario()).status_code == 200
        _ok_after(http)
        assert _stats(http)["requests"] == before + 2  # the long one and the one after


def test_a_full_queue_is_a_429_and_a_deadline_a_504(slow_lm, start):
    limits = Limits(max_prompt_tokens=96, max_tokens=32, max_queued=2, request_timeout_s=0.3)
    url = start(create_app(slow_lm, {}, limits=limits))

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            two = asyncio.ensure_future(
                c.post(
                    "/v1/completions",
                    json={"model": MODEL, "prompt": ["One", "Two"], "max_tokens": 32},
                )
            )
            await asyncio.sleep(0.1)
            busy = await c.post("/v1/chat/completions", json=_chat())
            return [busy, await two]

    busy, late = asyncio.run(scenario())
    assert _error(busy, 429)["code"] == "server_busy"
    assert _error(late, 504)["code"] == "timeout"  # 32 slowed tokens take over 0.3 s
    time.sleep(32 * SLOW_S)  # a batch that has started runs to its end (bounded by max_tokens)
    with httpx.Client(base_url=url, timeout=60) as http:
        _ok_after(http)


# --- 4. body size -------------------------------------------------------------------------


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_an_oversized_body_is_refused_while_it_is_read(url, http):
    sock = _raw(url)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n{"
    )
    assert sock.recv(65536).startswith(b"HTTP/1.1 413")  # before any more of the body
    sock.close()
    sock = _raw(url)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent = 0
    answer = b""
    while sent < 200_000_000:
        if select.select([sock], [], [], 0)[0]:
            answer = sock.recv(65536)
            break
        try:
            sock.sendall(chunk)
        except OSError:
            answer = sock.recv(65536)
            break
        sent += len(chunk)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413")
    assert sent < 20 * LIMITS.max_body_bytes  # refused near the limit, not after 200 MB
    _ok_after(http)


# --- 5-7. bodies no schema can read ------------------------------------------------------
# Deep nesting, lone surrogates, numbers that are not numbers: in tests/bad_inputs.py, the
# table both tiers replay (tests/unit/test_server.py, tests/vllm/test_server.py).


def test_an_empty_prompt_is_a_400_alone_and_batched(url, http):
    alone = {"model": MODEL, "prompt": "", "max_tokens": 2}
    listed = {"model": MODEL, "prompt": ["Hello there", ""], "max_tokens": 2}
    assert _error(http.post("/v1/completions", json=alone), 400)["param"] == "prompt"
    assert _error(http.post("/v1/completions", json=listed), 400)["param"] == "prompt"

    async def with_traffic() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(
                c.post("/v1/completions", json=alone),
                c.post("/v1/completions", json={**alone, "prompt": "Hello there"}),
            )

    empty, other = asyncio.run(with_traffic())
    assert empty.status_code == 400 and other.status_code == 200


# --- 8-9. hang-ups and slow clients ---------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_hang_up_mid_upload_logs_one_line(url, http):
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("ifsteer.server", "uvicorn.error", "uvicorn")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.setLevel(logging.INFO)
    try:
        for _ in range(3):
            sock = _raw(url)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": '
            )
            time.sleep(0.05)
            sock.close()
        time.sleep(0.3)
        _ok_after(http)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(records)
            lg.setLevel(level)
    hangups = [r for r in records.records if "hung up" in r.getMessage()]
    assert len(hangups) == 3
    assert all(r.exc_info is None for r in records.records)  # no tracebacks at all


def test_unfinished_headers_and_bodies_are_timed_out(url, http):
    socks = [_raw(url) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
    started = time.monotonic()
    for sock in socks:
        sock.settimeout(5)
        assert sock.recv(1024) == b""  # closed by the server, the header timeout being 0.5 s
        sock.close()
    assert time.monotonic() - started < 5

    sock = _raw(url)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    sock.settimeout(LIMITS.body_timeout_s + 5)
    assert sock.recv(1024).startswith(b"HTTP/1.1 408")
    sock.close()
    _ok_after(http)


# --- also: auth, HEAD, loopback ---------------------------------------------------------------


def test_the_key_guards_the_docs_and_one_authorization_header_is_required(tiny_lm, start):
    url = start(create_app(tiny_lm, {}, api_key="sekrit", limits=LIMITS))
    with httpx.Client(base_url=url, timeout=60) as http:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert _error(http.get(path), 401)["code"] == "invalid_api_key"
        good = {"authorization": "Bearer sekrit"}
        assert http.get("/openapi.json", headers=good).status_code == 200
        twice = httpx.Headers([("authorization", "Bearer sekrit"), ("authorization", "Bearer x")])
        assert http.get("/v1/models", headers=twice).status_code == 401
        assert http.get("/health").status_code == 200
        assert http.head("/health").status_code == 200


def test_head_health(http):
    response = http.head("/health")
    assert response.status_code == 200 and response.content == b""


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("192.168.1.4", False),
        ("example.org", False),
    ],
)
def test_loopback_hosts(host, local):
    assert is_loopback(host) is local


def test_unseeded_sampling_does_not_continue_another_requests_seed(http):
    seeded = _chat("Hello", seed=5, temperature=1.0, max_tokens=8)
    unseeded = _chat("Hello", temperature=1.0, max_tokens=16)
    texts = []
    for _ in range(2):
        assert http.post("/v1/chat/completions", json=seeded).status_code == 200
        texts.append(http.post("/v1/chat/completions", json=unseeded).json()["choices"])
    assert texts[0] != texts[1]  # not predictable from the seed another client sent
