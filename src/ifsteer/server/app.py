"""An OpenAI-compatible server whose requests carry a `steering` field.

`POST /v1/chat/completions` and `/v1/completions` take what the OpenAI client sends, plus
`steering: [{"vector": "lowercase", "mode": "projection", "weight": 1.0}]` (names of vectors
loaded from `--vectors DIR`) or `{"instruction": "..."}`, extracted on first use and cached.

A request walks one way: `schema` reads it, `jobs` renders its prompt, checks its limits and
resolves its steering through the `registry`, the backend generates, `responses` answers.
`build_app` takes any `ifsteer.backends.Backend`; `create_app` wraps a loaded Hugging Face model
in the batching backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ifsteer.backends import Backend
from ifsteer.backends.hf import DEFAULT_MAX_BATCH_SIZE, HFBackend
from ifsteer.chat import render_text
from ifsteer.errors import IfsteerError
from ifsteer.jobs import Job
from ifsteer.models import LoadedModel
from ifsteer.shipped.points import Points
from ifsteer.vectors import SteeringVector

from .body import parse_request
from .guard import Admission, BearerAuth, ClientGone, read_body, unless_abandoned, uvicorn_config
from .jobs import build_job, chat_prompt, check_request_tokens
from .registry import NamedVector, Resolved, VectorStore
from .responses import Meta, chat_body, chat_chunks, completion_body, completion_chunks, sse
from .schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    error_body,
    error_status,
)
from .transport import LocalOnly

log = logging.getLogger("ifsteer.server")


@dataclass
class _State:
    backend: Backend
    store: VectorStore
    limits: Limits
    api_key: str | None
    admission: Admission
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    lm: LoadedModel,
    vectors: Mapping[str, SteeringVector | NamedVector],
    *,
    api_key: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    limits: Limits | None = None,
    allow_transfer: bool = False,
    extract_pairs: int = 64,
    points: Points | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The server around a loaded Hugging Face model and named vectors."""
    backend = HFBackend(
        lm,
        max_batch_size=max_batch_size,
        allow_transfer=allow_transfer,
        extract_pairs=extract_pairs,
    )
    return build_app(
        backend,
        vectors,
        api_key=api_key,
        limits=limits,
        allow_transfer=allow_transfer,
        points=points,
        allowed_hosts=allowed_hosts,
    )


def build_app(
    backend: Backend,
    vectors: Mapping[str, SteeringVector | NamedVector],
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    allow_transfer: bool = False,
    points: Points | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The HTTP face over any backend: routes, errors, auth, streaming. `points`: where the
    served model's calibrated points are (default: those that ship for it); `allowed_hosts`:
    host names a loopback connection may name besides localhost (`transport.LocalOnly`)."""
    named = {
        name: v if isinstance(v, NamedVector) else NamedVector.single(v)
        for name, v in vectors.items()
    }
    store = VectorStore(named, backend, allow_transfer=allow_transfer, points=points)
    limits = limits or Limits()
    state = _State(backend, store, limits, api_key or None, Admission(limits.max_queued))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    # No redirect from `/v1/completions/`: a 307 on a POST is a surprise, not a route.
    app = FastAPI(title="ifsteer", version=_version(), lifespan=lifespan, redirect_slashes=False)
    app.state.ifsteer = state
    _add_error_handlers(app)
    if state.api_key:
        app.add_middleware(BearerAuth, api_key=state.api_key)
    app.add_middleware(LocalOnly, allowed_hosts=allowed_hosts)  # outermost: before the key

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": backend.model_id, "engine": backend.stats()}

    @app.head("/health", include_in_schema=False)
    async def health_head() -> None:  # what load balancers and curl -I send
        return None

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

    for path, endpoint in (
        ("/v1/models", models),
        ("/v1/models/{model_id:path}", model),
        ("/v1/vectors", list_vectors),
    ):  # HEAD wherever GET is (uvicorn sends no body), kept out of the API docs
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_request(await read_body(request, limits), ChatCompletionRequest, limits)
        _check_model(state, body.model)
        prompt = chat_prompt(backend.tokenizer, body.messages)

        async def jobs() -> tuple[list[Job], list[Resolved]]:
            job, resolved = await build_job(
                body,
                prompt,
                backend=backend,
                store=store,
                limits=limits,
                prompt_param="messages",
            )
            return [job], resolved

        if body.stream:
            return await _stream(
                request,
                state,
                jobs,
                lambda jobs, resolved: chat_chunks(
                    backend,
                    jobs[0],
                    Meta.new("chatcmpl", backend.model_id, resolved),
                    body.include_usage(),
                ),
            )

        async def answer() -> dict[str, Any]:
            (job,), resolved = await jobs()
            return chat_body(
                Meta.new("chatcmpl", backend.model_id, resolved), await backend.generate(job)
            )

        return await _answer(request, state, 1, answer)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_request(await read_body(request, limits), CompletionRequest, limits)
        _check_model(state, body.model)
        texts = body.prompts()
        if len(texts) > limits.max_prompts:
            raise ApiError(
                f"{len(texts)} prompts in one request, the limit is {limits.max_prompts}",
                param="prompt",
            )

        prompts = [render_text(backend.tokenizer, text) for text in texts]
        counts = [len(prompt.ids) for prompt in prompts]
        check_request_tokens(counts, limits, param="prompt")

        async def jobs() -> tuple[list[Job], list[Resolved]]:
            built = [
                await build_job(
                    body,
                    prompt,
                    backend=backend,
                    store=store,
                    limits=limits,
                    prompt_param="prompt",
                )
                for prompt in prompts
            ]
            return [job for job, _ in built], built[-1][1]

        if body.stream:
            return await _stream(
                request,
                state,
                jobs,
                lambda jobs, resolved: completion_chunks(
                    backend,
                    jobs,
                    Meta.new("cmpl", backend.model_id, resolved),
                    body.include_usage(),
                ),
                n=len(texts),
            )

        async def answer() -> dict[str, Any]:
            built, resolved = await jobs()
            results = await asyncio.gather(*(backend.generate(job) for job in built))
            return completion_body(Meta.new("cmpl", backend.model_id, resolved), results)

        return await _answer(request, state, len(texts), answer)

    return app


Build = Callable[[], Awaitable[tuple[list[Job], list[Resolved]]]]
Events = AsyncIterator[dict[str, Any]]


async def _answer(
    request: Request, state: _State, n: int, answer: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """A non-streaming answer: admitted, dropped if the client leaves, within the deadline."""
    with state.admission.admit(n):
        return await unless_abandoned(request, answer(), state.limits)


async def _stream(
    request: Request,
    state: _State,
    build: Build,
    chunks: Callable[[list[Job], list[Resolved]], Events],
    n: int = 1,
) -> StreamingResponse:
    """A streamed answer: admitted before its steering is resolved, released when the stream
    ends, or when the client leaves before it starts (the response's background task)."""
    release = state.admission.take(n)
    try:
        jobs, resolved = await unless_abandoned(request, build(), state.limits)
    except BaseException:
        release()
        raise

    async def released() -> Events:
        try:
            async for event in chunks(jobs, resolved):
                yield event
        finally:
            release()

    response = sse(released())
    response.background = BackgroundTask(release)
    return response


def _version() -> str:
    from ifsteer import __version__

    return __version__


def _check_model(state: _State, model: str, param: str = "model") -> None:
    if model != state.backend.model_id:
        raise ApiError(
            f"model {model!r} is not served here; this server serves "
            f"{state.backend.model_id!r} (GET /v1/models)",
            param=param,
            code="model_not_found",
            status=404,
        )


def _model_card(state: _State) -> dict[str, Any]:
    return {
        "id": state.backend.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "ifsteer",
    }


# --- errors -------------------------------------------------------------------------------


def _error(
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, code=code, param=param, status=status),
        status_code=status,
        headers=headers,
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(IfsteerError)
    async def ours(request: Request, exc: IfsteerError) -> JSONResponse:
        if isinstance(exc, ClientGone):  # nobody reads the answer: one line, no traceback
            client = request.client.host if request.client else "?"
            log.info("%s %s: %s (%s)", request.method, request.url.path, exc, client)
        status, code, param = error_status(exc)
        retry = {"Retry-After": "1"} if status == 429 else None
        return _error(status, str(exc), code=code, param=param, headers=retry)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
            if request.url.path.endswith("/") and request.url.path != "/":
                message += " (routes have no trailing slash)"
        return _error(exc.status_code, message, code=code, headers=exc.headers)

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

    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()


__all__ = ["build_app", "create_app", "serve"]
