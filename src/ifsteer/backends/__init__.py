"""What a serving backend is: a `Backend` that generates `jobs.Job`s for the server.

The HTTP face (`ifsteer.server`) parses a request, renders its prompt into token ids and
resolves its steering, then hands the backend a `Job`; it knows no backend beyond this
protocol. The Hugging Face backend (`backends.hf`) drives the continuous `batcher.Batcher` on one
local model; the vLLM adapter (`backends.vllm`) hands jobs to vLLM. Backends never import the
server.
"""

from __future__ import annotations

from typing import Any, Protocol

from ifsteer.instructions import Instruction
from ifsteer.jobs import Completion, Job
from ifsteer.vectors import SteeringVector


class Backend(Protocol):
    """A model behind the server. `generate` calls the job's `on_text` on the event loop, in
    order; its `on_done` is the backend's own (the awaited result is the completion). The
    `tokenizer` renders and counts prompts on the event loop, so it must not be the copy a
    worker thread decodes with."""

    model_id: str
    tokenizer: Any
    n_layers: int
    hidden_size: int
    context_length: int | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, job: Job) -> Completion: ...

    async def extract(self, instruction: Instruction, layer: int) -> SteeringVector: ...

    def stats(self) -> dict[str, Any]: ...


__all__ = ["Backend"]
