"""The Hugging Face backend: one worker thread owns a local model and decodes every request in
one continuous batch (`ifsteer.batcher.Batcher`).

Model work is blocking, so it runs off the event loop, in one thread. A request joins the batch
at the next decode step and leaves it the step it ends, so a short request never waits for a
long one, and no arrival window delays the first request of a burst. Each row keeps its own
vectors and its own sampling generator (its seed, or fresh entropy), so a request gets the
output it would get alone whatever else is in flight. Inline extraction runs on the same thread,
as the model is not safe to use from two, in pieces of `EXTRACTION_PIECE` prompts: a piece runs
when no request is decoding, or once `EXTRACTION_SHARE_S` has passed since the last piece, so
generation goes first and an extraction still ends under a constant load.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ifsteer.batcher import Batcher
from ifsteer.instructions import Instruction
from ifsteer.jobs import Completion, Job
from ifsteer.models import LoadedModel
from ifsteer.prompts import BASE_QUERIES, build_pairs
from ifsteer.vectors import (
    SteeringVector,
    last_token_activations,
    pair_prompts,
    vectors_from_activations,
)

log = logging.getLogger("ifsteer.backends.hf")
DEFAULT_MAX_BATCH_SIZE = 32
EXTRACTION_PIECE = 16  # prompts per extraction forward, extract_instruction's batch size
EXTRACTION_SHARE_S = 2.0  # longest a waiting extraction piece yields to generation


@dataclass(eq=False)
class _Pending:
    """A job waiting for the worker, and how to hand its result back to the event loop."""

    job: Job  # its on_text runs on the event loop
    future: asyncio.Future[Completion]
    loop: asyncio.AbstractEventLoop

    def emit(self, delta: str) -> None:
        if self.job.on_text is not None:
            self.loop.call_soon_threadsafe(self.job.on_text, delta)

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
class _Extraction:
    """An inline extraction on the worker thread, one piece of prompts per `step`."""

    steps: Generator[None, None, SteeringVector]
    future: asyncio.Future[SteeringVector]
    loop: asyncio.AbstractEventLoop

    def step(self) -> bool:
        """Run one piece; True once the extraction is over (done, failed or abandoned)."""
        if self.future.done():
            return True
        try:
            next(self.steps)
        except StopIteration as stop:
            result: Any = stop.value
        except BaseException as exc:  # handed to the awaiting request, which answers a 4xx/500
            result = exc
        else:
            return False
        self.loop.call_soon_threadsafe(_settle, self.future, result)
        return True


_STOP = object()


class HFBackend:
    """One worker thread owns the model; concurrent requests share one continuous batch."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        allow_transfer: bool = False,
        extract_pairs: int = 64,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.lm = lm
        self.model_id = lm.model_id
        # The event loop tokenizes (rendering, limits) while the worker decodes answers; a fast
        # tokenizer cannot be used from two threads at once ("Already borrowed").
        self.tokenizer = copy.deepcopy(lm.tokenizer)
        self.n_layers = lm.n_layers
        self.hidden_size = lm.hidden_size
        self.context_length = getattr(lm.model.config, "max_position_embeddings", None)
        self.max_batch_size = max_batch_size
        self.allow_transfer = allow_transfer
        self.extract_pairs = extract_pairs
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        # worker side: the batch, the requests in it by job id, waiting extractions
        self._batcher = self._new_batcher()
        self._in_flight: dict[int, _Pending] = {}
        self._extractions: list[_Extraction] = []  # oldest first
        self._last_piece = time.monotonic()
        self._stats = {
            "requests": 0,
            "steps": 0,
            "largest_batch": 0,
            "cancelled": 0,
            "extractions": 0,
            "extraction_pieces": 0,
        }

    def _new_batcher(self) -> Batcher:
        return Batcher(self.lm, batch_size=self.max_batch_size, allow_transfer=self.allow_transfer)

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

    async def generate(self, job: Job) -> Completion:
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop.create_future(), loop)
        self._queue.put(pending)
        return await pending.future

    async def extract(self, instruction: Instruction, layer: int) -> SteeringVector:
        loop = asyncio.get_running_loop()
        extraction = _Extraction(self._extraction(instruction, layer), loop.create_future(), loop)
        self._queue.put(extraction)
        return await extraction.future

    def _extraction(
        self, instruction: Instruction, layer: int
    ) -> Generator[None, None, SteeringVector]:
        """`extract_instruction` at one layer, yielding between pieces; the same pieces as
        its batches, so the same vector."""
        prompts = pair_prompts(build_pairs(instruction, self.extract_pairs, BASE_QUERIES, seed=0))
        parts = []
        for start in range(0, len(prompts), EXTRACTION_PIECE):
            piece = prompts[start : start + EXTRACTION_PIECE]
            parts.append(last_token_activations(self.lm, piece, [layer], len(piece))[layer])
            self._stats["extraction_pieces"] += 1
            yield
        vectors = vectors_from_activations(
            self.lm,
            {layer: torch.cat(parts)},
            instruction=instruction.phrasings[0],
            instruction_id=instruction.id,
            phrasings=instruction.phrasings,
            mode=instruction.mode,
        )
        self._stats["extractions"] += 1
        return vectors[layer]

    def stats(self) -> dict[str, Any]:
        return {**self._stats, "queued": self._queue.qsize(), "in_flight": len(self._in_flight)}

    # worker side

    def _run(self) -> None:
        while True:
            idle = not self._batcher.busy and not self._extractions
            if not self._take(block=idle):
                return
            self._drop_abandoned()
            if self._extractions and (
                not self._batcher.busy or time.monotonic() - self._last_piece >= EXTRACTION_SHARE_S
            ):
                if self._extractions[0].step():
                    self._extractions.pop(0)
                self._last_piece = time.monotonic()
            elif self._batcher.busy:
                self._step()

    def _take(self, *, block: bool) -> bool:
        """Move what arrived onto the batch (waiting for one item when idle); False on stop."""
        while True:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, _Extraction):
                if not self._extractions:
                    self._last_piece = time.monotonic()
                self._extractions.append(item)
            else:
                self._submit(item)

    def _submit(self, pending: _Pending) -> None:
        if pending.future.done():  # abandoned while it waited in the queue
            self._stats["cancelled"] += 1
            return
        job = replace(
            pending.job,
            on_text=pending.emit if pending.job.on_text is not None else None,
            on_done=pending.finish,
        )
        try:
            job_id = self._batcher.submit(job)
        except Exception as exc:  # bad steering or sampling: that request's own error
            pending.finish(exc)
            return
        self._in_flight[job_id] = pending

    def _drop_abandoned(self) -> None:
        """Requests whose client went away leave the batch instead of being generated."""
        for job_id in [j for j, p in self._in_flight.items() if p.future.done()]:
            del self._in_flight[job_id]
            self._batcher.cancel(job_id)
            self._stats["cancelled"] += 1

    def _step(self) -> None:
        try:
            finished = self._batcher.step()
        except BaseException as exc:
            # The batch's cache is in an unknown state: fail what it held, start a fresh one.
            log.exception("decoding a batch of %d failed", len(self._in_flight))
            for pending in self._in_flight.values():
                pending.finish(exc)
            self._in_flight.clear()
            self._batcher = self._new_batcher()
            return
        self._stats["steps"] += 1
        decoded = self._batcher.rows + len(finished)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], decoded)
        for job_id, _ in finished:
            if self._in_flight.pop(job_id, None) is not None:
                self._stats["requests"] += 1


__all__ = ["DEFAULT_MAX_BATCH_SIZE", "EXTRACTION_SHARE_S", "HFBackend"]
