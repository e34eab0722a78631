"""What the server answers: OpenAI's response bodies and their server-sent-event streams.

Each response names the steering it was generated under (`"steering": [...]`), so a client can
see which vector, layer, mode and weight its text came from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import StreamingResponse

from ifsteer.backends import Backend
from ifsteer.errors import IfsteerError
from ifsteer.jobs import Completion, Job

from .registry import Resolved
from .schema import error_body, error_status

log = logging.getLogger("ifsteer.server")


def usage(completions: Sequence[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


@dataclass(frozen=True)
class Meta:
    id: str
    created: int
    model: str
    steering: list[dict[str, Any]]

    @classmethod
    def new(cls, prefix: str, model: str, resolved: Sequence[Resolved]) -> Meta:
        return cls(
            f"{prefix}-{uuid.uuid4().hex}",
            int(time.time()),
            model,
            [r.describe() for r in resolved],
        )

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def chat_body(meta: Meta, completion: Completion) -> dict[str, Any]:
    return {
        **meta.head("chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage([completion]),
        "steering": meta.steering,
    }


def completion_body(meta: Meta, completions: Sequence[Completion]) -> dict[str, Any]:
    return {
        **meta.head("text_completion"),
        "choices": [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ],
        "usage": usage(completions),
        "steering": meta.steering,
    }


# --- streaming ----------------------------------------------------------------------------


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        lines(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _generations(
    backend: Backend, jobs: Sequence[Job]
) -> AsyncIterator[tuple[int, str | Completion]]:
    """(index, text delta) as tokens arrive and (index, Completion) as each job ends."""
    events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    tasks = []
    for i, job in enumerate(jobs):
        task = asyncio.ensure_future(
            backend.generate(replace(job, on_text=lambda delta, i=i: events.put_nowait((i, delta))))
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
        yield error_body(f"generation failed: {exc}", code="internal_error", param=None, status=500)


def chat_chunks(
    backend: Backend, job: Job, meta: Meta, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **meta.head("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""})
        async for _, item in _generations(backend, [job]):
            if isinstance(item, str):
                yield chunk({"content": item})
            else:
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield {
                        **meta.head("chat.completion.chunk"),
                        "choices": [],
                        "usage": usage([item]),
                    }

    return _guarded(events())


def completion_chunks(
    backend: Backend, jobs: Sequence[Job], meta: Meta, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            **meta.head("text_completion"),
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
        }

    async def events() -> AsyncIterator[dict[str, Any]]:
        done: list[Completion] = []
        async for index, item in _generations(backend, jobs):
            if isinstance(item, str):
                yield chunk(index, item)
            else:
                done.append(item)
                yield chunk(index, "", item.finish_reason)
        if include_usage:
            yield {**meta.head("text_completion"), "choices": [], "usage": usage(done)}

    return _guarded(events())
