"""The core on the embedded models: extraction, steering and the CLI demo, short generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ifsteer.checks import check
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.steering import Steering
from ifsteer.vectors import extract_instruction
from tests.integration.conftest import requires_gemma, requires_smollm2

pytestmark = pytest.mark.integration

LOWER = "change_case:english_lowercase"
PROMPTS = [
    "Describe the city of Paris.",
    "What are the benefits of regular exercise?",
    "Explain how a rainbow forms.",
    "Tell me about the history of the bicycle.",
    "Give three tips for better sleep.",
    "What is machine learning?",
    "Describe a sunset over the ocean.",
    "Why do cats purr?",
    "Suggest a name for a coffee shop and explain it.",
    "How does a refrigerator keep food cold?",
]


@requires_smollm2
def test_lowercase_vector_raises_lowercase_answers_without_the_instruction(smollm2):
    """The paper's "steer" setting: no instruction in the prompt, the vector alone.

    Layer 10, projection weight 3 is what a small grid on these prompts found for this 135M
    model (see README, "What we measured"); the effect is small and so is the bar.
    """
    vector = extract_instruction(smollm2, get_instruction(LOWER), [10], n_pairs=48)[10]
    sampling = Sampling(max_new_tokens=24)
    rows = [[]] * len(PROMPTS) + [[Steering(vector, weight=3.0)]] * len(PROMPTS)
    out = generate(smollm2, PROMPTS * 2, per_row=rows, sampling=sampling, batch_size=10)
    passed = [check(LOWER, {}, p, c.text).loose for p, c in zip(PROMPTS * 2, out, strict=True)]
    unsteered, steered = sum(passed[:10]), sum(passed[10:])
    assert steered > unsteered, [c.text for c in out]


@requires_smollm2
def test_cli_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    vector = tmp_path / "lowercase.safetensors"
    ifsteer = [sys.executable, "-m", "ifsteer.cli"]
    subprocess.run(
        [
            *ifsteer,
            "extract",
            "--instruction",
            "Write your whole answer in lowercase letters.",
            "--instruction-id",
            LOWER,
            "--n-pairs",
            "8",
            "--layers",
            "10",
            "--layer",
            "10",
            "--out",
            str(vector),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    done = subprocess.run(
        [
            *ifsteer,
            "generate",
            "--prompt",
            "Describe the city of Paris.",
            "--vector",
            f"{vector}:projection:3",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "Describe the city of Paris."
    assert row["unsteered"] and row["steered"] and row["unsteered"] != row["steered"]


@requires_gemma
def test_base_model_uses_plain_prompts_and_steers():
    from ifsteer.models import load_model

    lm = load_model("gemma-3-270m")
    assert not lm.is_chat and lm.n_layers == 18 and lm.hidden_size == 640
    assert lm.format_prompt("Why is the sky blue?") == "Q: Why is the sky blue?\nA:"
    vector = extract_instruction(lm, get_instruction(LOWER), [6], n_pairs=8)[6]
    assert vector.model_id == "gemma-3-270m" and vector.norm > 0
    sampling = Sampling(max_new_tokens=6)
    plain, steered = generate(
        lm,
        ["Why is the sky blue?"] * 2,
        per_row=[[], [Steering(vector, weight=4.0)]],
        sampling=sampling,
    )
    assert plain.completion_tokens > 0 and steered.text != plain.text


@requires_smollm2
def test_a_short_training_of_the_lowercase_vector_raises_lowercase_answers(smollm2):
    """Trained on the model's own answers to our extraction queries, lowercased (rule
    targets), and applied to prompts it was not trained on, without the instruction."""
    from ifsteer.training import TrainConfig, train_vectors
    from ifsteer.training.data import rule_examples, unsteered_answers
    from ifsteer.validation import extraction_queries

    answers = unsteered_answers(smollm2, extraction_queries()[:32], 48)
    examples = rule_examples(LOWER, answers)
    config = TrainConfig(layers=(18,), steps=30, lr=0.1, max_target_tokens=32, eval_every=10)
    vector = train_vectors(smollm2, get_instruction(LOWER), examples, config).vectors[18]
    assert not set(PROMPTS) & {a.query for a in answers}
    rows = [[]] * len(PROMPTS) + [[Steering(vector)]] * len(PROMPTS)
    out = generate(smollm2, PROMPTS * 2, per_row=rows, sampling=Sampling(max_new_tokens=24))
    passed = [check(LOWER, {}, p, c.text).loose for p, c in zip(PROMPTS * 2, out, strict=True)]
    unsteered, steered = sum(passed[:10]), sum(passed[10:])
    assert steered >= unsteered + 2, [c.text for c in out[10:]]
