"""Throughput and latency of the server under 32 concurrent requests: batched vs one at a time.

Runs the real server (uvicorn, loopback port) around the embedded model twice: with continuous
batching (`--max-batch-size 32`) and with `max_batch_size=1`, which serves the same burst one
request at a time. Half the requests are steered (an instruction vector extracted here, at
the default layer), half are not. Prints completion tokens per second, the ratio, p50/p95
latency, and whether both runs gave identical texts (greedy decoding).

    PYTHONPATH=src python benchmarks/server_load.py            # ~3 minutes on 2 CPU cores
    PYTHONPATH=src python benchmarks/server_load.py --json out.json

Not a test: numbers depend on the machine; the goal on 2 cores is a ratio of at least 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from ifsteer.instructions import get_instruction  # noqa: E402
from ifsteer.models import DEFAULT_MODEL, load_model  # noqa: E402
from ifsteer.prompts import BASE_QUERIES  # noqa: E402
from ifsteer.server import create_app  # noqa: E402
from ifsteer.vectors import default_layer, extract_instruction  # noqa: E402


def _start(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def _requests(model: str, n: int, max_tokens: int) -> list[dict[str, Any]]:
    bodies = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": BASE_QUERIES[i]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if i % 2 == 0:
            body["steering"] = [{"vector": "lowercase"}]
        bodies.append(body)
    return bodies


async def _burst(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[float], list[dict]]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def one(body: dict[str, Any]) -> tuple[float, dict]:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return time.perf_counter() - started, response.json()

        started = time.perf_counter()
        results = await asyncio.gather(*(one(body) for body in bodies))
        wall = time.perf_counter() - started
    return wall, [latency for latency, _ in results], [body for _, body in results]


def _burst_sync(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[float], list[dict]]:
    return asyncio.run(_burst(url, bodies))


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    lm = load_model(args.model, args.dtype)
    layer = default_layer(lm.n_layers)
    vector = extract_instruction(
        lm, get_instruction("change_case:english_lowercase"), [layer], n_pairs=16
    )[layer]
    bodies = _requests(lm.model_id, args.requests, args.max_tokens)
    report: dict[str, Any] = {
        "model": lm.model_id,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    texts = {}
    for name, batch_size in (("batched", args.requests), ("one_at_a_time", 1)):
        app = create_app(lm, {"lowercase": vector}, max_batch_size=batch_size)
        server, thread, url = _start(app)
        try:
            # Clients run in their own process, as they would in production: parsing their
            # responses must not take the server's interpreter lock.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(_burst_sync, url, bodies[:1]).result()  # warm-up
                wall, latencies, responses = pool.submit(_burst_sync, url, bodies).result()
            health = httpx.get(f"{url}/health").json()["engine"]
        finally:
            server.should_exit = True
            thread.join()
        tokens = sum(r["usage"]["completion_tokens"] for r in responses)
        texts[name] = [r["choices"][0]["message"]["content"] for r in responses]
        report[name] = {
            "wall_s": round(wall, 2),
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(bodies) / wall, 3),
            "p50_latency_s": round(_percentile(latencies, 50), 2),
            "p95_latency_s": round(_percentile(latencies, 95), 2),
            "largest_batch": health["largest_batch"],
        }
        print(f"{name:>14}: {report[name]}", flush=True)
    report["throughput_ratio"] = round(
        report["batched"]["tokens_per_s"] / report["one_at_a_time"]["tokens_per_s"], 2
    )
    report["identical_texts"] = sum(
        a == b for a, b in zip(texts["batched"], texts["one_at_a_time"], strict=True)
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", help="Also write the report to this file.")
    args = parser.parse_args()
    report = run(args)
    print(
        f"\nthroughput: {report['batched']['tokens_per_s']} vs "
        f"{report['one_at_a_time']['tokens_per_s']} tokens/s -> "
        f"{report['throughput_ratio']}x (goal >= 3x); identical texts "
        f"{report['identical_texts']}/{args.requests}"
    )
    for name in ("batched", "one_at_a_time"):
        r = report[name]
        print(f"{name:>14}: p50 {r['p50_latency_s']}s, p95 {r['p95_latency_s']}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
