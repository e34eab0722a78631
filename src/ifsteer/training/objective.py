"""What a trained vector optimises: answers tokenized after the prompt without the instruction,
and the loss over them.

Two losses (`TrainConfig.loss`):

- ``likelihood``: mean negative log-likelihood of the target tokens. Most of a rule target is
  the model's own text, which it already finds likely, so the few tokens that carry the
  instruction (a leading "My answer is yes.", the commas left out) weigh little in the mean.
- ``preference``: that likelihood plus a preference term in the manner of DPO/BiPO, where an
  example also carries the answer the rule rewrote (`Example.rejected`): the steered model
  should raise the target over the original answer by more than the unsteered model does,
  −log σ(β·[(log p_v(target) − log p_0(target)) − (log p_v(rejected) − log p_0(rejected))]).
  Tokens the two answers share cancel, so the gradient lands on the tokens that differ; the
  likelihood term keeps the target itself likely (fluent). Costs about twice a likelihood step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ifsteer.errors import InvalidSteering
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering, steer

__all__ = [
    "LOSSES",
    "Example",
    "Objective",
    "Tokens",
    "batch",
    "check_loss",
    "pair_log_probs",
    "pairs",
    "preference_loss",
    "target_loss",
    "tokens_of",
]

LOSSES = ("likelihood", "preference")


def check_loss(loss: str) -> None:
    """The one check of a loss name: training runs it, and the CLI before any model loads."""
    if loss not in LOSSES:
        raise InvalidSteering(f"unknown loss {loss!r}; choose {' or '.join(LOSSES)}")


@dataclass(frozen=True)
class Example:
    """One prompt without the instruction and an answer that follows it."""

    prompt: str
    target: str
    finished: bool  # the turn ends after the target: its end-of-turn token is a target too
    source: str  # "rule" or "distill"
    rejected: str | None = None  # the answer a rule rewrote: what the preference loss lowers
    rejected_finished: bool = False


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    n_prompt: int
    rejected: list[int] | None = None  # prompt + rejected answer, for the preference loss


def tokens_of(lm: LoadedModel, example: Example, max_target: int) -> Tokens:
    prompt = list(lm.render(example.prompt).ids)

    def answer(text: str, finished: bool) -> list[int]:
        ids = list(lm.tokenizer(text, add_special_tokens=False).input_ids)[:max_target]
        return ids + [_end_of_turn(lm)] if finished and len(ids) < max_target else ids

    rejected = None
    if example.rejected is not None:
        rejected = prompt + answer(example.rejected, example.rejected_finished)
    return Tokens(prompt + answer(example.target, example.finished), len(prompt), rejected)


def _end_of_turn(lm: LoadedModel) -> int:
    """The token a chat turn ends with (the template's), or EOS for base models."""
    vocab = lm.tokenizer.get_vocab()
    if lm.is_chat and "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    eos = lm.tokenizer.eos_token_id
    if eos is None:
        raise InvalidSteering("the tokenizer has no end-of-turn token to train towards")
    return int(eos)


def batch(lm: LoadedModel, rows: Sequence[Tokens]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, mask and labels (-100 on prompt and padding)."""
    return _padded(lm, [(r.ids, r.n_prompt) for r in rows])


def _padded(lm: LoadedModel, rows: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in rows)
    pad = int(lm.tokenizer.pad_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n_prompt) in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row)
        mask[i, :n] = 1
        labels[i, n_prompt:n] = torch.tensor(row[n_prompt:])
    return ids.to(lm.device), mask.to(lm.device), labels.to(lm.device)


def pairs(lm: LoadedModel, rows: Sequence[Tokens]) -> tuple[torch.Tensor, ...]:
    """Targets then rejected answers in one batch (a row without one repeats its target and
    is left out of the preference term by `_has_rejected`)."""
    chosen = [(r.ids, r.n_prompt) for r in rows]
    rejected = [(r.rejected or r.ids, r.n_prompt) for r in rows]
    return _padded(lm, chosen + rejected)


def _has_rejected(lm: LoadedModel, rows: Sequence[Tokens]) -> torch.Tensor:
    return torch.tensor([r.rejected is not None for r in rows], device=lm.device)


def target_loss(
    lm: LoadedModel,
    steerings: Sequence[Steering],
    batch: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens, steered by `steerings`."""
    nll, labels = _token_nll(lm, steerings, batch)
    return nll.sum() / (labels != -100).sum()


def _token_nll(
    lm: LoadedModel, steerings: Sequence[Steering], batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (0 off the answers) and the shifted labels."""
    ids, mask, labels = batch
    with steer(lm, steerings):
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    shifted = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), shifted, ignore_index=-100, reduction="none"
    )
    return nll, shifted


def pair_log_probs(
    lm: LoadedModel, steerings: Sequence[Steering], pairs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each target and each rejected answer (`pairs` order),
    and the targets' mean token NLL."""
    nll, labels = _token_nll(lm, steerings, pairs)
    n = nll.shape[0] // 2
    answer = labels != -100
    mean_nll = nll[:n].sum() / answer[:n].sum()
    return -nll.sum(dim=1), mean_nll


def preference_loss(
    log_probs: torch.Tensor,
    mean_nll: torch.Tensor,
    reference: torch.Tensor,
    has_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The targets' likelihood plus −log σ(β·margin) over the rows that have a rejected answer;
    `reference` holds the unsteered summed log-probabilities in the same order."""
    n = log_probs.shape[0] // 2
    gain = log_probs - reference
    margin = beta * (gain[:n] - gain[n:])
    if not bool(has_rejected.any()):
        return mean_nll
    return mean_nll - torch.nn.functional.logsigmoid(margin[has_rejected]).mean()


class Objective:
    """The configured loss over rows. The preference loss compares with the unsteered model's
    log-probabilities, which never change: each row's are computed once (right padding leaves
    a row's sum as it is) instead of in an extra forward pass every step."""

    def __init__(self, lm: LoadedModel, loss: str, beta: float) -> None:
        self.lm = lm
        self.loss = loss
        self.beta = beta
        self.reference: dict[int, tuple[float, float]] = {}

    def __call__(self, rows: Sequence[Tokens], steerings: Sequence[Steering]) -> torch.Tensor:
        if self.loss == "likelihood":
            return target_loss(self.lm, steerings, batch(self.lm, rows))
        missing = [r for r in rows if id(r) not in self.reference]
        if missing:
            with torch.no_grad():
                unsteered, _ = pair_log_probs(self.lm, [], pairs(self.lm, missing))
            n = len(missing)
            for i, row in enumerate(missing):
                self.reference[id(row)] = (float(unsteered[i]), float(unsteered[n + i]))
        reference = torch.tensor(
            [self.reference[id(r)][0] for r in rows] + [self.reference[id(r)][1] for r in rows],
            device=self.lm.device,
        )
        log_probs, mean_nll = pair_log_probs(self.lm, steerings, pairs(self.lm, rows))
        return preference_loss(
            log_probs, mean_nll, reference, _has_rejected(self.lm, rows), self.beta
        )
