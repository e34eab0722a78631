"""Job de-duplication: jobs that must give the same tokens are decoded once.

Evaluation asks the same greedy question under the same steering in several settings, and a
sweep's points often coincide; a row then carries several tickets, one per job. Two keys decide
what may be shared: the job key (same prompt, steering and greedy settings or seed: the same
answer) and the prompt key (same prompt and prompt-phase steering: the same prompt KV and first
logits, so one prefill serves several rows).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ifsteer.jobs import Job
from ifsteer.steering import Steering


@dataclass(eq=False)
class Ticket:
    """A submitted job attached to a row; a ticket whose decider fires leaves the row with the
    answer so far."""

    job_id: int
    job: Job
    sent: int = 0  # characters of the row's text already given to on_text

    def emit(self, text: str) -> None:
        """Hand `on_text` what it has not seen of `text`."""
        if self.job.on_text is not None and len(text) > self.sent:
            delta, self.sent = text[self.sent :], len(text)
            self.job.on_text(delta)


def steering_key(steering: Sequence[Steering], *, prompt_phase: bool = False) -> Hashable:
    """Steerings compared by vector identity and settings (vectors hold tensors, not values)."""
    return tuple(
        (id(s.vector), s.effective_mode, s.effective_weight, s.positions)
        for s in steering
        if not prompt_phase or s.positions in ("all", "prompt")
    )


def job_key(job: Job) -> Hashable | None:
    """Jobs with equal keys produce the same tokens; None for a job never shared (an unseeded
    sample is its own draw)."""
    s = job.sampling
    if not s.greedy and s.seed is None:
        return None
    sampling = (s.max_new_tokens, s.ignore_eos) if s.greedy else s
    return (tuple(job.ids), steering_key(job.steering), sampling, job.logprobs)


def prompt_key(job: Job) -> Hashable:
    """Rows with equal prompt keys have equal prompt KV and first logits."""
    return (tuple(job.ids), steering_key(job.steering, prompt_phase=True))
