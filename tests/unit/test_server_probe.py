"""Issue 17 §2: the defects an independent probe found, each against a real server on loopback.

Request-level refusals (numbers, unsupported fields, ranges) are rows of tests/bad_inputs.py,
which both tiers replay; what needs traffic alongside, raw sockets or a chat template is here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from ifsteer.server import create_app
from tests.unit.live import LiveServers
from tests.unit.test_server_hardening import LIMITS, MODEL, _chat, _error, _ok_after


@pytest.fixture(scope="module")
def start() -> Iterator[LiveServers]:
    servers = LiveServers()
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def url(tiny_lm, start) -> str:
    return start(create_app(tiny_lm, {}, limits=LIMITS))


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


# --- 2.1 / 2.2: numbers ---------------------------------------------------------------------


def test_a_row_float32_cannot_sample_is_a_400_and_its_neighbours_finish(url, http):
    greedy = [_chat(f"Describe a city in {i + 2} words.", temperature=0) for i in range(6)]
    alone = [http.post("/v1/chat/completions", json=b).json()["choices"] for b in greedy]
    bad = [
        _chat("Hi", temperature=1e-300, seed=1),
        _chat("Hi", temperature=1e-40),
        _chat("Hi", temperature=5e-324),
        _chat("Hi", top_p=1e-46, temperature=1.0),
    ]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=b) for b in [*bad, *greedy])
            )

    responses = asyncio.run(together())
    assert [_error(r, 400)["param"] for r in responses[: len(bad)]] == [
        "temperature",
        "temperature",
        "temperature",
        "top_p",
    ]
    assert [r.json()["choices"] for r in responses[len(bad) :]] == alone


def test_an_integer_past_int_conversion_limit_is_a_400_anywhere(http):
    raw = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, '
        b'"metadata": {"n": %s}}' % (MODEL.encode(), b"9" * 4301)
    )
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert _error(response, 400)["code"] == "invalid_json"
    assert "4301 digits" in response.json()["error"]["message"]
    _ok_after(http)


def test_max_completion_tokens_is_honoured_on_completions(http):
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_completion_tokens": 3}
    response = http.post("/v1/completions", json={**body, "ignore": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3
    assert response.json()["choices"][0]["finish_reason"] == "length"
