"""The HTTP face: an OpenAI-compatible API whose requests carry a `steering` field.

`app` holds the routes, auth and error handling; `schema` defines requests and `body` reads
them (and names the field at fault when it cannot); `registry` turns `steering` entries into
vectors; `jobs` turns a request into the `Job`s a backend generates; `responses` writes
OpenAI's bodies and streams; `guard` bounds what one client can cost the others (bodies, queue,
deadlines, timeouts); `transport` decides what reaches the routes at all (loopback Host and
Origin, JSON bodies, one framing per request).
Backends live in `ifsteer.backends`, behind one protocol, and never import this package.
"""

from __future__ import annotations

from .app import build_app, create_app, serve
from .guard import is_loopback, uvicorn_config
from .registry import NamedVector, load_vector_dir
from .schema import Limits

__all__ = [
    "Limits",
    "NamedVector",
    "build_app",
    "create_app",
    "is_loopback",
    "load_vector_dir",
    "serve",
    "uvicorn_config",
]
