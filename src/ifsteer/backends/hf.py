"""The Hugging Face engine: one worker thread owns a local model and generates jobs in batches.

Model work is blocking, so it runs off the event loop, in one thread: a batching loop takes the
jobs that arrive within a short window (or pile up while a batch runs) and generates them as one
batch through `ifsteer.generation.generate`, each row with its own vectors. Rows are grouped by
decoding settings (greedy and max_tokens, or the sampling parameters; a seeded request runs
alone), so a request gets the output it would get alone. Inline extraction runs on the same
thread, as the model is not safe to use from two, in pieces of `EXTRACTION_PIECE` prompts with
any queued generation run between pieces: a 2-token request waits for one piece, not for the
whole extraction.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import queue
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from ifsteer.chat import Prompt
from ifsteer.generation import Completion, generate
from ifsteer.instructions import Instruction
from ifsteer.models import LoadedModel
from ifsteer.prompts import BASE_QUERIES, build_pairs
from ifsteer.vectors import (
    SteeringVector,
    last_token_activations,
    pair_prompts,
    vectors_from_activations,
)

from . import Job, OnText

log = logging.getLogger("ifsteer.backends.hf")
DEFAULT_BATCH_WINDOW_S = 0.02
DEFAULT_MAX_BATCH_SIZE = 32
EXTRACTION_PIECE = 16  # prompts per extraction forward, extract_instruction's batch size


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
        if s.temperature <= 0.0:  # greedy reads nothing else of the sampling settings
            decoding: tuple[Any, ...] = ("greedy", s.max_new_tokens, s.ignore_eos)
        elif s.seed is not None:
            # generate() seeds the global generator once per batch: a seeded request runs
            # alone, so the same seed gives the same text whatever else is in flight.
            decoding = ("seeded", self.seq)
        else:
            decoding = ("sample", s)
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
        self._extractions: list[_Extraction] = []  # worker-side, oldest first
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "extractions": 0,
                       "extraction_pieces": 0}
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
            self.lm, {layer: torch.cat(parts)}, instruction=instruction.phrasings[0],
            instruction_id=instruction.id, phrasings=instruction.phrasings,
            mode=instruction.mode,
        )
        self._stats["extractions"] += 1
        return vectors[layer]

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
            if self._extractions and self._queue.empty():  # generation always goes first
                if self._extractions[0].step():
                    self._extractions.pop(0)
                continue
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._extractions.extend(item for item in batch if isinstance(item, _Extraction))
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
        sampling = live[0].job.sampling
        if sampling.temperature > 0.0 and sampling.seed is None:
            torch.seed()  # not the state a previous request's seed left behind
        started = time.perf_counter()
        try:
            completions = generate(
                self.lm,
                [p.text for p in live],
                per_row=[list(p.job.steering) for p in live],
                sampling=sampling,
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


__all__ = ["DEFAULT_BATCH_WINDOW_S", "DEFAULT_MAX_BATCH_SIZE", "BatchingEngine"]
