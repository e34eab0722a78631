"""The keyword class against trained vectors on a tiny random model: one competition for the
class, recorded in every word file; a win ships each word's own trained vector, resumably."""

from __future__ import annotations

import sys

import pytest
import torch

from ifsteer.calibration import Point, steerings_for
from ifsteer.calibration.grid import PointResult
from ifsteer.generation import Sampling
from ifsteer.instructions import keyword_instruction
from ifsteer.shipped import file_name, read_calibrated, write_calibrated
from ifsteer.shipped.points import GroupPoint, Points
from ifsteer.training import Example, TrainConfig
from ifsteer.training.compete import Trial
from ifsteer.training.keyword_class import compete_class, ship_class
from ifsteer.validation import ValidationPrompt, check_for
from ifsteer.vectors import extract_instruction, load_vectors
from tests.conftest import make_tiny, tiny_llama_config

CLASS = "keywords:existence"
WORDS = ["ocean", "river", "piano"]
CONFIG = TrainConfig(layers=(1,), steps=4, batch_size=4, lr=0.1, eval_every=2, held_out=0.25)
RUN = {"sampling": Sampling(max_new_tokens=2), "batch_size": 4}


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny(tiny_llama_config(), tiny_tokenizer, model_id="tiny-keywords")


@pytest.fixture
def shipped(lm, tmp_path):
    """Every word's file at the class's paper point (layer 2, additive), recommended."""
    out = tmp_path / "out"
    point = Point((2,), "additive", 1.0)
    files = []
    for word in WORDS:
        instruction = keyword_instruction(word)
        vectors = extract_instruction(lm, instruction, [2], n_pairs=2)
        record = {"status": "searched", "recommended": True, "point": point.key,
                  "layers": [2], "mode": "additive", "scale": 1.0,
                  "validation": {"score": 0.2, "accuracy": 0.3}}  # fmt: skip
        path = out / file_name(instruction.id)
        write_calibrated(path, steerings_for(point, vectors), record)
        files.append(path)
    return out, files


def picked() -> list[tuple[str, ValidationPrompt]]:
    """The first two words validate the class, one prompt each."""
    return [
        (w, ValidationPrompt(f"Tell me about the {w}.", f"Include the word {w}.", *check_for(i)))
        for w, i in ((w, keyword_instruction(w).id) for w in WORDS[:2])
    ]


def examples(n: int = 8, word: str = "") -> list[Example]:
    """Distilled answers; each word's own, so each word trains its own vector."""
    return [Example(f"Question {i}?", f"a plain answer {word}.", True, "distill") for i in range(n)]


@pytest.fixture
def trainings(monkeypatch):
    """Distillation replaced by fixed examples; counts which words were trained."""
    competing = sys.modules["ifsteer.training.compete"]
    trained: list[str] = []

    def fixed(_lm, instruction, _work, **_k):
        word = instruction.id.rsplit(":", 1)[-1]
        trained.append(word)
        return examples(word=word)

    monkeypatch.setattr(competing, "training_examples", fixed)
    return trained


def test_the_class_competes_once_on_its_validation_words_and_every_file_records_it(
    lm, tmp_path, shipped, trainings, monkeypatch
):
    """Real validation on the tiny model, every verdict failing: the paper's class point keeps
    every file, and the record names the class, its words and the configuration."""
    monkeypatch.setattr("ifsteer.calibration.scoring.check", lambda *_a: _Failed())
    out, files = shipped
    work = tmp_path / "work"
    contest = compete_class(lm, CLASS, picked(), files, work, CONFIG, **RUN)
    assert contest is not None and contest.winner == "mean_difference"
    assert trainings == WORDS[:2]
    for path in files:
        calibration = read_calibrated(path).calibration
        assert calibration.method == "mean_difference"
        held = calibration.competition
        assert held["class"] == CLASS and held["words"] == WORDS[:2]
        assert held["winner"] == "mean_difference" and held["config"]["steps"] == 4
    assert len(list((work / "trained").glob("*.safetensors"))) == 2
    assert compete_class(lm, CLASS, picked(), files, work, CONFIG, **RUN) is None
    assert ship_class(lm, WORDS, out, work) == 0
    assert trainings == WORDS[:2]


def test_a_class_win_ships_every_word_its_own_trained_vector(
    lm, tmp_path, shipped, trainings, monkeypatch
):
    """The class's validation is forced to a trained win; each prompt must have been steered
    by its own word's trained vector, and every word then ships its own, trained once."""
    seen = {}

    def won(_lm, _id, prompts, per_prompt, _log, **_options):
        seen["per_prompt"] = per_prompt
        best = PointResult(Point((1,), "additive", 0.5), 0.9, 0.8, 0.0, 0.0, None, 2)
        baseline = PointResult(Point(), 0.1, 0.1, 0.0, 0.0, None, 2)
        return Trial([best], best, baseline)

    monkeypatch.setattr(sys.modules["ifsteer.training.keyword_class"], "trial", won)
    out, files = shipped
    work = tmp_path / "work"
    contest = compete_class(lm, CLASS, picked(), files, work, CONFIG, **RUN)
    assert contest is not None and contest.winner == "trained"
    saved = {p.name.split(".")[0]: load_vectors(p)[0] for p in (work / "trained").iterdir()}
    for (word, _), vectors in zip(picked(), seen["per_prompt"], strict=True):
        own = saved[file_name(keyword_instruction(word).id).removesuffix(".safetensors")]
        assert torch.equal(vectors[1].direction, own[1].direction)
    assert all(read_calibrated(p).calibration.method == "mean_difference" for p in files)
    paper = {p: read_calibrated(p).steerings() for p in files}

    assert ship_class(lm, WORDS, out, work) == 3
    assert trainings == WORDS  # the validation words' vectors were read back, not retrained
    for word, path in zip(WORDS, files, strict=True):
        kept = read_calibrated(path)
        assert kept.calibration.method == "trained" and kept.recommended
        assert kept.calibration.validation["score"] == 0.8
        stem = file_name(keyword_instruction(word).id).removesuffix(".safetensors")
        trained = load_vectors(next((work / "trained").glob(f"{stem}.*")))[0]
        expected = steerings_for(Point((1,), "additive", 0.5), trained)
        assert [s.weight for s in kept.steerings()] == pytest.approx([s.weight for s in expected])
        assert torch.equal(kept.vectors[0].direction, trained[1].direction)
        # The class won on inclusion; a forbidden word is still excluded by the paper's vector.
        excluding = kept.excluding()
        assert [s.vector.layer for s in excluding] == [2]
        assert torch.equal(excluding[0].vector.direction, paper[path][0].vector.direction)
        assert excluding[0].effective_weight == pytest.approx(-paper[path][0].effective_weight)
    # Every word trained, the class's paper point is still lent to a word with no file.
    lent = Points(lm.model_id, directory=out, cache=tmp_path / "cache").group(
        keyword_instruction("zebra").id
    )
    assert isinstance(lent, GroupPoint) and lent.layers == (2,)
    assert lent.donor.calibration.point == "L2:additive:1:all"
    assert lent.donor.weights == pytest.approx([paper[files[0]][0].effective_weight])
    assert ship_class(lm, WORDS, out, work) == 0
    assert compete_class(lm, CLASS, picked(), files, work, CONFIG, **RUN) is None


def test_a_validation_word_that_learns_nothing_is_recorded_for_the_class(
    lm, tmp_path, shipped, monkeypatch
):
    competing = sys.modules["ifsteer.training.compete"]
    monkeypatch.setattr(competing, "training_examples", lambda *_a, **_k: examples(3))
    _out, files = shipped
    contest = compete_class(lm, CLASS, picked(), files, tmp_path / "work", CONFIG, **RUN)
    assert contest is not None and contest.trained is None
    assert "ocean: 3 training examples" in contest.summary()
    for path in files:
        held = read_calibrated(path).calibration.competition
        assert held["untrained"].startswith("ocean:") and held["winner"] == "mean_difference"


class _Failed:
    loose = strict = False
