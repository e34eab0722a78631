"""Rule targets pass IFEval's own check, on many answers shaped like the model's own."""

from __future__ import annotations

import random

import pytest

from ifsteer.checks import check
from ifsteer.training.rules import has_rule, rewrite, sentences
from ifsteer.validation import FORMAT_KWARGS, check_for

OPENERS = [
    "Cleaning a cast iron pan properly is crucial to prevent damage, and it keeps the seasoning.",
    "The ocean is salty because rivers carry dissolved minerals into it.",
    "Here's a step-by-step guide to help you get started:",
    "Paris is the capital of France, known for its art, food and history.",
    "A refrigerator keeps food cold by moving heat from the inside to the outside.",
    "Sure! Let me explain how this works.",
    "When adopting a cat, there are several things to consider.",
]
ITEMS = [
    "**Clean the pan**: Use hot water, a stiff brush and no soap.",
    "**Dry it**: Heat it on the stove until the water is gone.",
    "Oil it lightly, then wipe off the excess with a paper towel.",
    "- Keep it somewhere dry, away from steam.",
    "Cats need regular visits to the vet, fresh water and a clean litter box.",
    "The city has many museums; the Louvre is the largest of them.",
    "Evaporation leaves the salt behind, so the concentration rises over time.",
    "It's important to remember that every situation is different.",
    "Is this the right choice for you? Only you can decide.",
    'Some people call it "the city of light" for a reason.',
]
CUTS = ["", " The next step is to", " 4. **Store", " However, some experts say that"]


def answers(n: int, seed: int = 0) -> list[tuple[str, bool]]:
    """Answers in the shapes the model writes: prose, numbered markdown lists, bullets, cut
    off mid-sentence when the token budget ran out."""
    rng = random.Random(seed)
    made = []
    for _ in range(n):
        parts = [rng.choice(OPENERS)]
        items = rng.sample(ITEMS, rng.randint(0, 6))
        listed = rng.random() < 0.5
        for i, item in enumerate(items, 1):
            parts.append(f"\n{i}. {item}" if listed else f" {item}")
        cut = rng.choice(CUTS)
        made.append(("".join(parts) + cut, not cut))
    return made


RULE_IDS = sorted(i for i in [*FORMAT_KWARGS, "length:extremely_concise", "length:concise"])


@pytest.mark.parametrize("instruction_id", RULE_IDS)
def test_every_rule_target_passes_ifeval_check(instruction_id):
    assert has_rule(instruction_id)
    check_id, kwargs = check_for(instruction_id)
    written = 0
    for text, finished in answers(120):
        target = rewrite(instruction_id, text, finished)
        if target is None:
            continue
        written += 1
        verdict = check(check_id, kwargs, "Describe it.", target.text)
        assert verdict.strict, (instruction_id, text, target.text)
    assert written >= 80  # a rule that gives up on most answers teaches nothing


def test_no_rule_can_lengthen_an_answer_or_write_a_language():
    assert not has_rule("length:verbose")
    assert not has_rule("language:response_language:de")


def test_structures_close_and_in_place_rules_keep_the_answers_end():
    cut = "The ocean is salty. Rivers carry minerals. Evaporation leaves them behind. It"
    assert rewrite("startend:quotation", cut, False).finished  # a quote must be closed
    lowered = rewrite("change_case:english_lowercase", cut, False)
    assert lowered.text.endswith(" it") and not lowered.finished  # cut stays cut


def test_a_cut_off_last_sentence_is_dropped_and_markdown_is_flattened():
    text = "1. **Clean the pan**: Use water.\n2. Dry it. Then the"
    assert sentences(text, finished=False) == ["Clean the pan: Use water.", "Dry it."]
    assert sentences("Short answer", finished=True) == ["Short answer"]


def test_too_few_sentences_for_the_structure_give_no_target():
    assert rewrite("detectable_format:number_bullet_lists", "Only one sentence.", True) is None
