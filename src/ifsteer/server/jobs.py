"""A parsed request to the `Job`s a backend generates: its prompt, limits, sampling, steering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ifsteer.backends import Backend
from ifsteer.chat import InvalidPrompt, Prompt, render_chat
from ifsteer.jobs import Job, Sampling

from .registry import Resolved, VectorStore
from .schema import ApiError, GenerationRequest, Limits, Message


def chat_prompt(tokenizer: Any, messages: Sequence[Message]) -> Prompt:
    try:
        return render_chat(tokenizer, [m.turn() for m in messages])
    except InvalidPrompt as exc:
        raise ApiError(str(exc), param="messages") from None


def check_request_tokens(counts: Sequence[int], limits: Limits, param: str) -> None:
    """All of one request's prompts together, counted in tokens (each is checked alone too)."""
    if sum(counts) > limits.max_request_prompt_tokens:
        raise ApiError(
            f"the {len(counts)} prompts have {sum(counts)} tokens together, the limit per "
            f"request is {limits.max_request_prompt_tokens}; send them in several requests",
            param=param,
            code="context_length_exceeded",
        )


async def build_job(
    request: GenerationRequest,
    prompt: Prompt,
    *,
    backend: Backend,
    store: VectorStore,
    limits: Limits,
    prompt_param: str,
) -> tuple[Job, list[Resolved]]:
    """Check a request against the limits and the model, and resolve its steering."""
    n_prompt = len(prompt.ids)
    if n_prompt == 0:  # alone it is a 500 in the model; batched it would pass: refuse both
        raise ApiError("the prompt is empty once tokenized", param=prompt_param)
    limit = min(limits.max_prompt_tokens, limits.max_request_prompt_tokens)
    if n_prompt > limit:
        raise ApiError(
            f"the prompt has {n_prompt} tokens, the limit is {limit}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    asked = request.requested_max_tokens()
    room = None if backend.context_length is None else backend.context_length - n_prompt
    asked_as = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(
            f"{asked_as} {asked} is over the limit {limits.max_tokens}",
            param=asked_as,
            code="invalid_value",
        )
    max_tokens = asked or limits.default_max_tokens
    if room is not None and max_tokens > room:
        if asked is not None or room < 1:
            raise ApiError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's context of {backend.context_length} tokens",
                param=asked_as if asked else prompt_param,
                code="context_length_exceeded",
            )
        max_tokens = room
    sampling = Sampling(
        max_new_tokens=max_tokens,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
    )
    resolved = await store.resolve(request.steering or [], limits)
    job = Job(prompt.ids, tuple(s for r in resolved for s in r.steerings), sampling)
    return job, resolved
