"""What steering costs on vLLM, against stock vLLM compiled and stock vLLM eager, in one run.

Three engines on the same weights (the embedded SmolLM2, float32, or IFSTEER_VLLM_MODEL),
alive together so the machine's load falls on all of them alike:

- ifsteer: `VLLMEngine` as `ifsteer serve --backend vllm` starts it (vLLM's defaults:
  compiled, CUDA graphs on GPUs), every request steered (the lowercase instruction vector
  extracted here, projection at the default layer), and the same engine unsteered;
- stock compiled: vLLM's `AsyncLLM` with the same settings and no ifsteer worker;
- stock eager: the same with `enforce_eager=True` (what the adapter used to force).

Completion tokens/s of a burst of `batch` concurrent requests (64 tokens each, greedy), at
batch 8 and 32; rounds cycle through the four settings after one warm-up burst of each (so
prefix-cache hits fall on all alike), and each ratio is over the compiled stock engine.
Goal: ifsteer steered >= 0.97 x stock compiled.

    python benchmarks/vllm_overhead.py                  # needs vLLM (setup.sh --with-vllm)
    python benchmarks/vllm_overhead.py --repeats 3 --json out.json --with-hf

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

from ifsteer.backends.vllm import VLLMEngine  # noqa: E402
from ifsteer.backends.vllm.engine import sampling_params, steered_prompt  # noqa: E402
from ifsteer.chat import render_chat, stop_token_ids  # noqa: E402
from ifsteer.generation import Sampling, generate  # noqa: E402
from ifsteer.instructions import get_instruction  # noqa: E402
from ifsteer.jobs import Job  # noqa: E402
from ifsteer.models import DEFAULT_MODEL, cache_dir, load_model  # noqa: E402
from ifsteer.prompts import BASE_QUERIES  # noqa: E402
from ifsteer.steering import Steering  # noqa: E402
from ifsteer.vectors import default_layer, extract_instruction  # noqa: E402

SETTINGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 1 << 30,
    "max_num_seqs": 32,
}
Burst = Callable[[list[str], int], Awaitable[int]]


def _ours(engine: VLLMEngine, steering: tuple[Steering, ...]) -> Burst:
    async def burst(prompts: list[str], tokens: int) -> int:
        jobs = [
            Job(
                render_chat(engine.tokenizer, [("user", p)]).ids,
                steering,
                Sampling(max_new_tokens=tokens),
            )
            for p in prompts
        ]
        done = await asyncio.gather(*(engine.generate(job) for job in jobs))
        return sum(c.completion_tokens for c in done)

    return burst


def _stock(llm: Any, tokenizer: Any) -> Burst:
    """The same requests on a stock engine: the same token ids and sampling parameters."""
    from vllm.sampling_params import RequestOutputKind

    stop = stop_token_ids(tokenizer)

    async def one(prompt: str, tokens: int) -> int:
        ids = list(render_chat(tokenizer, [("user", prompt)]).ids)
        params = sampling_params(
            Sampling(max_new_tokens=tokens), (), stop, output_kind=RequestOutputKind.DELTA
        )
        n = 0
        async for output in llm.generate(steered_prompt(ids, ()), params, uuid.uuid4().hex):
            n += len(output.outputs[0].token_ids)
            last = output.outputs[0].token_ids[-1:] or [None]
        return n - (last[0] in stop)  # as VLLMEngine counts: not the stop token

    async def burst(prompts: list[str], tokens: int) -> int:
        return sum(await asyncio.gather(*(one(p, tokens) for p in prompts)))

    return burst


async def _measure(
    bursts: dict[str, Burst], batches: list[int], tokens: int, repeats: int
) -> dict[str, float]:
    results: dict[str, float] = {}
    for batch in batches:
        prompts = list(BASE_QUERIES[:batch])
        for burst in bursts.values():  # warm-up: every setting's prompts in its prefix cache
            await burst(prompts, 4)
        totals = {name: [0, 0.0] for name in bursts}
        for _ in range(repeats):
            for name, burst in bursts.items():
                start = time.perf_counter()
                totals[name][0] += await burst(prompts, tokens)
                totals[name][1] += time.perf_counter() - start
        for name, (n, seconds) in totals.items():
            results[f"{name}_b{batch}"] = n / seconds
    return results


def _hf(lm: Any, steering: tuple[Steering, ...], tokens: int, repeats: int) -> float:
    prompts = list(BASE_QUERIES[:32])
    generate(lm, prompts[:4], steering=steering, sampling=Sampling(max_new_tokens=4))  # warm-up
    n, seconds = 0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(
            lm, prompts, steering=steering, batch_size=32, sampling=Sampling(max_new_tokens=tokens)
        )
        seconds += time.perf_counter() - start
        n += sum(c.completion_tokens for c in out)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--with-hf", action="store_true", help="also the HF backend, batch 32")
    args = parser.parse_args()

    lm = load_model(os.environ.get("IFSTEER_VLLM_MODEL", DEFAULT_MODEL), "float32")
    layer = default_layer(lm.n_layers)
    vector = extract_instruction(
        lm, get_instruction("change_case:english_lowercase"), [layer], n_pairs=16
    )[layer]
    steering = (Steering(vector),)
    source = os.environ.get("IFSTEER_VLLM_MODEL") or str(cache_dir(DEFAULT_MODEL))
    settings = dict(SETTINGS)
    if torch.cuda.is_available():  # three engines on one GPU: each claims a quarter at start
        settings["gpu_memory_utilization"] = 0.25

    async def run() -> dict[str, float]:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = VLLMEngine(source, model_id=lm.model_id, **settings)
        await engine.start()
        stock = [
            AsyncLLM.from_engine_args(
                AsyncEngineArgs(model=source, enable_prefix_caching=True, **settings, **eager)
            )
            for eager in ({}, {"enforce_eager": True})
        ]
        compiled, eager = stock
        try:
            (info,) = await engine.worker_info()
            print(
                f"ifsteer engine: compilation mode {info['compilation_mode']}, "
                f"CUDA graphs {info['cudagraph_mode']}"
            )
            bursts = {
                "stock_compiled": _stock(compiled, engine.tokenizer),
                "ifsteer_steered": _ours(engine, steering),
                "ifsteer_unsteered": _ours(engine, ()),
                "stock_eager": _stock(eager, engine.tokenizer),
            }
            return await _measure(bursts, [8, 32], args.tokens, args.repeats)
        finally:
            await engine.close()
            for llm in stock:
                llm.shutdown()

    results: dict[str, Any] = asyncio.run(run())
    for batch in (8, 32):
        base = results[f"stock_compiled_b{batch}"]
        line = f"batch {batch:2d}: stock compiled {base:6.1f} tok/s"
        for name in ("ifsteer_steered", "ifsteer_unsteered", "stock_eager"):
            value = results[f"{name}_b{batch}"]
            results[f"{name}_over_stock_compiled_b{batch}"] = value / base
            line += f" | {name.replace('_', ' ')} {value:6.1f} (x{value / base:.3f})"
        print(line)
    print("goal: ifsteer steered >= 0.97 x stock compiled at batch 8 and 32")
    if args.with_hf:
        results["hf_steered_b32"] = _hf(lm, steering, args.tokens, args.repeats)
        ratio = results["ifsteer_steered_b32"] / results["hf_steered_b32"]
        hf = results["hf_steered_b32"]
        print(f"batch 32, steered: HF backend {hf:6.1f} tok/s (ifsteer on vLLM x{ratio:.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
