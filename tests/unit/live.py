"""Real uvicorn servers on loopback ports, configured as `ifsteer serve` configures them."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ifsteer.server import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServers:
    """Start apps on free loopback ports; `close` stops them all."""

    def __init__(self) -> None:
        self._servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def __call__(self, app: object, header_timeout_s: float = 10.0) -> str:
        port = free_port()
        config = uvicorn_config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            header_timeout_s=header_timeout_s,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self._servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for server, thread in self._servers:
            server.should_exit = True
            thread.join(timeout=30)
