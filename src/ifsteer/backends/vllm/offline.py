"""vLLM for the runners: `ifsteer eval` and `ifsteer sweep` on vLLM, with the same code.

`run_evaluation` and `calibration.sweeps` drive a job queue (`ifsteer.jobs.JobQueue`:
`submit(Job)`, `step()`, `busy`, `run()`); `OfflineVLLM.queue` is a factory for one on an
offline vLLM engine (`vllm.LLMEngine`, no event loop), steered per request by the machinery
the server uses: vectors registered once on every worker, `SamplingParams.extra_args`,
`cache_salt`, `worker.SteeringWorkerExtension`.

What a `Job` asks for, and what vLLM does with it:

- `ids`: handed to vLLM as they are (the runners rendered them, once, for every backend).
- `steering`: checked against the model as the HF batcher checks it (`jobs.check_job`).
- `sampling`: greedy rows give the HF batcher's tokens (up to float differences between the
  two kernels); sampled rows draw from vLLM's per-request generator (seeded by `seed`), so
  they follow the same distribution but not the HF batcher's draws.
- `decided`: vLLM knows no predicate, so the queue reads every new token, asks `decided` as
  the HF batcher does (text decoded by the same tokenizer, never half a character), and on
  True ends the row there (`finish_reason="decided"`) and aborts its vLLM request. Tokens
  vLLM made past that point before the abort arrived are dropped: the completion, and so the
  verdict, is the one the HF batcher gives; only their compute is lost.
- `on_text`, `on_done`: called on the thread that steps the queue, as with the HF batcher.

Not shared: identical jobs are generated twice (the HF batcher decodes them once); vLLM's
prefix cache still shares their prompt's KV. vLLM is imported inside functions only.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ifsteer.errors import IfsteerError, InvalidSteering
from ifsteer.jobs import Completion, Job, check_job, drain
from ifsteer.models import LoadedModel
from ifsteer.vectors import SteeringVector

from .engine import (
    EngineSetup,
    bank_entry,
    check_request_slots,
    require_vllm,
    sampling_params,
    steered_prompt,
    vector_key,
)

# Request ids stay unique across the queues one engine lends out.
_RUNS = itertools.count()


class OfflineVLLM:
    """One vLLM engine for a process's runs: started once (`start`, about 40 s on a CPU), then
    lent to each run through `queue`. Arguments as for `VLLMEngine`."""

    def __init__(self, model: str, **settings: Any) -> None:
        self.setup = EngineSetup.of(model, **settings)
        self.model_id = self.setup.model_id
        self._llm: Any = None
        self._registered: set[str] = set()
        self._lent: VLLMQueue | None = None
        self._side: LoadedModel | None = None

    def start(self) -> None:
        require_vllm()
        import os

        from vllm import LLM

        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # checked by refuse_engine_args
        self._llm = LLM(**self.setup.args)
        try:
            infos = self._llm.collective_rpc("ifsteer_info")
        except Exception as exc:  # the worker's refusal, raised again in this process
            self.close()
            raise IfsteerError(f"the vLLM engine cannot be steered: {exc}") from None
        self.setup.check_workers(infos)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None

    def side_model(self) -> LoadedModel:
        """The HF model on the same weights, under the served id (`EngineSetup.side_model`),
        loaded on first use: what the runners tokenize, check vectors and score perplexity
        with."""
        if self._side is None:
            self._side = self.setup.side_model()
        return self._side

    def register(self, vectors: Sequence[SteeringVector]) -> None:
        """Put vectors in every worker's bank (once each)."""
        new = {vector_key(v): v for v in vectors if vector_key(v) not in self._registered}
        if new:
            entries = [bank_entry(v) for v in new.values()]
            self._llm.collective_rpc("ifsteer_register", args=(entries,))
            self._registered.update(new)

    def queue(
        self,
        lm: LoadedModel,
        *,
        batch_size: int | None = None,
        max_tokens: int = 0,
        allow_transfer: bool = False,
    ) -> VLLMQueue:
        """An `ifsteer.jobs.QueueFactory`: a job queue on this engine for one run.

        `lm` is the side model (or another copy of the same weights under the same id);
        `batch_size` caps the requests in vLLM at once (None: vLLM's own `max_num_seqs`);
        `max_tokens`, the HF batcher's sizing hint, is not needed (vLLM sizes its KV cache at
        start; a job longer than `max_model_len` is refused at `submit`)."""
        if self._llm is None:
            raise IfsteerError("the vLLM engine is not started")
        if batch_size is not None and batch_size < 1:
            raise InvalidSteering("batch_size must be at least 1")
        if (lm.model_id, lm.hidden_size, lm.n_layers) != (
            self.model_id,
            self.setup.hidden_size,
            self.setup.n_layers,
        ):
            raise InvalidSteering(
                f"the runner's model {lm.model_id!r} is not the one vLLM serves "
                f"({self.model_id!r}): pass OfflineVLLM.side_model()"
            )
        if self._lent is not None and self._lent.busy:
            raise IfsteerError("the vLLM engine is already running another queue")
        self._lent = VLLMQueue(self, self._llm.llm_engine, lm, batch_size, allow_transfer)
        return self._lent


@dataclass(eq=False)
class _Request:
    """A submitted job, and its answer so far as the HF batcher would hold it."""

    job: Job
    ids: list[int]
    params: Any
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish: str | None = None
    logprob: float | None = None  # summed over `tokens` where the job asked


class VLLMQueue:
    """`JobQueue` on an `OfflineVLLM` (see the module's docstring for each `Job` field)."""

    def __init__(
        self,
        owner: OfflineVLLM,
        engine: Any,
        lm: LoadedModel,
        batch_size: int | None,
        allow_transfer: bool,
    ) -> None:
        self._owner, self._engine, self._lm = owner, engine, lm
        self._batch_size = batch_size
        self._allow_transfer = allow_transfer
        self._stop = frozenset(lm.stop_token_ids())
        self._limit = owner.setup.context_length
        self._waiting: deque[tuple[str, _Request]] = deque()
        self._active: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._run = next(_RUNS)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    def submit(self, job: Job) -> int:
        """Queue a job and return its id; bad steering or sampling is refused here, at once."""
        check_job(self._lm, job, allow_transfer=self._allow_transfer)
        check_request_slots(job.steering)
        ids = list(job.ids)
        if self._limit is not None and len(ids) + job.sampling.max_new_tokens > self._limit:
            raise InvalidSteering(
                f"a prompt of {len(ids)} tokens plus {job.sampling.max_new_tokens} new ones "
                f"exceeds vLLM's max_model_len {self._limit}: start it with a longer one"
            )
        self._owner.register([s.vector for s in job.steering])
        from vllm.sampling_params import RequestOutputKind

        # New tokens only, each step: the text is decoded here, by the HF tokenizer, as the HF
        # engine decodes it.
        # `logprobs=0`: the sampled token's own log-probability, from the raw logits (vLLM's
        # default `logprobs_mode`), as the HF batcher records it.
        params = sampling_params(
            job.sampling,
            job.steering,
            sorted(self._stop),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            logprobs=0 if job.logprobs else None,
        )
        job_id = next(self._ids)
        request = _Request(job, ids, params, logprob=0.0 if job.logprobs else None)
        self._waiting.append((f"ifsteer-{self._run}-{job_id}", request))
        return job_id

    def step(self) -> list[tuple[int, Completion]]:
        """Let waiting jobs into vLLM, run one engine step, retire the rows that ended."""
        free = self._batch_size - len(self._active) if self._batch_size else len(self._waiting)
        while self._waiting and free > 0:
            request_id, request = self._waiting.popleft()
            self._engine.add_request(
                request_id, steered_prompt(request.ids, request.job.steering), request.params
            )
            self._active[request_id] = request
            free -= 1
        finished: list[tuple[int, Completion]] = []
        for output in self._engine.step():
            request = self._active.get(output.request_id)
            if request is None:  # aborted after its decider settled it
                continue
            new = output.outputs[0]
            for i, token in enumerate(new.token_ids):
                logprob = new.logprobs[i][token].logprob if new.logprobs else None
                if self._advance(request, token, logprob):
                    break
            if request.finish is None and output.finished:  # a stop of vLLM's own
                reason = output.outputs[0].finish_reason
                request.finish = "length" if reason == "length" else "stop"
            if request.finish is not None:
                del self._active[output.request_id]
                if not output.finished:
                    self._engine.abort_request([output.request_id])
                finished.append((_job_id(output.request_id), self._complete(request)))
        return finished

    def run(self, progress: Callable[[int], None] | None = None) -> dict[int, Completion]:
        """Step until the queue is empty; completions by job id."""
        return drain(self, progress)

    def _advance(self, request: _Request, token: int, logprob: float | None) -> bool:
        """One new token, taken as the HF batcher takes it (`Batcher._advance`); True when the
        row has ended."""
        sampling, job = request.job.sampling, request.job
        if token in self._stop and not sampling.ignore_eos:
            request.finish = "stop"
            return True
        request.tokens.append(token)
        if request.logprob is not None:  # a token vLLM gave no log-probability for: unknown
            request.logprob = None if logprob is None else request.logprob + logprob
        if job.decided is not None or job.on_text is not None:
            text = self._lm.tokenizer.decode(request.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # half a multi-byte character: wait for more
                request.text = text
                self._emit(request)
                if job.decided is not None and job.decided(text):
                    request.finish = "decided"
        if request.finish is None and len(request.tokens) >= sampling.max_new_tokens:
            request.finish = "length"
        return request.finish is not None

    def _complete(self, request: _Request) -> Completion:
        request.text = self._lm.tokenizer.decode(request.tokens, skip_special_tokens=True)
        self._emit(request)
        completion = Completion(
            request.text,
            len(request.ids),
            len(request.tokens),
            request.finish or "",
            request.logprob,
        )
        if request.job.on_done is not None:
            request.job.on_done(completion)
        return completion

    @staticmethod
    def _emit(request: _Request) -> None:
        if request.job.on_text is not None and len(request.text) > request.sent:
            delta, request.sent = request.text[request.sent :], len(request.text)
            request.job.on_text(delta)


def _job_id(request_id: str) -> int:
    return int(request_id.rpartition("-")[2])
