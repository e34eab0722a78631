"""What keeps one client from costing the others: bounded bodies, queues, deadlines, timeouts.

Everything here sits between the socket and the backend, so it holds for any of them: a body
is refused while it is read, a request whose client hung up stops waiting (and its queued job
is dropped), the number of completions in flight is capped, and a connection that never
finishes its headers is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import h11
from fastapi import Request
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .schema import ApiError, Limits, error_body

log = logging.getLogger("ifsteer.server")
T = TypeVar("T")


class ClientGone(ApiError):
    """The client hung up; the answer goes nowhere, so it is logged once and not generated."""

    status = 499


# --- bodies -------------------------------------------------------------------------------


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused as soon as it passes the limit (Content-Length or chunked), within
    `body_timeout_s` of the headers."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(f"request body is {int(declared)} bytes", limits)
    try:  # wait_for, not asyncio.timeout: Python 3.10 is supported
        return await asyncio.wait_for(_read_capped(request, limits), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            f"the request body took over {limits.body_timeout_s:g} s to arrive",
            code="request_timeout",
            status=408,
        ) from None
    except ClientDisconnect:
        raise ClientGone("client hung up during the upload", code="client_disconnected") from None


async def _read_capped(request: Request, limits: Limits) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise _too_large(f"request body is over {len(body)} bytes", limits)
    return bytes(body)


def _too_large(what: str, limits: Limits) -> ApiError:
    return ApiError(
        f"{what}, the limit is {limits.max_body_bytes}", code="request_too_large", status=413
    )


# --- waiting on the backend ---------------------------------------------------------------


async def unless_abandoned(request: Request, work: Awaitable[T], limits: Limits) -> T:
    """`work`'s result, or cancel it when the client hangs up or the deadline passes.

    Cancelling the backend's future is what drops a queued job: the HF backend skips rows whose
    future is done, so an abandoned request costs nothing once it is off the socket.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {task, watcher},
            timeout=limits.request_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    if watcher in done:
        raise ClientGone("client hung up before its completion", code="client_disconnected")
    raise ApiError(
        f"the request did not finish within {limits.request_timeout_s:g} s",
        code="timeout",
        status=504,
    )


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Admission:
    """Completions in flight over all requests; past `max_queued`, a 429 the client can retry."""

    limit: int
    in_flight: int = 0

    def take(self, n: int) -> Callable[[], None]:
        """Room for n completions, or a 429; the returned release may be called twice."""
        if self.in_flight + n > self.limit:
            raise ApiError(
                f"the server is busy: {self.in_flight} completions in flight, the limit is "
                f"{self.limit}; retry shortly",
                code="server_busy",
                status=429,
            )
        self.in_flight += n
        held = [n]

        def release() -> None:
            self.in_flight -= held.pop() if held else 0

        return release

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        release = self.take(n)
        try:
            yield
        finally:
            release()


# --- auth ---------------------------------------------------------------------------------


class BearerAuth:
    """Every path but `/health` needs the key, the API docs included; exactly one
    Authorization header, so a proxy and a client cannot disagree on which was checked."""

    open_paths = frozenset({"/health"})

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._ok(scope):
            await self.app(scope, receive, send)
            return
        await send_json(
            send,
            401,
            error_body(
                "missing or incorrect API key: send one 'Authorization: Bearer <key>' header",
                code="invalid_api_key",
                param=None,
                status=401,
            ),
            [(b"www-authenticate", b"Bearer")],
        )

    def _ok(self, scope: dict[str, Any]) -> bool:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


async def send_json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


# --- connections --------------------------------------------------------------------------


class _TimedHeaders(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline to finish each request's headers: uvicorn has
    none, so a client that sends half a header holds its connection forever (slowloris)."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # between requests
            self._arm()
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # headers are in
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def send_400_response(self, msg: str) -> None:
        """h11's protocol errors (a malformed request line, oversized headers) in OpenAI's
        error shape, as every other error is, instead of uvicorn's text/plain."""
        body = json.dumps(
            error_body(
                f"malformed HTTP request: {msg}", code="invalid_http", param=None, status=400
            )
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (all of 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def uvicorn_config(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout_s: float = 10.0,
    keep_alive_s: int = 5,
) -> Any:
    """The uvicorn settings `serve` runs with (and the tests start): header and keep-alive
    timeouts, h11's 16 KiB cap on a request's headers."""
    import uvicorn

    protocol = type("TimedHeaders", (_TimedHeaders,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=keep_alive_s,
        h11_max_incomplete_event_size=16 * 1024,
    )


__all__ = [
    "Admission",
    "BearerAuth",
    "ClientGone",
    "is_loopback",
    "read_body",
    "send_json",
    "unless_abandoned",
    "uvicorn_config",
]
