from __future__ import annotations

import pytest

from ifsteer.errors import InvalidSteering
from ifsteer.generation import Sampling, generate
from ifsteer.steering import Steering
from tests.unit.test_vectors import make_vector

PROMPTS = [
    "Describe a forest at dawn.",
    "Plan a picnic for a rainy afternoon with friends and family.",
    "Why is the sky blue?",
    "Write a note to a neighbour.",
]
SHORT = Sampling(max_new_tokens=8)


def test_per_row_batch_equals_one_by_one(tiny_lm):
    a = make_vector(layer=1, mode="additive")
    b = make_vector(layer=2, target=3.0)
    rows = [[Steering(a, weight=6.0)], [], [Steering(b)], [Steering(a, weight=-4.0), Steering(b)]]
    batched = generate(tiny_lm, PROMPTS, per_row=rows, sampling=SHORT, batch_size=4)
    alone = [
        generate(tiny_lm, [p], steering=r, sampling=SHORT)[0]
        for p, r in zip(PROMPTS, rows, strict=True)
    ]
    assert [c.text for c in batched] == [c.text for c in alone]
    unsteered = generate(tiny_lm, PROMPTS, sampling=SHORT)
    assert batched[1].text == unsteered[1].text
    assert batched[0].text != unsteered[0].text  # the steering did something


def test_order_is_kept_whatever_the_batch_size(tiny_lm):
    one = generate(tiny_lm, PROMPTS, sampling=SHORT, batch_size=1)
    three = generate(tiny_lm, PROMPTS, sampling=SHORT, batch_size=3)
    assert [c.text for c in one] == [c.text for c in three]


def test_streamed_text_adds_up_to_the_completion(tiny_lm):
    pieces: dict[int, list[str]] = {}
    out = generate(
        tiny_lm,
        PROMPTS[:3],
        sampling=SHORT,
        batch_size=2,
        on_text=lambda row, text: pieces.setdefault(row, []).append(text),
    )
    assert {row: "".join(p) for row, p in pieces.items()} == {
        i: c.text for i, c in enumerate(out) if c.text
    }


def test_usage_and_finish_reason(tiny_lm):
    out = generate(tiny_lm, PROMPTS[:1], sampling=SHORT)[0]
    assert out.prompt_tokens == len(tiny_lm.encode(PROMPTS[:1]).input_ids[0])
    assert out.completion_tokens <= 8
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "length":
        assert out.completion_tokens == 8


def test_seeded_sampling_is_reproducible(tiny_lm):
    s = Sampling(max_new_tokens=8, temperature=1.0, seed=3)
    assert (
        generate(tiny_lm, PROMPTS[:2], sampling=s)[0].text
        == generate(tiny_lm, PROMPTS[:2], sampling=s)[0].text
    )


def test_per_row_length_must_match(tiny_lm):
    with pytest.raises(InvalidSteering, match="per_row has 1 entries for 2 prompts"):
        generate(tiny_lm, PROMPTS[:2], per_row=[[]])


def test_gpt2_generates_under_steering(tiny_gpt2):
    v = make_vector(layer=1, model_id="tiny-gpt2", mode="additive")
    rows = [[Steering(v, weight=5.0)], []]
    batched = generate(tiny_gpt2, PROMPTS[:2], per_row=rows, sampling=SHORT)
    alone = [
        generate(tiny_gpt2, [p], steering=r, sampling=SHORT)[0]
        for p, r in zip(PROMPTS[:2], rows, strict=True)
    ]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_seeded_sampling_gives_repeated_prompts_their_own_draws(tiny_lm):
    s = Sampling(max_new_tokens=10, temperature=1.0, seed=3)
    twice = generate(tiny_lm, [PROMPTS[0]] * 2, sampling=s)
    assert twice[0].text != twice[1].text
    assert [c.text for c in generate(tiny_lm, [PROMPTS[0]] * 2, sampling=s)] == [
        c.text for c in twice
    ]


def test_a_decided_row_stops_early(tiny_lm):
    sampling = Sampling(max_new_tokens=16, ignore_eos=True)
    out = generate(tiny_lm, PROMPTS[:2], sampling=sampling, decided=[lambda t: len(t) > 3, None])
    assert out[0].finish_reason == "decided" and out[1].finish_reason == "length"
    with pytest.raises(InvalidSteering, match="decided has 1 entries for 2 prompts"):
        generate(tiny_lm, PROMPTS[:2], decided=[None])
