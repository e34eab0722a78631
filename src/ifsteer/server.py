"""An OpenAI-compatible server whose requests carry a `steering` field.

`POST /v1/chat/completions` and `/v1/completions` take what the OpenAI client sends, plus
`steering: [{"vector": "lowercase", "mode": "projection", "weight": 1.0}]` (names of vectors
loaded from `--vectors DIR`) or `{"instruction": "..."}`, extracted on first use and cached.

Model work is blocking, so it runs in one worker thread: a batching loop that takes the
requests which arrive within a short window (or pile up while a batch runs) and generates
them as one batch through `ifsteer.generation.generate`, each row with its own vectors. Rows
are grouped by decoding settings (greedy and max_tokens, or the sampling parameters), so a
greedy request gets, token for token, the output it would get alone.

The HTTP layer (`build_app`) takes any `ifsteer.backends.Engine`; `create_app` wraps a loaded
Hugging Face model in the batching engine, the vLLM adapter provides another engine.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ifsteer.backends import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Engine,
    Job,
    Limits,
    NamedVector,
    OnText,
    Prompt,
    Resolved,
    VectorStore,
    build_job,
    error_body,
    error_status,
    parse_request,
    render_chat,
    render_completion,
)
from ifsteer.errors import IfsteerError
from ifsteer.generation import Completion, generate
from ifsteer.instructions import Instruction
from ifsteer.models import LoadedModel
from ifsteer.vectors import SteeringVector, extract_instruction

log = logging.getLogger("ifsteer.server")
DEFAULT_BATCH_WINDOW_S = 0.02
DEFAULT_MAX_BATCH_SIZE = 32


# --- the batching engine (Hugging Face models) --------------------------------------------


@dataclass(eq=False)
class _Pending:
    """A job waiting for the worker, and how to hand its result back to the event loop."""

    job: Job
    text: str  # what generate() reads
    formatted: bool  # generate(formatted=...)
    future: asyncio.Future[Completion]
    loop: asyncio.AbstractEventLoop
    on_text: OnText | None
    seq: int

    def group_key(self) -> tuple[Any, ...]:
        s = self.job.sampling
        if s.temperature <= 0.0:
            decoding: tuple[Any, ...] = ("greedy", s.max_new_tokens)
        elif s.seed is not None:
            # generate() seeds the global generator once per batch: a seeded request runs
            # alone, so the same seed gives the same text whatever else is in flight.
            decoding = ("seeded", self.seq)
        else:
            decoding = ("sample", s.max_new_tokens, s.temperature, s.top_p)
        return (self.formatted, *decoding)

    def emit(self, delta: str) -> None:
        if self.on_text is not None:
            self.loop.call_soon_threadsafe(self.on_text, delta)

    def finish(self, result: Completion | BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the client went away and the handler was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclass(eq=False)
class _Call:
    """Other model work (inline extraction) that must run on the worker thread too."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as exc:  # handed to the awaiting request, which answers a 4xx/500
            result = exc
        self.loop.call_soon_threadsafe(_settle, self.future, result)


_STOP = object()


class BatchingEngine:
    """One worker thread owns the model; concurrent requests are generated as one batch."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        allow_transfer: bool = False,
        extract_pairs: int = 64,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.lm = lm
        self.model_id = lm.model_id
        # The event loop tokenizes (limits, rendering) while the worker tokenizes a batch; a
        # fast tokenizer cannot be used from two threads at once ("Already borrowed").
        self.tokenizer = copy.deepcopy(lm.tokenizer)
        self.n_layers = lm.n_layers
        self.hidden_size = lm.hidden_size
        self.context_length = getattr(lm.model.config, "max_position_embeddings", None)
        self.batch_window_s = batch_window_s
        self.max_batch_size = max_batch_size
        self.allow_transfer = allow_transfer
        self.extract_pairs = extract_pairs
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._seq = itertools.count()
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "extractions": 0}
        self._warned_bos = False

    # event-loop side

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ifsteer-batcher", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    async def generate(self, job: Job, on_text: OnText | None = None) -> Completion:
        loop = asyncio.get_running_loop()
        text, formatted = self._generate_input(job.prompt)
        pending = _Pending(
            job, text, formatted, loop.create_future(), loop, on_text, next(self._seq)
        )
        self._queue.put(pending)
        return await pending.future

    async def extract(self, instruction: Instruction, layer: int) -> SteeringVector:
        def run() -> SteeringVector:
            vectors = extract_instruction(
                self.lm, instruction, [layer], n_pairs=self.extract_pairs
            )
            self._stats["extractions"] += 1
            return vectors[layer]

        loop = asyncio.get_running_loop()
        call = _Call(run, loop.create_future(), loop)
        self._queue.put(call)
        return await call.future

    def stats(self) -> dict[str, Any]:
        return {**self._stats, "queued": self._queue.qsize()}

    def _generate_input(self, prompt: Prompt) -> tuple[str, bool]:
        """Text and `formatted` flag that make generate() read exactly `prompt_ids(prompt)`.

        generate(formatted=False) tokenizes with special tokens, which would put a second BOS
        before a chat template's own: strip the template's, and check the ids agree.
        """
        if prompt.add_special_tokens:
            return prompt.text, False
        tok = self.tokenizer
        wanted = tok(prompt.text, add_special_tokens=False).input_ids
        text = prompt.text
        bos = tok.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        if tok(text, add_special_tokens=True).input_ids == wanted:
            return text, False
        if prompt.user_only is not None:  # one user message: the CLI's own path
            return prompt.user_only, True
        if not self._warned_bos:
            self._warned_bos = True
            log.warning(
                "this tokenizer adds special tokens the chat template does not write; "
                "multi-turn chats are read with them"
            )
        return text, False

    # worker side

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            for item in batch:
                if isinstance(item, _Call):
                    item.run()
            jobs = [item for item in batch if isinstance(item, _Pending)]
            groups: dict[tuple[Any, ...], list[_Pending]] = {}
            for pending in jobs:
                groups.setdefault(pending.group_key(), []).append(pending)
            for group in groups.values():
                self._run_group(group)
            if stop:
                return

    def _collect(self, first: Any) -> tuple[list[Any], bool]:
        """The first item, plus what follows it with gaps shorter than the window, for at most
        four windows and up to the batch size: a burst that trickles in still forms one batch."""
        batch = [first]
        n_jobs = int(isinstance(first, _Pending))
        deadline = time.monotonic() + 4 * self.batch_window_s
        while n_jobs < self.max_batch_size:
            wait = min(self.batch_window_s, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            n_jobs += isinstance(item, _Pending)
        return batch, False

    def _run_group(self, group: list[_Pending]) -> None:
        live = [p for p in group if not p.future.done()]  # drop requests already abandoned
        if not live:
            return
        streaming = any(p.on_text is not None for p in live)
        started = time.perf_counter()
        try:
            completions = generate(
                self.lm,
                [p.text for p in live],
                per_row=[list(p.job.steering) for p in live],
                sampling=live[0].job.sampling,
                batch_size=len(live),
                formatted=live[0].formatted,
                allow_transfer=self.allow_transfer,
                on_text=(lambda row, delta: live[row].emit(delta)) if streaming else None,
            )
        except BaseException as exc:
            log.exception("batch of %d failed", len(live))
            for p in live:
                p.finish(exc)
            return
        self._stats["requests"] += len(live)
        self._stats["batches"] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(live))
        log.debug("batch of %d in %.2fs", len(live), time.perf_counter() - started)
        for p, completion in zip(live, completions, strict=True):
            p.finish(completion)


# --- HTTP ---------------------------------------------------------------------------------


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
        prompt = render_chat(engine.tokenizer, body.messages)
        job, resolved = await build_job(
            body, prompt, engine=engine, store=store, limits=state.limits,
            prompt_param="messages",
        )
        meta = _Meta.new("chatcmpl", engine.model_id, resolved)
        if body.stream:
            return _sse(_chat_chunks(engine, job, meta, body.include_usage()))
        completion = await engine.generate(job)
        return {
            **meta.head("chat.completion"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }],
            "usage": _usage([completion]),
            "steering": meta.steering,
        }

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
                body, render_completion(text), engine=engine, store=store,
                limits=state.limits, prompt_param="prompt",
            )
            jobs.append(job)
        meta = _Meta.new("cmpl", engine.model_id, resolved)
        if body.stream:
            return _sse(_completion_chunks(engine, jobs, meta, body.include_usage()))
        results = await asyncio.gather(*(engine.generate(job) for job in jobs))
        return {
            **meta.head("text_completion"),
            "choices": [
                {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(results)
            ],
            "usage": _usage(results),
            "steering": meta.steering,
        }

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


def _usage(completions: Sequence[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str
    steering: list[dict[str, Any]]

    @classmethod
    def new(cls, prefix: str, model: str, resolved: Sequence[Resolved]) -> _Meta:
        return cls(
            f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model,
            [r.describe() for r in resolved],
        )

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


# --- streaming ----------------------------------------------------------------------------


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        lines(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _generations(
    engine: Engine, jobs: Sequence[Job]
) -> AsyncIterator[tuple[int, str | Completion]]:
    """(index, text delta) as tokens arrive and (index, Completion) as each job ends."""
    events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    tasks = []
    for i, job in enumerate(jobs):
        task = asyncio.ensure_future(
            engine.generate(job, on_text=lambda delta, i=i: events.put_nowait((i, delta)))
        )
        task.add_done_callback(lambda t, i=i: events.put_nowait((i, t)))
        tasks.append(task)
    finished = 0
    try:
        while finished < len(tasks):
            i, item = await events.get()
            if isinstance(item, asyncio.Future):
                finished += 1
                yield i, item.result()  # raises the job's error, if it failed
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _guarded(
    events: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """Headers are sent already: an error mid-stream becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except IfsteerError as exc:
        status, code, param = error_status(exc)
        yield error_body(str(exc), code=code, param=param, status=status)
    except Exception as exc:
        log.exception("stream failed")
        yield error_body(f"generation failed: {exc}", code="internal_error", param=None,
                         status=500)


def _chat_chunks(
    engine: Engine, job: Job, meta: _Meta, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **meta.head("chat.completion.chunk"),
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""})
        async for _, item in _generations(engine, [job]):
            if isinstance(item, str):
                yield chunk({"content": item})
            else:
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield {**meta.head("chat.completion.chunk"), "choices": [],
                           "usage": _usage([item])}

    return _guarded(events())


def _completion_chunks(
    engine: Engine, jobs: Sequence[Job], meta: _Meta, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            **meta.head("text_completion"),
            "choices": [
                {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            ],
        }

    async def events() -> AsyncIterator[dict[str, Any]]:
        done: list[Completion] = []
        async for index, item in _generations(engine, jobs):
            if isinstance(item, str):
                yield chunk(index, item)
            else:
                done.append(item)
                yield chunk(index, "", item.finish_reason)
        if include_usage:
            yield {**meta.head("text_completion"), "choices": [], "usage": _usage(done)}

    return _guarded(events())


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


__all__ = ["BatchingEngine", "build_app", "create_app", "serve"]
