"""What every serving backend shares: the request schema, the `steering` field, prompts, limits.

The Hugging Face server (`ifsteer.server`) and the vLLM adapter (`ifsteer.backends.vllm`) read
requests with this one module, so a client sends the same JSON to either and gets the same
4xx for the same mistake. A backend is an `Engine`: it generates a `Job` (a rendered prompt,
resolved `Steering`s and `Sampling`) and, where it can, extracts a vector for an instruction
given inline. Everything here is plain Python and pydantic; no backend is imported.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ifsteer.chat import BASE_PROMPT_FORMAT
from ifsteer.errors import (
    IfsteerError,
    InvalidSteering,
    MalformedVectorFile,
    UnknownInstruction,
    VectorMismatch,
)
from ifsteer.generation import Completion, Sampling
from ifsteer.instructions import Instruction, Mode, custom_instruction, get_instruction
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector, default_layer, describe, load_vectors

OnText = Callable[[str], None]


# --- errors -------------------------------------------------------------------------------


class ApiError(IfsteerError):
    """A request the server refuses, with the HTTP status and the field at fault."""

    status = 400

    def __init__(
        self, message: str, *, param: str | None = None, code: str = "invalid_request",
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        if status is not None:
            self.status = status


class UnknownVector(ApiError):
    """A `steering` entry names a vector the server did not load."""

    status = 404


def error_status(exc: IfsteerError) -> tuple[int, str, str | None]:
    """HTTP status, error code and parameter for any error of ours."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.param
    if isinstance(exc, VectorMismatch):
        return 422, "vector_mismatch", None
    if isinstance(exc, UnknownInstruction):
        return 404, "instruction_not_found", None
    if isinstance(exc, MalformedVectorFile):
        return 422, "malformed_vector", None
    if isinstance(exc, InvalidSteering):
        return 400, "invalid_steering", None
    return 400, "invalid_request", None


def error_body(message: str, *, code: str, param: str | None, status: int) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- limits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 400, never a crash."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128
    max_steering: int = 8  # entries in one request's `steering` list
    max_abs_weight: float = 1000.0
    max_instruction_chars: int = 1000
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_body_bytes: int = 1_000_000


# --- request schema -----------------------------------------------------------------------


class SteeringSpec(BaseModel):
    """One entry of `steering`: a loaded vector by name, or an instruction extracted on the fly.

    `mode` and `weight` default to the vector's own; switching a vector's mode without a
    weight uses that mode's natural weight (‖u‖ for additive, 1 for projection). `layer`
    picks one of the layers a vector file holds, or where an inline instruction is extracted.
    """

    model_config = ConfigDict(extra="forbid")

    vector: str | None = Field(default=None, min_length=1, max_length=200)
    instruction: str | None = Field(default=None, min_length=1)
    instruction_id: str | None = Field(default=None, min_length=1, max_length=200)
    mode: Literal["projection", "additive"] | None = None
    weight: float | None = Field(default=None, allow_inf_nan=False)
    layer: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> SteeringSpec:
        given = [f for f in ("vector", "instruction", "instruction_id") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'vector' (a loaded vector's name), 'instruction' (free "
                "text) or 'instruction_id' (a catalogue id)"
            )
        return self

    def source(self) -> str:
        if self.vector is not None:
            return self.vector
        if self.instruction_id is not None:
            return f"instruction_id:{self.instruction_id}"
        return f"instruction:{self.instruction}"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields OpenAI clients may send that ifsteer does not implement: refused, never ignored.
_UNSUPPORTED: dict[str, str] = {
    "stop": "generation ends at the model's end-of-turn token or at max_tokens",
    "presence_penalty": "leave it out",
    "frequency_penalty": "leave it out",
    "logit_bias": "leave it out",
    "logprobs": "leave it out",
    "top_logprobs": "leave it out",
    "tools": "leave them out",
    "echo": "leave it out",
    "suffix": "leave it out",
}


class GenerationRequest(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI clients send extras;
    known fields that would change the output and that we do not implement are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    steering: list[SteeringSpec] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported; send several requests, they are batched")
        return value

    @model_validator(mode="after")
    def _supported(self) -> GenerationRequest:
        # ApiError is not a ValueError, so pydantic lets it through with our param and code.
        for name, hint in _UNSUPPORTED.items():
            if getattr(self, name, None) not in (None, False, 0, 0.0, "", [], {}):
                raise ApiError(
                    f"{name} is not supported by ifsteer; {hint}",
                    param=name, code="unsupported_parameter",
                )
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(
                "only response_format type 'text' is supported; steer with a JSON-format "
                "vector (detectable_format:json_format) instead"
            )
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported; leave it out")
        return value

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list is empty")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


Request = TypeVar("Request", bound=BaseModel)


def parse_request(raw: bytes, schema: type[Request], limits: Limits) -> Request:
    """Body bytes to a request, or an `ApiError` that names the field at fault."""
    if len(raw) > limits.max_body_bytes:
        raise ApiError(
            f"request body is {len(raw)} bytes, the limit is {limits.max_body_bytes}",
            code="request_too_large", status=413,
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("the JSON body must be an object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(
            f"{param}: {message}" if param else message, param=param, code="invalid_value"
        ) from None


# --- prompts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """What the model reads, and how: chat templates write their own BOS, so a templated
    prompt is tokenized without special tokens, as `LoadedModel.tokenize(templated=True)`
    does; raw completion prompts (and base models' `Q: ...\\nA:`) are tokenized with them.

    `user_only` is the text of a one-message user chat, which the HF engine can hand to
    `generate(formatted=True)` unchanged.
    """

    text: str
    add_special_tokens: bool
    user_only: str | None = None


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> Prompt:
    """The chat template with the generation prompt; base models get `Q: ...\\nA:` turns."""
    turns = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]
    single = turns[0]["content"] if len(turns) == 1 and turns[0]["role"] == "user" else None
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises its own errors for roles a template refuses
            raise ApiError(
                f"the model's chat template refused these messages: {exc}", param="messages"
            ) from None
        return Prompt(str(text), add_special_tokens=False, user_only=single)
    parts = []
    for turn in turns:
        if turn["role"] == "user":
            parts.append(BASE_PROMPT_FORMAT.format(prompt=turn["content"]))
        elif turn["role"] == "assistant":
            parts.append(f" {turn['content']}\n")
        else:
            parts.append(f"{turn['content']}\n\n")
    if turns[-1]["role"] != "user":
        raise ApiError("a base model's chat must end with a user message", param="messages")
    return Prompt("".join(parts), add_special_tokens=True, user_only=single)


def render_completion(text: str) -> Prompt:
    return Prompt(text, add_special_tokens=True)


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    return list(tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens).input_ids)


# --- the engine interface -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One completion to make: rendered prompt, resolved steering, decoding settings."""

    prompt: Prompt
    steering: tuple[Steering, ...]
    sampling: Sampling


class Engine(Protocol):
    """What a backend provides. `on_text` is called on the event loop, in order."""

    model_id: str
    tokenizer: Any  # for rendering and counting on the event loop; not the worker's copy
    n_layers: int
    hidden_size: int
    context_length: int | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, job: Job, on_text: OnText | None = None) -> Completion: ...

    async def extract(self, instruction: Instruction, layer: int) -> SteeringVector: ...

    def stats(self) -> dict[str, Any]: ...


# --- vectors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedVector:
    """A vector loaded by name: its default layer and every layer its file holds."""

    default: SteeringVector
    layers: Mapping[int, SteeringVector]

    @classmethod
    def single(cls, vector: SteeringVector) -> NamedVector:
        return cls(vector, {vector.layer: vector})


def load_vector_dir(directory: str | Path) -> dict[str, NamedVector]:
    """Every `*.safetensors` vector file in a directory, named by its file stem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MalformedVectorFile(f"{directory}: no such vector directory")
    named = {}
    for path in sorted(directory.glob("*.safetensors")):
        vectors, default = load_vectors(path)
        named[path.stem] = NamedVector(vectors[default], vectors)
    return named


@dataclass(frozen=True)
class Resolved:
    """A steering entry turned into what `steer` applies, with where it came from."""

    steering: Steering
    source: str

    def describe(self) -> dict[str, Any]:
        v = self.steering.vector
        return {
            "source": self.source, "instruction_id": v.instruction_id, "layer": v.layer,
            "mode": self.steering.effective_mode, "weight": self.steering.effective_weight,
        }


def natural_weight(vector: SteeringVector, mode: Mode) -> float:
    """The vector's own weight in its own mode; otherwise that mode's default weight."""
    if mode == vector.mode:
        return vector.weight
    return vector.norm if mode == "additive" else 1.0


@dataclass
class VectorStore:
    """Named vectors loaded at start, plus instructions extracted on request (an LRU cache)."""

    named: Mapping[str, NamedVector]
    engine: Engine
    allow_transfer: bool = False
    cache_size: int = 64
    _cache: OrderedDict[tuple[str, str, int], SteeringVector] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _pending: dict[tuple[str, str, int], asyncio.Future[SteeringVector]] = field(
        default_factory=dict, init=False, repr=False
    )

    def fits(self, vector: SteeringVector) -> bool:
        try:
            self._check(vector)
        except VectorMismatch:
            return False
        return True

    def _check(self, vector: SteeringVector) -> None:
        e = self.engine
        vector.check_fits(
            e.model_id, e.hidden_size, e.n_layers, allow_transfer=self.allow_transfer
        )

    async def resolve(self, specs: Sequence[SteeringSpec], limits: Limits) -> list[Resolved]:
        if len(specs) > limits.max_steering:
            raise ApiError(
                f"{len(specs)} steering entries, the limit is {limits.max_steering}",
                param="steering",
            )
        resolved = []
        for i, spec in enumerate(specs):
            param = f"steering.{i}"
            if spec.weight is not None and abs(spec.weight) > limits.max_abs_weight:
                raise ApiError(
                    f"{param}.weight: |{spec.weight}| is over the limit {limits.max_abs_weight}",
                    param=f"{param}.weight", code="invalid_value",
                )
            vector = await self._vector(spec, param, limits)
            try:
                self._check(vector)
            except VectorMismatch as exc:
                raise ApiError(str(exc), param=param, code="vector_mismatch", status=422) from None
            mode: Mode = spec.mode or vector.mode
            weight = natural_weight(vector, mode) if spec.weight is None else spec.weight
            resolved.append(Resolved(Steering(vector, mode=mode, weight=weight), spec.source()))
        return resolved

    async def _vector(self, spec: SteeringSpec, param: str, limits: Limits) -> SteeringVector:
        if spec.vector is not None:
            named = self.named.get(spec.vector)
            if named is None:
                known = ", ".join(sorted(self.named)) or "none"
                raise UnknownVector(
                    f"no vector named {spec.vector!r}; loaded: {known} (GET /v1/vectors)",
                    param=f"{param}.vector", code="vector_not_found",
                )
            if spec.layer is None:
                return named.default
            if spec.layer not in named.layers:
                raise ApiError(
                    f"vector {spec.vector!r} holds layers {sorted(named.layers)}, not "
                    f"{spec.layer}", param=f"{param}.layer", code="vector_mismatch", status=422,
                )
            return named.layers[spec.layer]
        return await self._extracted(spec, param, limits)

    async def _extracted(self, spec: SteeringSpec, param: str, limits: Limits) -> SteeringVector:
        layer = default_layer(self.engine.n_layers) if spec.layer is None else spec.layer
        if not 0 <= layer < self.engine.n_layers:
            raise ApiError(
                f"layer {layer} is out of range 0..{self.engine.n_layers - 1}",
                param=f"{param}.layer", code="invalid_value", status=422,
            )
        if spec.instruction is not None:
            text = spec.instruction.strip()
            if len(text) > limits.max_instruction_chars:
                raise ApiError(
                    f"instruction has {len(text)} characters, the limit is "
                    f"{limits.max_instruction_chars}", param=f"{param}.instruction",
                )
            key = ("text", text, layer)
        else:
            key = ("id", str(spec.instruction_id), layer)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key in self._pending:  # the same instruction is being extracted for another request
            return await asyncio.shield(self._pending[key])
        instruction = (
            custom_instruction(key[1]) if key[0] == "text" else get_instruction(key[1])
        )
        future: asyncio.Future[SteeringVector] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            vector = await self.engine.extract(instruction, layer)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._pending[key]
        future.set_result(vector)
        self._cache[key] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vector

    def listing(self) -> list[dict[str, Any]]:
        """What GET /v1/vectors shows: every named vector, then cached inline ones."""
        rows = []
        for name, named in sorted(self.named.items()):
            info = _listed(named.default, self.fits(named.default))
            rows.append({"id": name, "source": "file", "layers": sorted(named.layers), **info})
        for (kind, text, _layer), vector in self._cache.items():
            source = "instruction" if kind == "text" else "instruction_id"
            rows.append({"id": f"{source}:{text}", "source": "inline", **_listed(vector, True)})
        return rows


def _listed(vector: SteeringVector, fits: bool) -> dict[str, Any]:
    info = describe(vector)
    keep = ("instruction", "instruction_id", "model_id", "layer", "mode", "weight", "norm",
            "target", "hidden_size", "n_pairs")
    return {"object": "steering_vector", **{k: info[k] for k in keep}, "fits_model": fits}


# --- requests to jobs ---------------------------------------------------------------------


async def build_job(
    request: GenerationRequest, prompt: Prompt, *, engine: Engine, store: VectorStore,
    limits: Limits, prompt_param: str,
) -> tuple[Job, list[Resolved]]:
    """Check a request against the limits and the model, and resolve its steering."""
    n_prompt = len(prompt_ids(engine.tokenizer, prompt))
    if n_prompt > limits.max_prompt_tokens:
        raise ApiError(
            f"the prompt has {n_prompt} tokens, the limit is {limits.max_prompt_tokens}",
            param=prompt_param, code="context_length_exceeded",
        )
    asked = request.requested_max_tokens()
    room = None if engine.context_length is None else engine.context_length - n_prompt
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(
            f"max_tokens {asked} is over the limit {limits.max_tokens}",
            param="max_tokens", code="invalid_value",
        )
    max_tokens = asked or limits.default_max_tokens
    if room is not None and max_tokens > room:
        if asked is not None or room < 1:
            raise ApiError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's context of {engine.context_length} tokens",
                param="max_tokens" if asked else prompt_param, code="context_length_exceeded",
            )
        max_tokens = room
    sampling = Sampling(
        max_new_tokens=max_tokens,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
    )
    resolved = await store.resolve(request.steering or [], limits)
    job = Job(prompt, tuple(r.steering for r in resolved), sampling)
    return job, resolved


__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Engine",
    "Job",
    "Limits",
    "Message",
    "NamedVector",
    "Prompt",
    "Resolved",
    "SteeringSpec",
    "UnknownVector",
    "VectorStore",
    "build_job",
    "error_body",
    "error_status",
    "load_vector_dir",
    "natural_weight",
    "parse_request",
    "prompt_ids",
    "render_chat",
    "render_completion",
]
