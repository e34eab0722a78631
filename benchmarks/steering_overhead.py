"""What steering costs, measured side by side in one run on the embedded model.

Prints ratios, not absolute times (absolute times are noise on shared CPUs):
1. steered / unsteered decode tokens per second, at batch 1 and batch 8 (goal >= 0.97);
2. our KV-cached steered generation vs a reference-style loop that re-runs the whole sequence
   at every step without a cache (as the paper's code does), at 128 and 256 new tokens
   (goal >= 20x at 256);
3. early-exit extraction (forward stops after the requested layer) vs a full forward.

Run: python benchmarks/steering_overhead.py [--model NAME] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ifsteer.generation import Sampling, generate
from ifsteer.models import load_model
from ifsteer.prompts import BASE_QUERIES, PromptPair
from ifsteer.steering import Steering, steer
from ifsteer.vectors import default_layer, extract_vectors, last_token_activations

PROMPT = "Describe the city of Paris."


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_rates(lm, steering, batch: int, tokens: int, repeats: int) -> tuple[float, float]:
    """Median tokens/s unsteered and steered, runs interleaved so load drifts hit both alike.

    Every run generates exactly `tokens` tokens per row (end-of-turn ignored), so both sides do
    the same work; the short prefill is included in both.
    """
    prompts = [PROMPT] * batch
    sampling = Sampling(max_new_tokens=tokens, ignore_eos=True)
    times: dict[str, list[float]] = {"plain": [], "steered": []}
    for i in range(repeats):
        order = [("plain", []), ("steered", steering)]
        for name, steer_with in order if i % 2 == 0 else order[::-1]:
            times[name].append(
                timed(
                    lambda s=steer_with: generate(
                        lm, prompts, steering=s, sampling=sampling, batch_size=batch
                    )
                )
            )
    rate = lambda name: batch * tokens / statistics.median(times[name])  # noqa: E731
    return rate("plain"), rate("steered")


@torch.no_grad()
def reference_loop(lm, steering, n_tokens: int) -> list[int]:
    """The paper's way: no KV cache, batch 1, the whole sequence re-run for every new token."""
    ids = lm.encode([PROMPT]).input_ids
    with steer(lm, steering):
        for _ in range(n_tokens):
            logits = lm.model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=-1)
    return ids[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    layer = default_layer(lm.n_layers)
    pairs = [PromptPair(f"{q} Answer in lowercase.", q) for q in BASE_QUERIES[:16]]
    vector = extract_vectors(
        lm, pairs, [layer], instruction="Answer in lowercase.", instruction_id="bench"
    )[layer]
    steering = [Steering(vector)]
    print(f"model {lm.model_id}, layer {layer}, {torch.get_num_threads()} threads")

    for batch in (1, 8):
        plain, steered = decode_rates(lm, steering, batch, 48, args.repeats)
        print(
            f"decode batch {batch}: unsteered {plain:.1f} tok/s, steered {steered:.1f} tok/s, "
            f"ratio steered/unsteered {steered / plain:.3f} (goal >= 0.97)"
        )
    for n in (128, 256):
        sampling = Sampling(max_new_tokens=n, ignore_eos=True)
        ours = timed(lambda s=sampling: generate(lm, [PROMPT], steering=steering, sampling=s))
        ref = timed(lambda n=n: reference_loop(lm, steering, n))
        print(
            f"{n} new tokens: reference loop {ref:.1f} s, ours {ours:.1f} s, "
            f"speed-up {ref / ours:.1f}x (goal >= 20x at 256)"
        )

    prompts = list(BASE_QUERIES[:32])
    early = statistics.median(
        timed(lambda: last_token_activations(lm, prompts, [layer])) for _ in range(args.repeats)
    )
    full = statistics.median(timed(lambda: full_forward(lm, prompts)) for _ in range(args.repeats))
    print(
        f"extraction of 32 prompts at layer {layer}/{lm.n_layers}: early exit {early:.2f} s, "
        f"full forward with output_hidden_states {full:.2f} s, speed-up {full / early:.2f}x"
    )


@torch.no_grad()
def full_forward(lm, prompts, batch_size: int = 16) -> None:
    """What extraction costs without early exit: every layer and the LM head, for all rows."""
    for start in range(0, len(prompts), batch_size):
        lm.model(**lm.encode(prompts[start : start + batch_size]), output_hidden_states=True)


if __name__ == "__main__":
    main()
