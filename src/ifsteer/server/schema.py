"""The request schema both backends serve: OpenAI's fields, our `steering` field, the limits.

A client sends the same JSON to `ifsteer serve` on either backend and gets the same 4xx for the
same mistake, because every request is read here, before any backend sees it. Errors carry the
HTTP status and the field at fault, in OpenAI's error shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ifsteer.chat import Turn
from ifsteer.errors import (
    IfsteerError,
    InvalidSteering,
    MalformedVectorFile,
    UnknownInstruction,
    VectorMismatch,
)
from ifsteer.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE

# --- errors -------------------------------------------------------------------------------


class ApiError(IfsteerError):
    """A request the server refuses, with the HTTP status and the field at fault."""

    status = 400

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str = "invalid_request",
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
    # All of one request's prompts together (a /v1/completions list): cost is tokens, not
    # characters ("Z" and 300 combining marks are 1,800 tokens), and the batcher prefills in
    # steps of bounded tokens (batcher.PREFILL_TOKENS), so one request cannot fill many steps.
    max_request_prompt_tokens: int = 8192
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128
    max_steering: int = 8  # entries in one request's `steering` list
    max_abs_weight: float = 1000.0
    max_instruction_chars: int = 1000
    max_instruction_tokens: int = 256  # what bounds an extraction's cost (emoji are 4 tokens)
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_body_bytes: int = 1_000_000
    max_json_depth: int = 32  # nesting of the JSON body; real requests need 5
    # Inline extraction is the costly request: each new (instruction, layer) is a forward pass
    # over every prompt pair, so a request may start one and the server runs a few at a time.
    max_new_extractions: int = 1  # per request
    max_pending_extractions: int = 2  # in the whole server, running or waiting
    max_queued: int = 64  # completions generating or waiting, over all requests
    request_timeout_s: float = 300.0  # a non-streaming request's deadline, queue included
    body_timeout_s: float = 15.0  # to send the whole body once the headers are in


# --- requests -----------------------------------------------------------------------------


class SteeringSpec(BaseModel):
    """One entry of `steering`: a loaded vector by name, or an instruction extracted on the fly.

    `mode` and `weight` default to the vector's own; switching a vector's mode without a
    weight uses that mode's natural weight (‖u‖ for additive, 1 for projection). `layer`
    picks one of the layers a vector file holds, or where an inline instruction is extracted.
    `positions` steers every token ("all"), the prompt's only ("prompt") or the generated ones
    only ("generated"), as `ifsteer.steering.Steering` does.
    """

    model_config = ConfigDict(extra="forbid")

    vector: str | None = Field(default=None, min_length=1, max_length=200)
    instruction: str | None = Field(default=None, min_length=1)
    instruction_id: str | None = Field(default=None, min_length=1, max_length=200)
    mode: Literal["projection", "additive"] | None = None
    weight: float | None = Field(default=None, allow_inf_nan=False, strict=True)
    layer: int | None = Field(default=None, ge=0, strict=True)
    positions: Literal["all", "prompt", "generated"] | None = None  # None: the point's, or all

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

    def turn(self) -> Turn:
        """As chat templates name roles: OpenAI's `developer` is their `system`."""
        return ("system" if self.role == "developer" else self.role), self.text()


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields OpenAI (and vLLM) clients may send that ifsteer does not implement: refused, never
# ignored. A value that asks for nothing (top_k -1, repetition_penalty 1, tool_choice "none",
# modalities ["text"]) is let through, as clients send those defaults.
_UNSUPPORTED: dict[str, str] = {
    "stop": "generation ends at the model's end-of-turn token or at max_tokens",
    "presence_penalty": "leave it out",
    "frequency_penalty": "leave it out",
    "repetition_penalty": "leave it out",
    "logit_bias": "leave it out",
    "logprobs": "leave it out",
    "top_logprobs": "leave it out",
    "top_k": "use top_p",
    "min_p": "use top_p",
    "tools": "leave them out",
    "tool_choice": "leave it out",
    "functions": "leave them out",
    "function_call": "leave it out",
    "modalities": "text is the only output",
    "audio": "text is the only output",
    "reasoning_effort": "leave it out",
    "prediction": "leave it out",
    "echo": "leave it out",
    "suffix": "leave it out",
}
# Values that ask for nothing: these by default, or the field's own.
_NEUTRAL: tuple[Any, ...] = (None, False, 0, "", [], {})
_NEUTRAL_OF: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1),
    "top_k": (None, 0, -1),
    "tool_choice": (None, "none"),
    "modalities": (None, ["text"]),
}
# top_p this close to 0 cannot be honoured in float32 (as MIN_TEMPERATURE, ifsteer.sampling):
# 1e-46 rounds to 0, which keeps no token.
MIN_TOP_P = 1e-6
# The generator behind `seed` takes 32 bits: seeds 1 and 2**32 + 1 would give the same text.
MAX_SEED = 2**32 - 1


class GenerationRequest(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI clients send extras;
    known fields that would change the output and that we do not implement are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    # Numbers are strict: `true` or `"1.0"` is a mistake to name, not a value to guess at.
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(
        default=None, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, strict=True
    )
    top_p: float | None = Field(
        default=None, ge=MIN_TOP_P, le=1.0, allow_inf_nan=False, strict=True
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    n: int | None = Field(default=None, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: Any = None
    top_k: Any = None
    min_p: Any = None
    user: str | None = None
    steering: list[SteeringSpec] | None = None

    @field_validator("temperature")
    @classmethod
    def _honourable_temperature(cls, value: float | None) -> float | None:
        if value is not None and 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"a temperature above 0 must be at least {MIN_TEMPERATURE:g}; "
                "send 0 for greedy decoding"
            )
        return value

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
            value = getattr(self, name, None)
            if not any(_same(value, v) for v in _NEUTRAL_OF.get(name, _NEUTRAL)):
                raise ApiError(
                    f"{name} is not supported by ifsteer; {hint}",
                    param=name,
                    code="unsupported_parameter",
                )
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind: `True` is not 1 here, nor `0` the string "none"."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):
        return isinstance(value, (int, float)) and value == neutral
    return type(value) is type(neutral) and value == neutral


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    prediction: Any = None
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
        if "" in ([value] if isinstance(value, str) else value):
            raise ValueError("a prompt is empty; give the model some text to continue")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
