"""The batcher on the embedded model: every row as it is alone, while rows join and leave."""

from __future__ import annotations

import pytest

from ifsteer.batcher import Batcher
from ifsteer.instructions import get_instruction
from ifsteer.jobs import Job, Sampling
from ifsteer.steering import Steering
from ifsteer.vectors import extract_instruction
from tests.integration.conftest import requires_smollm2
from tests.unit.test_batcher import alone

pytestmark = pytest.mark.integration

PROMPTS = [
    "Name a colour.",
    "Describe the city of Paris in two sentences.",
    "What is the capital of France?",
    "Reply with one word: yes or no. Is water wet?",
    "Say hello.",
]
LENGTHS = [12, 16, 12, 8, 10]


@requires_smollm2
def test_batcher_rows_equal_hf_generate_alone(smollm2):
    vector = extract_instruction(
        smollm2, get_instruction("change_case:english_lowercase"), [10], n_pairs=4
    )[10]
    rows = [
        [Steering(vector, weight=3.0)],
        [],
        [Steering(vector, mode="additive", weight=4.0, positions="generated")],
        [],
        [Steering(vector, weight=3.0)],
    ]
    batcher = Batcher(smollm2, batch_size=2)
    ids = [
        batcher.submit(Job(smollm2.render(p).ids, steering=r, sampling=Sampling(max_new_tokens=n)))
        for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=True)
    ]
    done = batcher.run()
    expected = [
        smollm2.tokenizer.decode(alone(smollm2, p, r, n), skip_special_tokens=True)
        for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=True)
    ]
    assert [done[i].text for i in ids] == expected
    assert any(done[i].finish_reason == "stop" for i in ids), "no row reached its end of turn"
