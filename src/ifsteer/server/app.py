"""An OpenAI-compatible server whose requests carry a `steering` field.

`POST /v1/chat/completions` and `/v1/completions` take what the OpenAI client sends, plus
`steering: [{"vector": "lowercase", "mode": "projection", "weight": 1.0}]` (names of vectors
loaded from `--vectors DIR`) or `{"instruction": "..."}`, extracted on first use and cached.

A request walks one way: `schema` reads it, `jobs` renders its prompt, checks its limits and
resolves its steering through the `registry`, the engine generates, `responses` answers.
`build_app` takes any `ifsteer.backends.Engine`; `create_app` wraps a loaded Hugging Face model
in the batching engine.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ifsteer.backends import Engine
from ifsteer.backends.hf import DEFAULT_BATCH_WINDOW_S, DEFAULT_MAX_BATCH_SIZE, BatchingEngine
from ifsteer.chat import render_text
from ifsteer.errors import IfsteerError
from ifsteer.models import LoadedModel
from ifsteer.vectors import SteeringVector

from .jobs import build_job, chat_prompt
from .registry import NamedVector, VectorStore
from .responses import Meta, chat_body, chat_chunks, completion_body, completion_chunks, sse
from .schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    error_body,
    error_status,
    parse_request,
)

log = logging.getLogger("ifsteer.server")


@dataclass
class _State:
    engine: Engine
    store: VectorStore
    limits: Limits
    api_key: str | None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    lm: LoadedModel,
    vectors: Mapping[str, SteeringVector | NamedVector],
    *,
    api_key: str | None = None,
    batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    limits: Limits | None = None,
    allow_transfer: bool = False,
    extract_pairs: int = 64,
) -> FastAPI:
    """The server around a loaded Hugging Face model and named vectors."""
    engine = BatchingEngine(
        lm, batch_window_s=batch_window_s, max_batch_size=max_batch_size,
        allow_transfer=allow_transfer, extract_pairs=extract_pairs,
    )
    return build_app(
        engine, vectors, api_key=api_key, limits=limits, allow_transfer=allow_transfer
    )


def build_app(
    engine: Engine,
    vectors: Mapping[str, SteeringVector | NamedVector],
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    allow_transfer: bool = False,
) -> FastAPI:
    """The HTTP face over any engine: routes, errors, auth, streaming."""
    named = {
        name: v if isinstance(v, NamedVector) else NamedVector.single(v)
        for name, v in vectors.items()
    }
    store = VectorStore(named, engine, allow_transfer=allow_transfer)
    state = _State(engine, store, limits or Limits(), api_key or None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="ifsteer", version=_version(), lifespan=lifespan)
    app.state.ifsteer = state
    _add_error_handlers(app)

    @app.middleware("http")
    async def bearer_auth(request: Request, call_next: Any) -> Any:
        if state.api_key and request.url.path.startswith("/v1/") and not _authorized(
            request, state.api_key
        ):
            return _error(
                401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "engine": engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id, param="model_id")
        return _model_card(state)

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        return {"object": "list", "data": store.listing()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_request(await request.body(), ChatCompletionRequest, state.limits)
        _check_model(state, body.model)
        prompt = chat_prompt(engine.tokenizer, body.messages)
        job, resolved = await build_job(
            body, prompt, engine=engine, store=store, limits=state.limits,
            prompt_param="messages",
        )
        meta = Meta.new("chatcmpl", engine.model_id, resolved)
        if body.stream:
            return sse(chat_chunks(engine, job, meta, body.include_usage()))
        return chat_body(meta, await engine.generate(job))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_request(await request.body(), CompletionRequest, state.limits)
        _check_model(state, body.model)
        texts = body.prompts()
        if len(texts) > state.limits.max_prompts:
            raise ApiError(
                f"{len(texts)} prompts in one request, the limit is {state.limits.max_prompts}",
                param="prompt",
            )
        jobs = []
        for text in texts:
            job, resolved = await build_job(
                body, render_text(text), engine=engine, store=store,
                limits=state.limits, prompt_param="prompt",
            )
            jobs.append(job)
        meta = Meta.new("cmpl", engine.model_id, resolved)
        if body.stream:
            return sse(completion_chunks(engine, jobs, meta, body.include_usage()))
        results = await asyncio.gather(*(engine.generate(job) for job in jobs))
        return completion_body(meta, results)

    return app


def _version() -> str:
    from ifsteer import __version__

    return __version__


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def _check_model(state: _State, model: str, param: str = "model") -> None:
    if model != state.engine.model_id:
        raise ApiError(
            f"model {model!r} is not served here; this server serves "
            f"{state.engine.model_id!r} (GET /v1/models)",
            param=param, code="model_not_found", status=404,
        )


def _model_card(state: _State) -> dict[str, Any]:
    return {
        "id": state.engine.model_id, "object": "model", "created": state.created,
        "owned_by": "ifsteer",
    }


# --- errors -------------------------------------------------------------------------------


def _error(
    status: int, message: str, *, code: str, param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, code=code, param=param, status=status), status_code=status,
        headers=headers,
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(IfsteerError)
    async def ours(_request: Request, exc: IfsteerError) -> JSONResponse:
        status, code, param = error_status(exc)
        return _error(status, str(exc), code=code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


# --- running ------------------------------------------------------------------------------


def serve(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["build_app", "create_app", "serve"]
