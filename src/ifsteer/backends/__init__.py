"""What a serving backend is: an `Engine` that generates `Job`s.

The HTTP face (`ifsteer.server`) parses a request, renders its prompt and resolves its steering,
then hands the engine a `Job`; it knows no backend beyond this protocol. The Hugging Face engine
(`backends.hf`) batches jobs on one local model; the vLLM adapter (`backends.vllm`) hands them to
vLLM. Backends never import the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ifsteer.chat import Prompt
from ifsteer.generation import Completion, Sampling
from ifsteer.instructions import Instruction
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector

# Called on the event loop, in order, with each new piece of a job's text (for streaming).
OnText = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    """One completion to make: rendered prompt, resolved steering, decoding settings."""

    prompt: Prompt
    steering: tuple[Steering, ...]
    sampling: Sampling


class Engine(Protocol):
    """A model behind the server. Its `tokenizer` renders and counts prompts on the event loop,
    so it must not be the copy a worker thread tokenizes batches with."""

    model_id: str
    tokenizer: Any
    n_layers: int
    hidden_size: int
    context_length: int | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, job: Job, on_text: OnText | None = None) -> Completion: ...

    async def extract(self, instruction: Instruction, layer: int) -> SteeringVector: ...

    def stats(self) -> dict[str, Any]: ...


__all__ = ["Engine", "Job", "OnText"]
