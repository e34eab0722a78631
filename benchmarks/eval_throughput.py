"""Evaluation throughput: the continuous batcher vs the static batches it replaced, and vs
plain `generate` on the same kernels.

One run, the same rows for every path, measured side by side on the embedded model:
- per answer length (`--tokens`, default 64, 128 and 256), end of turn allowed, every other row
  steered with a real lowercase vector extracted here:
  - `static-8`: the pre-batcher `generate` (left-padded static batches of 8 through HF
    `generate`, every row kept until the batch's longest ends, transformers' own SDPA
    attention), copied below from git history as the baseline;
  - `batcher`: `ifsteer.generation.generate` as it is now (auto batch size, rows leave and
    join);
  and the ratio with the model's load time added to both, as `ifsteer eval` pays it;
- per batch size (`--batches`, default 32 and 64), every row generating exactly `--step-tokens`
  tokens (end of turn ignored), half steered: `batcher` held to that batch against `plain`, HF
  `generate` unsteered on the attention ifsteer gives a model on a CPU (`ifsteer.attention`):
  the batcher's per-step cost against the limit for its kernels.
- per answer length in `--eval-tokens` (default 128 and 256), the issue's user scenario: the
  first `--eval-rows` (64) IFEval format rows in the no-instruction and instruction settings,
  `run_evaluation` as `ifsteer eval` runs it (checks, perplexity, records on disk) against
  `static-8` on the same prompts (generation only), each with the model's load time added.
Prints tokens/s, wall time and ratios; absolute times are only comparable within one run.

Run: python benchmarks/eval_throughput.py [--prompts 64] [--tokens 64,128,256]
[--batches 32,64] [--step-tokens 64] [--eval-rows 64] [--eval-tokens 128,256] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from ifsteer.attention import NAME as GROUPED
from ifsteer.batching import auto_batch_size
from ifsteer.datasets import data_path
from ifsteer.evaluation import run_evaluation
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.models import LoadedModel, load_model
from ifsteer.prompts import BASE_QUERIES
from ifsteer.rows import load_rows
from ifsteer.steering import Steering, steer
from ifsteer.vectors import extract_instruction

LOWER = "change_case:english_lowercase"


def hf_config(
    lm: LoadedModel, max_new_tokens: int, *, ignore_eos: bool = False
) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=lm.stop_token_ids(),
        pad_token_id=lm.tokenizer.pad_token_id,
    )


def until_stop(ids: list[int], stop: set[int]) -> int:
    return next((i for i, t in enumerate(ids) if t in stop), len(ids))


@torch.no_grad()
def static_batches(
    lm: LoadedModel,
    prompts: Sequence[str],
    rows: Sequence[Sequence[Steering]] | None,
    max_new_tokens: int,
    batch_size: int,
    *,
    ignore_eos: bool = False,
) -> int:
    """The pre-batcher path: sort by length, static left-padded batches, HF generate per batch.

    With `rows` None it is plain HF generate (no hooks at all). Returns tokens generated.
    """
    texts = [lm.format_prompt(p) for p in prompts]
    lengths = [len(lm.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    stop = set() if ignore_eos else set(lm.stop_token_ids())
    config = hf_config(lm, max_new_tokens, ignore_eos=ignore_eos)
    tokens = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = lm.tokenize([texts[i] for i in chunk], templated=True)
        per_row = None if rows is None else [rows[i] for i in chunk]
        with steer(lm, per_row=per_row):
            output = lm.model.generate(**batch, generation_config=config)
        width = batch["input_ids"].shape[1]
        tokens += sum(until_stop(ids, stop) for ids in output[:, width:].tolist())
    return tokens


@contextmanager
def transformers_attention(lm: LoadedModel) -> Iterator[None]:
    lm.model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(GROUPED)


def timed(run: Callable[..., int], *args: Any, **kwargs: Any) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = run(*args, **kwargs)
    return tokens, time.perf_counter() - start


def batcher(
    lm: LoadedModel,
    prompts: Sequence[str],
    rows: Sequence[Sequence[Steering]],
    sampling: Sampling,
    batch_size: int | None,
) -> int:
    out = generate(lm, prompts, per_row=rows, sampling=sampling, batch_size=batch_size)
    return sum(c.completion_tokens for c in out)


def evaluation(lm: LoadedModel, rows: Sequence[Any], settings: Sequence[str], length: int) -> int:
    """`ifsteer eval` without vectors, into a scratch run directory; tokens generated."""
    with tempfile.TemporaryDirectory() as out:
        summary = run_evaluation(
            lm, rows, None, out, settings=settings, sampling=Sampling(max_new_tokens=length)
        )
        lines = summary.responses_path.read_text("utf-8").splitlines()
        return sum(json.loads(line)["completion_tokens"] for line in lines)


def report(name: str, tokens: int, wall: float) -> float:
    print(f"  {name:>8}: {tokens:6d} tokens in {wall:7.1f} s = {tokens / wall:6.1f} tok/s")
    return tokens / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", default="64,128,256", help="answer lengths, comma-separated")
    parser.add_argument("--batches", default="32,64", help="batch sizes, comma-separated")
    parser.add_argument("--step-tokens", type=int, default=64, help="tokens per row, batch runs")
    parser.add_argument("--eval-rows", type=int, default=64, help="format rows, eval runs")
    parser.add_argument("--eval-tokens", default="128,256", help="answer lengths, eval runs")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    lm = load_model(args.model)
    load = time.perf_counter() - start
    vector = extract_instruction(lm, get_instruction(LOWER), [10], n_pairs=16)[10]
    prompts = [BASE_QUERIES[i % len(BASE_QUERIES)] for i in range(args.prompts)]
    rows = [[Steering(vector, weight=3.0)] if i % 2 else [] for i in range(len(prompts))]
    generate(lm, prompts[:2], sampling=Sampling(max_new_tokens=4))  # warm up, untimed
    print(
        f"{args.prompts} prompts, half steered; model load {load:.1f} s; "
        f"{torch.get_num_threads()} threads"
    )

    for length in (int(t) for t in args.tokens.split(",") if t):
        auto = auto_batch_size(lm, max_tokens=length + 128)
        sampling = Sampling(max_new_tokens=length)
        print(f"up to {length} new tokens, end of turn allowed; auto batch size {auto}")
        with transformers_attention(lm):
            static = timed(static_batches, lm, prompts, rows, length, 8)
        ours = timed(batcher, lm, prompts, rows, sampling, None)
        rate = report("static-8", *static), report("batcher", *ours)
        print(f"  batcher / static-8 (tok/s): {rate[1] / rate[0]:.2f}x")
        print(
            "  batcher / static-8 (wall, model load included): "
            f"{(load + static[1]) / (load + ours[1]):.2f}x"
        )

    for size in (int(b) for b in args.batches.split(",") if b):
        batch_prompts = [BASE_QUERIES[i % len(BASE_QUERIES)] for i in range(size)]
        batch_rows = [[Steering(vector, weight=3.0)] if i % 2 else [] for i in range(size)]
        sampling = Sampling(max_new_tokens=args.step_tokens, ignore_eos=True)
        print(f"batch {size}: {args.step_tokens} tokens a row, end of turn ignored")
        plain = timed(
            static_batches, lm, batch_prompts, None, args.step_tokens, size, ignore_eos=True
        )
        ours = timed(batcher, lm, batch_prompts, batch_rows, sampling, size)
        rate = report("plain", *plain), report("batcher", *ours)
        print(f"  batcher / plain generate, same attention (tok/s): {rate[1] / rate[0]:.2f}")

    rows = load_rows(data_path("ifeval_single_instr_format.jsonl"), limit=args.eval_rows)
    settings = ("no_instruction", "instruction")
    eval_prompts = [row.prompt_for(setting) for row in rows for setting in settings]
    for length in (int(t) for t in args.eval_tokens.split(",") if t):
        print(f"ifsteer eval: {len(rows)} format rows x {len(settings)} settings, {length} tokens")
        with transformers_attention(lm):
            static = timed(static_batches, lm, eval_prompts, None, length, 8)
        ours = timed(evaluation, lm, rows, settings, length)
        report("static-8", *static), report("eval", *ours)
        print(
            "  eval (checks, perplexity, records) / static-8 generation, wall with model load: "
            f"{(load + static[1]) / (load + ours[1]):.2f}x"
        )


if __name__ == "__main__":
    main()
