"""Train a steering vector: the same form as the paper's (a vector added at a layer), fitted.

The paper's vector is a mean difference of activations; on a small model it often points the
right way too weakly, or not at all, for format instructions (docs/shipped.md). A trained
vector keeps the form, so it runs unchanged on every path that steers (the engine, both
servers, the vLLM worker, GGUF export), but its values are fitted: with the model frozen, Adam
maximises the likelihood of answers that follow the instruction (`Example.target`) given the
prompt *without* the instruction, the vector added to the residual stream at every position
(`positions="all"`) of the chosen layer(s).

Training steers through `steering.steer` itself, with the raw parameter as the vector, so the
saved vector (unit direction × its norm as the additive weight) is applied exactly as it was
trained.

The loss, the targets' likelihood or that plus a preference over the rewritten answers, is
`objective`'s. Fluency is guarded two ways, both cheap on a CPU: the vector's norm is capped at
a fraction of the layer's mean residual norm (`TrainConfig.max_norm_ratio`: a vector as large
as the stream itself replaces what the model computed), and the vector kept is the one with the
lowest loss on held-out examples (checked every `eval_every` steps), not the last.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ifsteer.errors import InvalidSteering
from ifsteer.instructions import Instruction
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering
from ifsteer.training.objective import Example, Objective, batch, check_loss, tokens_of
from ifsteer.vectors import SteeringVector

__all__ = [
    "MIN_EXAMPLES",
    "Example",
    "NothingLearned",
    "TrainConfig",
    "Trained",
    "train_vectors",
]

Progress = Callable[[int], None]
METHOD = "trained"
MIN_EXAMPLES = 4  # two held out for the validation loss, two to train on


class NothingLearned(InvalidSteering):
    """Training gave no vector: too few examples to learn from, examples the loss cannot use
    (the preference loss on distilled answers, which have no rejected twin), or none that beats
    no steering on its held-out examples. A build records it and goes on (`compete`): one
    instruction this configuration cannot train must not stop a build of the others."""

    examples: int = 0  # how many training examples there were (set where they were gathered)


@dataclass(frozen=True)
class TrainConfig:
    layers: tuple[int, ...]
    steps: int = 60
    batch_size: int = 8
    lr: float = 0.05
    max_target_tokens: int = 64
    max_norm_ratio: float = 0.5
    eval_every: int = 10
    held_out: float = 0.1
    seed: int = 0
    loss: str = "likelihood"  # or "preference" (see the module docstring)
    beta: float = 0.1  # the preference term's temperature on summed log-probabilities


@dataclass
class Trained:
    """The trained vectors, one per layer, and what the file records about the training."""

    vectors: dict[int, SteeringVector]
    record: dict[str, Any] = field(default_factory=dict)


def _raw_vector(lm: LoadedModel, instruction: Instruction, layer: int, value: torch.Tensor):
    """The parameter as a vector `steer` adds as it is (weight 1, direction not normalised)."""
    return SteeringVector(
        direction=value,
        norm=1.0,
        layer=layer,
        target=0.0,
        model_id=lm.model_id,
        hidden_size=lm.hidden_size,
        instruction=instruction.phrasings[0],
        instruction_id=instruction.id,
        mode="additive",
        weight=1.0,
    )


def residual_norm(lm: LoadedModel, layer: int, batch: tuple[torch.Tensor, ...]) -> float:
    """Mean norm of the residual stream after `layer` over the batch's real tokens."""
    ids, mask, _labels = batch
    seen: list[torch.Tensor] = []

    def record(_module: Any, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        seen.append(hidden.detach().float().norm(dim=-1)[mask.bool()])

    handle = lm.layers[layer].register_forward_hook(record)
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return float(seen[0].mean())


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> None:
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise InvalidSteering(
                f"layer {layer} is out of range: the model has 0..{lm.n_layers - 1}"
            )


def train_vectors(
    lm: LoadedModel,
    instruction: Instruction,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    progress: Progress | None = None,
) -> Trained:
    """Fit one additive vector per layer of `config.layers` jointly; see the module docstring."""
    check_layers(lm, config.layers)
    if len(examples) < MIN_EXAMPLES:
        raise NothingLearned(f"{len(examples)} training examples: need at least {MIN_EXAMPLES}")
    check_loss(config.loss)
    if config.loss == "preference" and not any(e.rejected is not None for e in examples):
        raise NothingLearned(
            "the preference loss needs examples with a rejected answer (rule targets); "
            "these are distilled answers"
        )
    started = time.perf_counter()
    rng = random.Random(config.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_held = max(2, round(len(examples) * config.held_out))
    tokens = [tokens_of(lm, examples[i], config.max_target_tokens) for i in order]
    held, train = tokens[:n_held], tokens[n_held:]
    held_batch = batch(lm, held)
    torch.manual_seed(config.seed)
    values = {
        layer: torch.nn.Parameter(torch.randn(lm.hidden_size, device=lm.device) * 1e-3)
        for layer in config.layers
    }
    limits = {
        layer: config.max_norm_ratio * residual_norm(lm, layer, held_batch)
        for layer in config.layers
    }

    def steerings() -> list[Steering]:
        return [
            Steering(_raw_vector(lm, instruction, layer, value), positions="all")
            for layer, value in values.items()
        ]

    objective = Objective(lm, config.loss, config.beta)
    optimizer = torch.optim.Adam(list(values.values()), lr=config.lr)
    losses: list[float] = []
    held_losses: dict[int, float] = {}
    best: tuple[float, int, dict[int, torch.Tensor]] = (math.inf, 0, {})
    with _frozen(lm), torch.enable_grad():
        with torch.no_grad():
            best = (float(objective(held, [])), 0, {})
        held_losses[0] = best[0]
        cursor = 0
        for step in range(1, config.steps + 1):
            rows = [train[(cursor + k) % len(train)] for k in range(config.batch_size)]
            cursor += config.batch_size
            loss = objective(rows, steerings())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for layer, value in values.items():
                    norm = float(value.norm())
                    if norm > limits[layer]:
                        value.mul_(limits[layer] / norm)
            losses.append(float(loss.detach()))
            if step % config.eval_every == 0 or step == config.steps:
                with torch.no_grad():
                    held_loss = float(objective(held, steerings()))
                held_losses[step] = held_loss
                if held_loss < best[0]:
                    best = (held_loss, step, {k: v.detach().clone() for k, v in values.items()})
            if progress is not None:
                progress(1)
    if not best[2]:
        raise NothingLearned(
            f"training {instruction.id!r} never beat no steering on held-out examples "
            f"(loss {best[0]:.3f}); more steps or another layer may"
        )
    sources: dict[str, int] = {}
    for example in examples:
        sources[example.source] = sources.get(example.source, 0) + 1
    record = {
        "method": METHOD,
        "layers": list(config.layers),
        "config": asdict(config) | {"layers": list(config.layers)},
        "targets": sources,
        "n_train": len(train),
        "n_held_out": len(held),
        "best_step": best[1],
        "loss": {
            "first": losses[0],
            "last": losses[-1],
            "mean_last_10": statistics.fmean(losses[-10:]),
            "held_out_unsteered": held_losses[0],
            "held_out_best": best[0],
            "held_out": {str(k): v for k, v in held_losses.items()},
        },
        "norm_limits": {str(k): v for k, v in limits.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    vectors = {
        layer: _saved_vector(lm, instruction, layer, value, len(examples), record)
        for layer, value in best[2].items()
    }
    return Trained(vectors, record)


def _saved_vector(
    lm: LoadedModel,
    instruction: Instruction,
    layer: int,
    value: torch.Tensor,
    n_examples: int,
    record: dict[str, Any],
) -> SteeringVector:
    """The trained value as the paper's form: unit direction, its norm as the additive weight;
    the same vector training applied (`_raw_vector`), with what the file records."""
    norm = float(value.norm())
    return replace(
        _raw_vector(lm, instruction, layer, (value / norm).cpu()),
        norm=norm,
        weight=norm,
        phrasings=instruction.phrasings,
        n_pairs=n_examples,
        extra={"training": record},
    )


class _frozen:
    """No parameter of the model takes a gradient inside; their flags come back on exit."""

    def __init__(self, lm: LoadedModel) -> None:
        self.params = list(lm.model.parameters())
        self.flags = [p.requires_grad for p in self.params]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *_exc: object) -> None:
        for p, flag in zip(self.params, self.flags, strict=True):
            p.requires_grad_(flag)
