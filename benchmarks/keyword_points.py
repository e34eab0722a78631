"""The keyword class's points side by side, on more words than its competition had.

The class competed on ten words (docs/shipped.md). Held out, its trained vectors helped with
the instruction and trailed the paper's by two rows of 86 without it, so this asks, on a
larger validation, whether another way of applying the same shipped vectors would steer
better without the instruction: the trained vector (layer 18) at its trained size and larger,
the paper's kept point (layer 26, 1 × ‖u‖), and both at once.

Each of `--words` words of IFEval's inclusion rows (a seeded draw; every one ships a trained
vector) is paired with one of our validation queries (not IFEval's, nor the extraction queries
the vectors were trained or extracted on), in the order they come, and every prompt is
steered by its own word's vectors. Scored as calibration scores (IFEval's loose check, and
the answer fluent by `quality.SEARCH_FLUENCY`); a point newly breaking more than
`compete.MAX_BROKEN` of the answers is not eligible. Answers go to `--log` and are read back
on a rerun.

Run: python benchmarks/keyword_points.py [--words 41] [--tokens 128] [--with-instruction]
[--log DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ifsteer import load_model
from ifsteer.calibration.point import Point
from ifsteer.calibration.scoring import Answering, SearchRunner, search_log
from ifsteer.datasets import INCLUSION_WORDS, keyword_words
from ifsteer.generation import Sampling
from ifsteer.instructions import keyword_instruction
from ifsteer.quality import SEARCH_FLUENCY
from ifsteer.shipped import load_shipped
from ifsteer.training.compete import MAX_BROKEN
from ifsteer.training.train import METHOD
from ifsteer.validation import ValidationPrompt, validation_queries
from ifsteer.vectors import SteeringVector


def points(trained: int, paper: int) -> tuple[Point, ...]:
    """The points compared, at the layers the shipped files hold (trained, paper's kept)."""
    return (
        Point(),
        Point((paper,), "additive", 1.0),
        *(Point((trained,), "additive", scale) for scale in (1.0, 1.25, 1.5, 2.0)),
        Point((trained, paper), "additive", 2.0),  # each vector at 1 × ‖u‖
    )


def trained_words(words: int, seed: int) -> list[tuple[str, SteeringVector, SteeringVector]]:
    """(word, trained vector, the paper's kept vector) for a seeded draw of `words` of the
    inclusion rows' words: the build trained those first, so the draw never changes."""
    drawn = []
    for word in keyword_words([INCLUSION_WORDS]):
        shipped = load_shipped(keyword_instruction(word).id)
        if shipped.method != METHOD or shipped.exclusion is None:
            raise SystemExit(f"{word}: its shipped file holds no trained vector yet")
        drawn.append((word, shipped.vectors[0], shipped.exclusion.vectors[0]))
    random.Random(seed).shuffle(drawn)
    if len({(trained.layer, paper.layer) for _, trained, paper in drawn}) > 1:
        raise SystemExit("the words' files hold their vectors at different layers")
    return drawn[:words]


def prompts_and_vectors(
    drawn: list[tuple[str, SteeringVector, SteeringVector]],
) -> tuple[list[ValidationPrompt], list[Mapping[int, SteeringVector]]]:
    queries = validation_queries()
    prompts, vectors = [], []
    for i, (word, trained, paper) in enumerate(drawn):
        instruction = keyword_instruction(word).phrasings[0]
        query = queries[i % len(queries)]
        prompts.append(
            ValidationPrompt(query, instruction, "keywords:existence", {"keywords": [word]})
        )
        vectors.append({trained.layer: trained, paper.layer: paper})
    return prompts, vectors


def result_lines(runner: SearchRunner, points: Sequence[Point]) -> list[str]:
    """Each point's accuracy, score and newly broken share, and whether it is eligible."""
    lines = []
    for result in runner.results(points, SEARCH_FLUENCY):
        eligible = "yes" if result.newly_broken <= MAX_BROKEN else "no"
        lines.append(
            f"{result.point.key:24} {result.accuracy:8.3f} {result.score:6.3f}"
            f" {result.newly_broken:12.3f}  {eligible}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", type=int, default=len(validation_queries()))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--with-instruction", action="store_true")
    parser.add_argument("--log", type=Path, default=Path("keyword_points"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    drawn = trained_words(args.words, args.seed)
    prompts, vectors = prompts_and_vectors(drawn)
    compared = points(drawn[0][1].layer, drawn[0][2].layer)
    setting = "instruction" if args.with_instruction else "no_instruction"
    args.log.mkdir(parents=True, exist_ok=True)
    name = f"{setting}.{args.words}w.{args.tokens}t.seed{args.seed}.jsonl"
    log = search_log(args.log / name)
    sampling = Sampling(max_new_tokens=args.tokens)
    runner = SearchRunner(
        load_model(), None, prompts, vectors, log, sampling, args.with_instruction, Answering()
    )
    runner.run(compared)
    print(f"{len(prompts)} words, {setting}, {args.tokens} tokens, greedy")
    print(f"{'point':24} {'accuracy':>8} {'score':>6} {'newly broken':>12}  eligible")
    print("\n".join(result_lines(runner, compared)))


if __name__ == "__main__":
    main()
