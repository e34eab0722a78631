"""`generate`: many prompts in, one completion each out, through the continuous batcher.

Each prompt may carry its own steering, so one call can mix steered and unsteered rows. Prompts
are queued longest first, so the rows that join together have similar lengths and pad little.
Greedy by default, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from ifsteer.batcher import Batcher
from ifsteer.errors import InvalidSteering
from ifsteer.jobs import Completion, Decider, Job, Sampling
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering

__all__ = ["Completion", "Sampling", "generate"]

# Called with (row index in the caller's order, new text) as tokens arrive; for streaming.
OnRowText = Callable[[int, str], None]
Progress = Callable[[int], None]
GREEDY = Sampling()


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    steering: Sequence[Steering] = (),
    per_row: Sequence[Sequence[Steering]] | None = None,
    sampling: Sampling = GREEDY,
    batch_size: int | None = None,
    formatted: bool = True,
    allow_transfer: bool = False,
    on_text: OnRowText | None = None,
    progress: Progress | None = None,
    decided: Sequence[Decider | None] | None = None,
) -> list[Completion]:
    """Generate one completion per prompt, in the caller's order.

    `steering` applies to every prompt, `per_row[i]` to prompt i alone. `formatted` wraps each
    prompt in the model's chat template (or `Q: ...\\nA:`); pass False for raw text.
    `batch_size` None sizes the batch to the model and free memory (`auto_batch_size`);
    `decided[i]` lets row i stop as soon as its check's verdict is settled. A sampling seed
    seeds row i with `seed + i`, so repeated prompts still give different, reproducible samples.
    """
    if per_row is not None and steering:
        raise InvalidSteering("give either steering for all rows or per_row, not both")
    for name, given in (("per_row", per_row), ("decided", decided)):
        if given is not None and len(given) != len(prompts):
            raise InvalidSteering(f"{name} has {len(given)} entries for {len(prompts)} prompts")
    rows = [steering] * len(prompts) if per_row is None else per_row
    tokens = [lm.render(p, formatted=formatted).ids for p in prompts]
    batcher = Batcher(
        lm,
        batch_size=batch_size,
        max_tokens=max(map(len, tokens), default=0) + sampling.max_new_tokens,
        allow_transfer=allow_transfer,
    )
    lengths = [len(p) for p in prompts]
    ids: dict[int, int] = {}
    for i in sorted(range(len(prompts)), key=lambda i: (-lengths[i], prompts[i])):
        job = Job(
            tokens[i],
            steering=rows[i],
            sampling=_for_row_seed(sampling, i),
            decided=None if decided is None else decided[i],
            on_text=None if on_text is None else _for_row(on_text, i),
        )
        ids[i] = batcher.submit(job)
    done = batcher.run(progress)
    return [done[ids[i]] for i in range(len(prompts))]


def _for_row_seed(sampling: Sampling, row: int) -> Sampling:
    if sampling.greedy or sampling.seed is None:
        return sampling
    return replace(sampling, seed=sampling.seed + row)


def _for_row(on_text: OnRowText, row: int) -> Callable[[str], None]:
    return lambda text: on_text(row, text)
