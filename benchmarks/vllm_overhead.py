"""What steering costs on the vLLM engine, and how vLLM compares with the HF backend.

One vLLM engine (the embedded SmolLM2, float32, eager) and the HF model, in one run:

- vLLM steered vs unsteered completion tokens/s at batch 8 and 32 (a burst of that many
  concurrent requests, 64 tokens each, greedy); steered is the instruction vector extracted
  here, projection at the default layer. Runs alternate steered / unsteered, after one
  warm-up burst of each, so load drift and prefix-cache hits fall on both alike. Goal: >= 0.95.
- vLLM vs HF backend, both steered, at batch 32 (HF: `generate(batch_size=32)`).

    python benchmarks/vllm_overhead.py                  # needs vLLM (setup.sh --with-vllm)
    IFSTEER_VLLM_MODEL=DIR python benchmarks/vllm_overhead.py --repeats 3 --json out.json

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

from ifsteer.backends.vllm import VLLMEngine  # noqa: E402
from ifsteer.chat import render_chat  # noqa: E402
from ifsteer.generation import Sampling, generate  # noqa: E402
from ifsteer.instructions import get_instruction  # noqa: E402
from ifsteer.jobs import Job  # noqa: E402
from ifsteer.models import DEFAULT_MODEL, cache_dir, load_model  # noqa: E402
from ifsteer.prompts import BASE_QUERIES  # noqa: E402
from ifsteer.steering import Steering  # noqa: E402
from ifsteer.vectors import default_layer, extract_instruction  # noqa: E402


async def _burst(
    engine: VLLMEngine, prompts: list[str], steering: tuple[Steering, ...], tokens: int
) -> tuple[int, float]:
    jobs = [
        Job(
            render_chat(engine.tokenizer, [("user", p)]).ids,
            steering,
            Sampling(max_new_tokens=tokens),
        )
        for p in prompts
    ]
    start = time.perf_counter()
    done = await asyncio.gather(*(engine.generate(job) for job in jobs))
    return sum(c.completion_tokens for c in done), time.perf_counter() - start


async def _vllm(
    engine: VLLMEngine,
    steering: tuple[Steering, ...],
    batches: list[int],
    tokens: int,
    repeats: int,
) -> dict[str, float]:
    results: dict[str, float] = {}
    for batch in batches:
        prompts = list(BASE_QUERIES[:batch])
        settings = {"unsteered": (), "steered": steering}
        for s in settings.values():  # warm-up: both settings' prompts now in the prefix cache
            await _burst(engine, prompts, s, 4)
        totals = {name: [0, 0.0] for name in settings}
        for _ in range(repeats):
            for name, s in settings.items():
                n, seconds = await _burst(engine, prompts, s, tokens)
                totals[name][0] += n
                totals[name][1] += seconds
        for name, (n, seconds) in totals.items():
            results[f"vllm_{name}_b{batch}"] = n / seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    lm = load_model(DEFAULT_MODEL, "float32")
    layer = default_layer(lm.n_layers)
    vector = extract_instruction(
        lm, get_instruction("change_case:english_lowercase"), [layer], n_pairs=16
    )[layer]
    steering = (Steering(vector),)
    source = os.environ.get("IFSTEER_VLLM_MODEL") or str(cache_dir(DEFAULT_MODEL))
    engine = VLLMEngine(
        source,
        model_id=lm.model_id,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 30,
        max_num_seqs=32,
    )

    async def run_vllm() -> dict[str, float]:
        await engine.start()
        try:
            return await _vllm(engine, steering, [8, 32], args.tokens, args.repeats)
        finally:
            await engine.close()

    results: dict[str, Any] = asyncio.run(run_vllm())
    prompts = list(BASE_QUERIES[:32])
    generate(lm, prompts[:4], steering=steering, sampling=Sampling(max_new_tokens=4))  # warm-up
    n, seconds = 0, 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = generate(
            lm,
            prompts,
            steering=steering,
            batch_size=32,
            sampling=Sampling(max_new_tokens=args.tokens),
        )
        seconds += time.perf_counter() - start
        n += sum(c.completion_tokens for c in out)
    results["hf_steered_b32"] = n / seconds
    for batch in (8, 32):
        steered, plain = results[f"vllm_steered_b{batch}"], results[f"vllm_unsteered_b{batch}"]
        results[f"steered_over_unsteered_b{batch}"] = steered / plain
        print(
            f"vLLM batch {batch:2d}: unsteered {plain:6.1f} tok/s, steered {steered:6.1f} "
            f"tok/s, ratio {steered / plain:.3f} (goal >= 0.95)"
        )
    results["vllm_over_hf_b32"] = results["vllm_steered_b32"] / results["hf_steered_b32"]
    print(
        f"batch 32, steered: vLLM {results['vllm_steered_b32']:6.1f} tok/s, HF backend "
        f"{results['hf_steered_b32']:6.1f} tok/s, ratio {results['vllm_over_hf_b32']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
