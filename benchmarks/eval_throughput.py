"""Evaluation throughput: the continuous-batching engine vs the static batches it replaced.

One run, the same rows for every path, measured side by side on the embedded model:
- `static-8`: the pre-engine `generate` (left-padded static batches of 8 through HF `generate`,
  every row kept until the batch's longest ends), copied below from git history as the baseline;
- `engine`: `ifsteer.generation.generate` as it is now (auto batch size, rows leave and join);
- `engine-8`: the engine held to batch 8, to show how much comes from refill alone;
- `hf-plain`: plain HF `generate`, unsteered, static batches of the engine's batch size: the
  limit for this stack;
- `hf-grouped`: the same with the attention ifsteer gives a model on a CPU (`ifsteer.attention`):
  the limit for the engine's kernels.
`static-8` and `hf-plain` run on transformers' own SDPA attention, as the pre-engine path did.
End of turn is allowed (real answers end at different lengths); every other row is steered
with a real lowercase vector extracted here. Prints tokens/s, wall time and ratios.

Run: python benchmarks/eval_throughput.py [--prompts 64] [--tokens 256] [--threads N]
(256 tokens by default: the length sweeps and `run-paper` generate.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from ifsteer.attention import NAME as GROUPED
from ifsteer.batching import auto_batch_size
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.models import LoadedModel, load_model
from ifsteer.prompts import BASE_QUERIES
from ifsteer.steering import Steering, steer
from ifsteer.vectors import extract_instruction

LOWER = "change_case:english_lowercase"


def hf_config(lm: LoadedModel, max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
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
) -> int:
    """The pre-engine path: sort by length, static left-padded batches, HF generate per batch.

    With `rows` None it is plain HF generate (no hooks at all). Returns tokens generated.
    """
    texts = [lm.format_prompt(p) for p in prompts]
    lengths = [len(lm.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    stop = set(lm.stop_token_ids())
    tokens = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = lm.tokenize([texts[i] for i in chunk], templated=True)
        per_row = None if rows is None else [rows[i] for i in chunk]
        with steer(lm, per_row=per_row):
            output = lm.model.generate(**batch, generation_config=hf_config(lm, max_new_tokens))
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


def on_transformers_attention(lm: LoadedModel, run: Callable[[], int]) -> Callable[[], int]:
    def wrapped() -> int:
        with transformers_attention(lm):
            return run()

    return wrapped


def timed(run: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-engine-8", action="store_true", help="save a few minutes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    vector = extract_instruction(lm, get_instruction(LOWER), [10], n_pairs=16)[10]
    prompts = [BASE_QUERIES[i % len(BASE_QUERIES)] for i in range(args.prompts)]
    rows = [[Steering(vector, weight=3.0)] if i % 2 else [] for i in range(len(prompts))]
    auto = auto_batch_size(lm, max_tokens=args.tokens + 128)
    sampling = Sampling(max_new_tokens=args.tokens)
    generate(lm, prompts[:2], sampling=Sampling(max_new_tokens=4))  # warm up, untimed

    def engine(batch_size: int | None) -> Callable[[], int]:
        return lambda: sum(
            c.completion_tokens
            for c in generate(lm, prompts, per_row=rows, sampling=sampling, batch_size=batch_size)
        )

    paths: dict[str, Callable[[], int]] = {
        "static-8": on_transformers_attention(
            lm, lambda: static_batches(lm, prompts, rows, args.tokens, 8)
        ),
        "engine": engine(None),
        "hf-plain": on_transformers_attention(
            lm, lambda: static_batches(lm, prompts, None, args.tokens, auto)
        ),
        "hf-grouped": lambda: static_batches(lm, prompts, None, args.tokens, auto),
    }
    if not args.skip_engine_8:
        paths["engine-8"] = engine(8)
    results = {name: timed(run) for name, run in paths.items()}

    print(
        f"{args.prompts} prompts, up to {args.tokens} new tokens, end of turn allowed, "
        f"half steered; auto batch size {auto}; {torch.get_num_threads()} threads"
    )
    rate = {name: tokens / wall for name, (tokens, wall) in results.items()}
    for name, (tokens, wall) in results.items():
        print(f"{name:>9}: {tokens:5d} tokens in {wall:7.1f} s = {rate[name]:6.1f} tok/s")
    print(f"engine / static-8 (tok/s): {rate['engine'] / rate['static-8']:.2f}x (goal >= 3)")
    print(f"engine / static-8 (wall):  {results['static-8'][1] / results['engine'][1]:.2f}x")
    if "engine-8" in rate:
        print(
            f"engine-8 / static-8 (tok/s, refill alone): {rate['engine-8'] / rate['static-8']:.2f}x"
        )
    print(f"engine / hf-plain (tok/s, the stack's limit): {rate['engine'] / rate['hf-plain']:.2f}")
    print(f"engine / hf-grouped (tok/s, same kernels): {rate['engine'] / rate['hf-grouped']:.2f}")


if __name__ == "__main__":
    main()
