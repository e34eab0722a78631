"""Batched, KV-cached generation under steering.

Prompts are sorted by length and left-padded into batches, so padding stays small and the last
prompt token of every row sits at the same position; each row may carry its own steering, so
one batch can mix steered and unsteered requests. Greedy by default, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from ifsteer.errors import InvalidSteering
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering, steer

# Called with (row index in the caller's order, new text) as tokens arrive; for streaming.
OnText = Callable[[int, str], None]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # always generate max_new_tokens, as benchmarks need

    def config(self, lm: LoadedModel) -> GenerationConfig:
        stop = [] if self.ignore_eos else lm.stop_token_ids()
        greedy = self.temperature <= 0.0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            top_p=None if greedy else self.top_p,
            top_k=None,
            eos_token_id=stop or None,
            pad_token_id=lm.tokenizer.pad_token_id,
        )


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    steering: Sequence[Steering] = (),
    per_row: Sequence[Sequence[Steering]] | None = None,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    formatted: bool = True,
    allow_transfer: bool = False,
    on_text: OnText | None = None,
    progress: Progress | None = None,
) -> list[Completion]:
    """Generate one completion per prompt, in the caller's order.

    `steering` applies to every prompt, `per_row[i]` to prompt i alone. `formatted` wraps each
    prompt in the model's chat template (or `Q: ...\\nA:`); pass False for raw text.
    """
    if per_row is not None and len(per_row) != len(prompts):
        raise InvalidSteering(f"per_row has {len(per_row)} entries for {len(prompts)} prompts")
    if batch_size < 1:
        raise InvalidSteering("batch_size must be at least 1")
    texts = [lm.format_prompt(p) for p in prompts] if formatted else list(prompts)
    lengths = [len(lm.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    results: dict[int, Completion] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk_rows = None if per_row is None else [per_row[i] for i in rows]
        completions = _generate_batch(
            lm,
            [texts[i] for i in rows],
            formatted=formatted,
            steering=steering,
            per_row=chunk_rows,
            sampling=sampling,
            allow_transfer=allow_transfer,
            on_text=None if on_text is None else _remap(on_text, rows),
        )
        results.update(zip(rows, completions, strict=True))
        if progress is not None:
            progress(len(rows))
    return [results[i] for i in range(len(texts))]


def _remap(on_text: OnText, rows: list[int]) -> OnText:
    return lambda row, text: on_text(rows[row], text)


@torch.no_grad()
def _generate_batch(
    lm: LoadedModel,
    texts: list[str],
    *,
    formatted: bool,
    steering: Sequence[Steering],
    per_row: Sequence[Sequence[Steering]] | None,
    sampling: Sampling,
    allow_transfer: bool,
    on_text: OnText | None,
) -> list[Completion]:
    batch = lm.tokenize(texts, templated=formatted)
    stop = set() if sampling.ignore_eos else set(lm.stop_token_ids())
    streamer = _RowStreamer(lm, len(texts), stop, on_text) if on_text else None
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with steer(lm, steering, per_row=per_row, allow_transfer=allow_transfer):
        output = lm.model.generate(
            **batch, generation_config=sampling.config(lm), streamer=streamer
        )
    prompt_width = batch["input_ids"].shape[1]
    completions = []
    for row, ids in enumerate(output[:, prompt_width:].tolist()):
        kept, finish = _until_stop(ids, stop, sampling.max_new_tokens)
        completions.append(
            Completion(
                text=lm.tokenizer.decode(kept, skip_special_tokens=True),
                prompt_tokens=int(batch["attention_mask"][row].sum()),
                completion_tokens=len(kept),
                finish_reason=finish,
            )
        )
    return completions


def _until_stop(ids: list[int], stop: set[int], limit: int) -> tuple[list[int], str]:
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i], "stop"
    return ids, "length" if len(ids) >= limit else "stop"


class _RowStreamer(BaseStreamer):
    """Turns generate's per-step token columns into per-row text deltas.

    Text is decoded from the row's whole token list each step and only the new suffix is sent,
    so multi-byte characters split across tokens are never emitted half-done.
    """

    def __init__(self, lm: LoadedModel, rows: int, stop: set[int], on_text: OnText) -> None:
        self.tokenizer = lm.tokenizer
        self.stop = stop
        self.on_text = on_text
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent: list[str] = [""] * rows
        self.done = [False] * rows
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.stop:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            delta = text[len(self.sent[row]) :]
            if delta:
                self.sent[row] = text
                self.on_text(row, delta)

    def end(self) -> None:
        for row, tokens in enumerate(self.tokens):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            delta = text[len(self.sent[row]) :]
            if delta:
                self.sent[row] = text
                self.on_text(row, delta)
