"""Shipped calibrated vectors on the embedded model: they steer with no extraction.

The instructions are those whose validation search raised the pass count most on this 135M
model (docs/shipped.md): a title in <<double angular brackets>>, German and fewer than three
sentences. The prompts are their own validation prompts, without the instruction; the answers
are cut short where the check is settled by the first words (title, language), and long
enough for an unsteered answer to run past three sentences (length).
"""

from __future__ import annotations

import pytest

from ifsteer.checks import check
from ifsteer.generation import Sampling, generate
from ifsteer.shipped import load_shipped
from ifsteer.validation import validation_prompts
from tests.integration.conftest import requires_smollm2

pytestmark = pytest.mark.integration

RAISED = {
    "detectable_format:title": 40,
    "language:response_language:de": 48,
    "length:extremely_concise": 128,
}


@requires_smollm2
@pytest.mark.parametrize("instruction_id", sorted(RAISED))
def test_a_shipped_vector_raises_its_pass_count_without_the_instruction(smollm2, instruction_id):
    shipped = load_shipped(instruction_id)
    assert shipped.recommended
    prompts = validation_prompts(instruction_id, 10)
    queries = [p.query for p in prompts]
    per_row = [[]] * len(queries) + [shipped.steerings()] * len(queries)
    sampling = Sampling(max_new_tokens=RAISED[instruction_id])
    out = generate(smollm2, queries * 2, per_row=per_row, sampling=sampling, batch_size=20)
    passed = [
        check(p.check_id, p.kwargs, p.query, c.text).loose
        for p, c in zip(prompts * 2, out, strict=True)
    ]
    unsteered, steered = sum(passed[: len(queries)]), sum(passed[len(queries) :])
    assert steered > unsteered, [c.text for c in out]
