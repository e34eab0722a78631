"""The job contract: what every generation queue takes and gives back, on any backend.

A job is a prompt already read into token ids (`chat.render_chat` and `chat.render_text` make
them, once), its steering, its sampling, an optional decider and its callbacks. Nothing
downstream renders or tokenizes a prompt again, so the HF batcher, vLLM and the server read the
same tokens. The runners (`generate`, `run_evaluation`, `calibration.sweeps`) drive a
`JobQueue`; `batcher.Batcher` is one, `backends.vllm.VLLMQueue` another, and a runner gets
its queue from a `QueueFactory`, so no runner imports an adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ifsteer.errors import InvalidSteering
from ifsteer.models import LoadedModel
from ifsteer.sampling import Sampling
from ifsteer.steering import Steering, check_steering

# True once a job's answer can no longer change its check's verdict; the row then stops early.
Decider = Callable[[str], bool]
# Each new piece of a job's answer, in order (for streaming).
OnText = Callable[[str], None]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop" (end of turn), "length" (max_new_tokens reached) or "decided" (its decider said so)
    finish_reason: str
    # The answer's tokens' summed log-probability under the model as it generated them (its
    # steering, temperature 1; the stop token excluded), where the job asked for it and the
    # queue records it (the HF batcher and vLLM's queue do): an unsteered answer's perplexity
    # for free.
    logprob: float | None = None

    @property
    def perplexity(self) -> float | None:
        if self.logprob is None or self.completion_tokens == 0:
            return None
        return math.exp(-self.logprob / self.completion_tokens)


OnDone = Callable[[Completion], None]


@dataclass(frozen=True, eq=False)
class Job:
    """One completion to make from the token ids `ids`.

    `on_text` receives the answer's new text as it grows, `on_done` the finished completion;
    a queue calls both on the thread that steps it (a serving backend: on the event loop).
    """

    ids: tuple[int, ...]
    steering: Sequence[Steering] = ()
    sampling: Sampling = Sampling()
    decided: Decider | None = None
    on_text: OnText | None = None
    on_done: OnDone | None = None
    logprobs: bool = False  # record `Completion.logprob`


def check_job(lm: LoadedModel, job: Job, *, allow_transfer: bool) -> None:
    """What every queue refuses at `submit`, before the job costs anything."""
    check_steering(lm, job.steering, allow_transfer=allow_transfer)
    if job.sampling.max_new_tokens < 1:
        raise InvalidSteering("max_new_tokens must be at least 1")
    if not job.ids:
        raise InvalidSteering("the prompt is empty once tokenized")


class JobQueue(Protocol):
    """Jobs in, completions out: `submit` queues, `step` advances every row one token and
    returns the jobs that ended, by id."""

    @property
    def busy(self) -> bool: ...

    def submit(self, job: Job) -> int: ...

    def step(self) -> list[tuple[int, Completion]]: ...

    def run(self, progress: Callable[[int], None] | None = None) -> dict[int, Completion]: ...


class QueueFactory(Protocol):
    """How a runner gets its queue for `lm`: `Batcher` itself (the default), or a factory that
    hands the runner another backend's queue. `max_tokens` (longest prompt + answer) sizes the
    batch; `allow_transfer` accepts vectors of another model of the same hidden size."""

    def __call__(
        self, lm: LoadedModel, *, batch_size: int | None, max_tokens: int, allow_transfer: bool
    ) -> JobQueue: ...


def drain(queue: JobQueue, progress: Callable[[int], None] | None = None) -> dict[int, Completion]:
    """Step `queue` until it is empty; completions by job id, `progress(n)` as n finish."""
    done: dict[int, Completion] = {}
    while queue.busy:
        finished = queue.step()
        done.update(finished)
        if progress is not None and finished:
            progress(len(finished))
    return done


__all__ = [
    "Completion",
    "Decider",
    "Job",
    "JobQueue",
    "OnDone",
    "OnText",
    "QueueFactory",
    "Sampling",
    "check_job",
    "drain",
]
