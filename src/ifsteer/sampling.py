"""How a row picks its next token: greedy, or a draw from its own generator.

Every queue (the HF batcher, vLLM's) takes the same `Sampling`; the draw below is the HF
batcher's, one row at a time, so one row's settings never change what its neighbours draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ifsteer.errors import InvalidSteering

# Temperatures this close to 0 are greedy in all but name, and float32 cannot honour them:
# logits / 1e-40 overflow to inf. The upper bound is OpenAI's.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 2.0


def check_temperature(temperature: float) -> None:
    """`Sampling` decodes a negative or NaN temperature greedily, without a word; asked for, it
    is a mistake to name."""
    if temperature == 0.0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        return
    raise InvalidSteering(
        f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}, "
        f"got {temperature:g}"
    )


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # always generate max_new_tokens, as benchmarks need

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def generator_for(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A row's own random stream: seeded by its seed, or by fresh entropy, so no row shares a
    stream it did not ask for; None for greedy rows."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


def draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One draw for one row. It never raises: a distribution float32 cannot hold (a tiny
    temperature overflows the logits to inf, and softmax gives NaN) falls back to the row's
    greedy token, the limit of sampling as the temperature goes to 0, so one row's settings
    cannot fail the step its neighbours decode in."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p, and always the top token (a top_p
        # below float32's range rounds to 0, which would keep none).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        outside[0] = False
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
