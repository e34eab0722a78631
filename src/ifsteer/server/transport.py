"""What reaches the routes at all: who may talk to a loopback server, and how a body is framed.

A keyless server on 127.0.0.1 trusts that only this machine can reach it, but any web page the
machine's browser opens can send it requests: a cross-origin `text/plain` POST needs no CORS
preflight, and DNS rebinding points an attacker's host name at 127.0.0.1 so the page can read
the answers too. So a connection that arrives over loopback must name a loopback host
(`Host: attacker.example` is refused) and any `Origin` it sends must be a loopback one; every
POST body must be `application/json` (which a browser cannot send cross-origin without a
preflight, and the server answers preflights with no CORS headers). A request carrying both
`Transfer-Encoding` and `Content-Length` is refused: a proxy in front may frame it by the
length while h11 frames it by the chunks (request smuggling).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from .guard import is_loopback, send_json
from .schema import error_body


def is_local_name(host: str) -> bool:
    """A name that can only mean this machine: loopback addresses, `localhost`, `*.localhost`."""
    host = host.lower().rstrip(".")
    return is_loopback(host) or host == "localhost" or host.endswith(".localhost")


def host_name(value: str) -> str:
    """The host of a `Host` header value, without its port (`[::1]:8000` → `::1`)."""
    parsed = urlsplit(f"//{value}")
    try:
        return parsed.hostname or ""
    except ValueError:  # an unbalanced bracket
        return ""


class LocalOnly:
    """Pure ASGI middleware: Host and Origin on loopback connections, JSON bodies, one framing.

    `allowed_hosts` are host names a loopback connection may also name (a reverse proxy on
    this machine that passes the public name on)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {h.lower().rstrip(".") for h in allowed_hosts}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        await send_json(
            send,
            status,
            error_body(message, code=code, param=None, status=status),
            [(b"connection", b"close")],
        )

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str, str] | None:
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, []).append(value)
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return (
                400,
                "invalid_request",
                "a request may not carry both Transfer-Encoding and Content-Length",
            )
        server = scope.get("server")
        if server and is_loopback(str(server[0])):
            for value in headers.get(b"host", []):
                host = host_name(value.decode("latin-1"))
                if not self._local(host):
                    return (
                        403,
                        "host_not_allowed",
                        f"Host {host or value.decode('latin-1')!r} is not this machine: a "
                        "loopback server answers localhost and 127.0.0.1 only "
                        "(ifsteer serve --allow-host NAME adds a name)",
                    )
            for value in headers.get(b"origin", []):
                origin = urlsplit(value.decode("latin-1"))
                if not self._local(origin.hostname or ""):
                    return (
                        403,
                        "origin_not_allowed",
                        f"cross-origin requests from {value.decode('latin-1')!r} are refused",
                    )
        if scope["method"] == "POST":
            kinds = headers.get(b"content-type", [b""])
            kind = kinds[0].decode("latin-1").split(";")[0].strip().lower()
            if len(kinds) != 1 or kind != "application/json":
                return (
                    415,
                    "unsupported_media_type",
                    f"a POST body must be sent as 'Content-Type: application/json', not "
                    f"{kind or 'none'!r}",
                )
        return None

    def _local(self, host: str) -> bool:
        return is_local_name(host) or host.lower().rstrip(".") in self.allowed


__all__ = ["LocalOnly", "host_name", "is_local_name"]
