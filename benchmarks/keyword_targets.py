"""Keyword vectors trained on answers cut right after the word, against the shipped ones.

A shipped keyword vector learned the model's whole answers with "include the word", in which
the word is a token or two, and without the instruction it names the word hardly more often
than the paper's vector (docs/shipped.md). This trains, for `--words` words of the seeded draw
`keyword_points.py` makes, a vector on the same distilled answers cut right after the word's
first appearance, with the class's budget (layer 18, 40 steps, lr 0.1, seed 0). Each word is
then asked `--per-word` of our validation queries (not IFEval's, nor the extraction queries
the vectors were trained on), steered by the cut vector at several sizes, beside no steering,
the paper's kept point and the shipped trained vector; scored as calibration scores, and a
point newly breaking more than `compete.MAX_BROKEN` of the answers is not eligible. Vectors
and answers go to `--log` and are read back on a rerun.

Run: python benchmarks/keyword_targets.py [--words 10] [--per-word 4] [--with-instruction]
[--log DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import torch
from keyword_points import result_lines, trained_words

from ifsteer import load_model
from ifsteer.calibration.point import Point
from ifsteer.calibration.scoring import Answering, SearchRunner, search_log
from ifsteer.generation import Sampling
from ifsteer.instructions import keyword_instruction
from ifsteer.models import LoadedModel
from ifsteer.paths import build_home
from ifsteer.training import Example, TrainConfig, train_vectors
from ifsteer.training.compete import training_examples
from ifsteer.validation import ValidationPrompt, validation_queries
from ifsteer.vectors import SteeringVector, load_vectors, save_vectors

LAYER, PAPER = 18, 26
CLASS_BUDGET = TrainConfig(layers=(LAYER,), steps=40, lr=0.1, max_target_tokens=128, seed=0)
SHIPPED_POINTS = (Point(), Point((PAPER,), "additive", 1.0), Point((LAYER,), "additive", 1.0))
CUT_POINTS = (Point(), *(Point((LAYER,), "additive", s) for s in (0.75, 1.0, 1.25, 1.5)))


def cut_at_word(example: Example, word: str) -> Example | None:
    """The target up to the end of the word's first appearance, the turn left open."""
    found = re.search(rf"\b{re.escape(word)}\b", example.target, flags=re.IGNORECASE)
    if found is None:
        return None
    return replace(example, target=example.target[: found.end()], finished=False)


def cut_vector(lm: LoadedModel, word: str, log: Path) -> SteeringVector:
    """The word's vector trained on cut targets, from `log` where an earlier run saved it."""
    path = log / f"{word}.cut.L{LAYER}.safetensors"
    if not path.is_file():
        instruction = keyword_instruction(word)
        work = build_home(lm.model_id)  # the build's distilled answers
        examples = [cut_at_word(e, word) for e in training_examples(lm, instruction, work)]
        trained = train_vectors(lm, instruction, [e for e in examples if e], CLASS_BUDGET)
        save_vectors(path, list(trained.vectors.values()))
    return load_vectors(path)[0][LAYER]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", type=int, default=10)
    parser.add_argument("--per-word", type=int, default=4)
    parser.add_argument("--with-instruction", action="store_true")
    parser.add_argument("--log", type=Path, default=Path("keyword_targets"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.log.mkdir(parents=True, exist_ok=True)
    lm = load_model()
    queries = validation_queries()
    prompts, shipped, cut = [], [], []
    for i, (word, trained, paper) in enumerate(trained_words(args.words, seed=0)):
        vector = cut_vector(lm, word, args.log)
        instruction = keyword_instruction(word).phrasings[0]
        for j in range(args.per_word):
            query = queries[(i * args.per_word + j) % len(queries)]
            keywords = {"keywords": [word]}
            prompts.append(ValidationPrompt(query, instruction, "keywords:existence", keywords))
            shipped.append({LAYER: trained, PAPER: paper})
            cut.append({LAYER: vector})
    setting = "instr" if args.with_instruction else "noinstr"
    sampling = Sampling(max_new_tokens=128)
    print(f"{args.words} words × {args.per_word} queries, {setting}, 128 tokens, greedy")
    print(f"{'vectors':8} {'point':24} {'accuracy':>8} {'score':>6} {'newly broken':>12}  eligible")
    for name, vectors, points in (("shipped", shipped, SHIPPED_POINTS), ("cut", cut, CUT_POINTS)):
        log = search_log(args.log / f"{name}.{setting}.{args.words}w.jsonl")
        runner = SearchRunner(
            lm, None, prompts, vectors, log, sampling, args.with_instruction, Answering()
        )
        runner.run(points)
        print("\n".join(f"{name:8} {line}" for line in result_lines(runner, points)))


if __name__ == "__main__":
    main()
