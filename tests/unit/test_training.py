"""Trained vectors on a tiny random model: the loss falls, the saved vector steers as trained,
a seed fixes the result, and the competition ships the better method."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from ifsteer.batcher import Batcher
from ifsteer.calibration import Point, steerings_for
from ifsteer.errors import InvalidSteering
from ifsteer.instructions import custom_instruction, get_instruction
from ifsteer.shipped import read_calibrated, write_calibrated
from ifsteer.steering import Steering
from ifsteer.training import Example, TrainConfig, compete, objective, train_vectors
from ifsteer.training import train as training
from ifsteer.vectors import extract_instruction, load_vectors, save_vectors
from tests.conftest import make_tiny, tiny_llama_config

LOWERCASE = get_instruction("change_case:english_lowercase")
QUERIES = [
    "Describe the city of Paris.",
    "Why is the ocean salty?",
    "How does a refrigerator keep food cold?",
    "What should I know before adopting a cat?",
    "Name a colour.",
    "Describe a forest at dawn.",
    "How do I clean a cast iron pan?",
    "Explain how rain forms.",
]


def examples() -> list[Example]:
    # One fixed answer for every prompt: a target a single vector can make far likelier.
    return [Example(q, "the answer is small and plain.", True, "rule") for q in QUERIES * 2]


def config(**changes) -> TrainConfig:
    base = dict(layers=(1,), steps=12, batch_size=4, lr=0.1, eval_every=4, held_out=0.25)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny(tiny_llama_config(), tiny_tokenizer, model_id="tiny-train")


def test_training_lowers_the_loss_on_its_targets(lm):
    trained = train_vectors(lm, LOWERCASE, examples(), config())
    loss = trained.record["loss"]
    assert loss["held_out_best"] < loss["held_out_unsteered"] - 0.05
    assert trained.record["best_step"] > 0 and trained.record["targets"] == {"rule": 16}
    vector = trained.vectors[1]
    assert vector.mode == "additive" and vector.weight == pytest.approx(vector.norm)
    assert 0 < vector.norm <= trained.record["norm_limits"]["1"] + 1e-4


def test_a_saved_vector_steers_through_steer_exactly_as_in_training(lm, tmp_path):
    trained = train_vectors(lm, LOWERCASE, examples(), config(layers=(1, 2)))
    path = save_vectors(tmp_path / "v.safetensors", list(trained.vectors.values()))
    loaded, _ = load_vectors(path)
    batch = objective.batch(lm, [objective.tokens_of(lm, e, 64) for e in examples()[:4]])
    raw = [
        Steering(training._raw_vector(lm, LOWERCASE, layer, v.direction * v.norm))
        for layer, v in trained.vectors.items()
    ]
    with torch.no_grad():
        during = objective.target_loss(lm, raw, batch)
        after = objective.target_loss(lm, [Steering(v) for v in loaded.values()], batch)
        unsteered = objective.target_loss(lm, [], batch)
    torch.testing.assert_close(after, during, rtol=1e-5, atol=1e-5)
    assert float(after) < float(unsteered)


def test_the_same_seed_trains_the_same_vector_and_another_seed_another(lm):
    first = train_vectors(lm, LOWERCASE, examples(), config(steps=4, eval_every=2))
    again = train_vectors(lm, LOWERCASE, examples(), config(steps=4, eval_every=2))
    other = train_vectors(lm, LOWERCASE, examples(), config(steps=4, eval_every=2, seed=1))
    assert torch.equal(first.vectors[1].direction, again.vectors[1].direction)
    assert not torch.equal(first.vectors[1].direction, other.vectors[1].direction)


def test_training_leaves_the_model_frozen_as_it_was(lm):
    flags = [p.requires_grad for p in lm.model.parameters()]
    before = [p.detach().clone() for p in lm.model.parameters()]
    train_vectors(lm, LOWERCASE, examples(), config(steps=2, eval_every=1))
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))


def paired() -> list[Example]:
    """Rule targets with the answers they rewrote (the capitalised original)."""
    return [
        replace(e, rejected="The Answer Is Small And Plain.", rejected_finished=True)
        for e in examples()
    ]


def test_the_preference_loss_raises_the_target_over_the_answer_it_rewrote(lm):
    trained = train_vectors(lm, LOWERCASE, paired(), config(loss="preference"))
    assert trained.record["loss"]["held_out_best"] < trained.record["loss"]["held_out_unsteered"]
    rows = [objective.tokens_of(lm, e, 64) for e in paired()[:4]]
    steered = [Steering(v) for v in trained.vectors.values()]
    pairs = objective.pairs(lm, rows)
    with torch.no_grad():
        before, _ = objective.pair_log_probs(lm, [], pairs)
        after, _ = objective.pair_log_probs(lm, steered, pairs)
    gain = after - before
    assert bool((gain[:4] > gain[4:]).all())  # the target gained more than the rejected answer


def test_the_preference_term_is_log_2_at_no_steering_and_skips_rows_without_a_rejection():
    log_probs = torch.tensor([-3.0, -5.0, -4.0, -5.0])
    nll = torch.tensor(0.5)
    both = torch.tensor([True, True])
    at_rest = objective.preference_loss(log_probs, nll, log_probs, both, beta=0.1)
    torch.testing.assert_close(at_rest, torch.tensor(0.5 + math.log(2)))
    gained = log_probs + torch.tensor([1.0, 0.0, 0.0, 0.0])  # only row 0's target gains
    only_second = torch.tensor([False, True])
    torch.testing.assert_close(
        objective.preference_loss(gained, nll, log_probs, only_second, beta=0.1), at_rest
    )
    assert objective.preference_loss(gained, nll, log_probs, both, beta=0.1) < at_rest


def test_a_rows_reference_does_not_depend_on_the_batch_it_was_computed_in(lm):
    """References are cached per row: padding to a longer neighbour must not change them."""
    short = objective.tokens_of(lm, paired()[0], 64)
    long = objective.tokens_of(
        lm, replace(paired()[1], target="the answer is small and plain. " * 8), 64
    )
    with torch.no_grad():
        alone, _ = objective.pair_log_probs(lm, [], objective.pairs(lm, [short]))
        padded, _ = objective.pair_log_probs(lm, [], objective.pairs(lm, [short, long]))
    torch.testing.assert_close(padded[[0, 2]], alone, rtol=1e-5, atol=1e-4)


def test_bad_requests_are_refused_with_one_line(lm):
    with pytest.raises(InvalidSteering, match="out of range"):
        train_vectors(lm, LOWERCASE, examples(), config(layers=(9,)))
    with pytest.raises(InvalidSteering, match="at least 4"):
        train_vectors(lm, LOWERCASE, examples()[:2], config())
    with pytest.raises(InvalidSteering, match="unknown loss"):
        train_vectors(lm, LOWERCASE, examples(), config(loss="hinge"))
    with pytest.raises(InvalidSteering, match="rejected answer"):
        train_vectors(lm, LOWERCASE, examples(), config(loss="preference"))


def test_the_competition_ships_the_trained_vector_only_where_it_scores_higher(
    lm, tmp_path, monkeypatch
):
    """The paper's file holds a steered point; the validation verdicts are forced so that the
    trained vector wins, then a rerun skips the decided instruction."""
    from ifsteer.calibration import scoring
    from ifsteer.generation import Sampling

    competing = sys.modules["ifsteer.training.compete"]

    iid = LOWERCASE.id
    paper = extract_instruction(lm, LOWERCASE, [1], n_pairs=4)
    shipped = tmp_path / "shipped.safetensors"
    paper_point = Point((1,), "projection", 1.0)
    write_calibrated(
        shipped,
        steerings_for(paper_point, paper),
        {"status": "searched", "recommended": True, "point": paper_point.key,
         "validation": {"score": 0.1, "accuracy": 0.1, "degenerate": 0.0}},
    )  # fmt: skip
    monkeypatch.setattr(competing, "training_examples", lambda *a, **k: examples())
    # Every trained answer passes, every unsteered one fails.
    monkeypatch.setattr(
        "ifsteer.calibration.scoring.check",
        lambda _id, _kw, _prompt, response: _Verdict(response != "UNSTEERED"),
    )
    real_answer_jobs = scoring.answer_jobs
    engines = []

    def answer_jobs(lm_, jobs, **kwargs):
        engines.append(kwargs["engine"])
        done = real_answer_jobs(lm_, jobs, **kwargs)
        return [
            c if job.steering else replace(c, text="UNSTEERED")
            for c, job in zip(done, jobs, strict=True)
        ]

    monkeypatch.setattr(scoring, "answer_jobs", answer_jobs)

    def engine(*args, **kwargs):  # the queue the build hands on (vLLM's, with --backend vllm)
        return Batcher(*args, **kwargs)

    contest = compete(
        lm, iid, shipped, tmp_path / "work", config(), sampling=Sampling(max_new_tokens=4),
        n_prompts=3, engine=engine, setting=".vllm",
    )  # fmt: skip
    assert contest is not None and contest.winner == "trained"
    assert set(engines) == {engine}  # validation answers on the engine given, logged apart
    logs = [p.name for p in (tmp_path / "work").glob("*.jsonl")]
    assert logs and all(name.endswith(".trained.vllm.jsonl") for name in logs), logs
    written = read_calibrated(shipped)
    assert written.calibration["method"] == "trained" and written.recommended
    competition = written.calibration["competition"]
    assert competition["mean_difference"]["score"] == 0.1
    assert [t["point"] for t in competition["trained"]] == [
        "L1:additive:1:all",
        "L1:additive:0.5:all",
    ]
    assert [s.effective_mode for s in written.steerings()] == ["additive"]
    assert written.vectors[0].extra["training"]["method"] == "trained"
    assert compete(lm, iid, shipped, tmp_path / "work", config()) is None  # decided: skipped
    # A trained winner is not retrained under another configuration either.
    assert compete(lm, iid, shipped, tmp_path / "work", config(steps=3)) is None


def test_a_lost_competition_is_retried_only_under_another_training_configuration(
    lm, tmp_path, monkeypatch
):
    """Nothing passes, so the trained vector loses and the paper's vector stays; the same
    configuration is then skipped, another one trains again and keeps the first round."""
    competing = sys.modules["ifsteer.training.compete"]
    from ifsteer.generation import Sampling

    paper = extract_instruction(lm, LOWERCASE, [1], n_pairs=4)
    shipped = tmp_path / "shipped.safetensors"
    point = Point((1,), "projection", 1.0)
    write_calibrated(
        shipped, steerings_for(point, paper),
        {"status": "searched", "recommended": False, "point": point.key},
    )  # fmt: skip
    monkeypatch.setattr(competing, "training_examples", lambda *a, **k: examples())
    monkeypatch.setattr("ifsteer.calibration.scoring.check", lambda *_a: _Verdict(False))
    run = {"sampling": Sampling(max_new_tokens=2), "n_prompts": 2}
    counted: dict[str, list[int]] = {}

    @contextmanager
    def bars(description, total):
        counted[description] = [total, 0]
        yield lambda n: counted[description].__setitem__(1, counted[description][1] + n)

    first = compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config(), **run, bars=bars)
    assert counted == {f"training {LOWERCASE.id}": [config().steps, config().steps]}
    assert first is not None and first.winner == "none"
    kept = read_calibrated(shipped)
    assert kept.calibration.get("method", "mean_difference") == "mean_difference"
    assert torch.equal(kept.vectors[0].direction, paper[1].direction)
    assert compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config(), **run) is None
    second = compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config(steps=3), **run)
    assert second is not None and second.winner == "none"
    competition = read_calibrated(shipped).calibration["competition"]
    assert competition["config"]["steps"] == 3
    assert [r["config"]["steps"] for r in competition["earlier"]] == [config().steps]
    assert len(list((tmp_path / "work" / "trained").glob("*.safetensors"))) == 2


def test_an_instruction_without_enough_training_examples_keeps_its_vector_and_the_build_goes_on(
    lm, tmp_path, monkeypatch
):
    """A language the model never answers in gives distillation nothing: the competition is
    recorded as held under this configuration (no training, the paper's vector kept), not an
    error that would stop a build of every other instruction."""
    competing = sys.modules["ifsteer.training.compete"]
    paper = extract_instruction(lm, LOWERCASE, [1], n_pairs=4)
    shipped = tmp_path / "shipped.safetensors"
    point = Point((1,), "projection", 1.0)
    record = {"status": "searched", "recommended": True, "point": point.key,
              "validation": {"score": 0.2}}  # fmt: skip
    write_calibrated(shipped, steerings_for(point, paper), record)
    monkeypatch.setattr(competing, "training_examples", lambda *a, **k: examples()[:3])
    contest = compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config())
    assert contest is not None and contest.trained is None
    assert contest.winner == "mean_difference" and contest.examples == 3
    assert "3 training examples" in contest.summary()
    kept = read_calibrated(shipped)
    assert torch.equal(kept.vectors[0].direction, paper[1].direction) and kept.recommended
    assert kept.calibration["competition"]["examples"] == 3
    assert compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config()) is None
    assert not (tmp_path / "work" / "trained").exists()
    monkeypatch.setattr(competing, "training_examples", lambda *a, **k: examples())
    # The preference loss over distilled answers (no rejected twin) ends the same way: a build
    # over a group of languages records it and goes on.
    preferred = compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config(loss="preference"))
    assert preferred is not None and preferred.winner == "mean_difference"
    assert "preference loss needs" in preferred.summary()
    assert not (tmp_path / "work" / "trained").exists()
    # A training that never beats no steering on its held-out examples ends the same way.

    def learns_nothing(*_a, **_k):
        raise training.NothingLearned("never beat no steering")

    monkeypatch.setattr(competing, "train_vectors", learns_nothing)
    other = compete(lm, LOWERCASE.id, shipped, tmp_path / "work", config(steps=3))
    assert other is not None and other.winner == "mean_difference"
    assert "never beat no steering" in other.summary()
    competition = read_calibrated(shipped).calibration["competition"]
    assert competition["untrained"] == "never beat no steering"
    assert [r["examples"] for r in competition["earlier"]] == [3, len(examples())]


class _Verdict:
    def __init__(self, passed: bool) -> None:
        self.loose = self.strict = passed


def test_distillation_keeps_the_passing_answers_that_read_fine(lm, tmp_path):
    """A looping answer that passes the check does not become a target: a vector fitted to it
    would learn the loop (107 of 114 passing German answers of the embedded model loop)."""
    import json

    from ifsteer.training.data import distilled_examples

    answers = {
        QUERIES[0]: "paris is a city of bridges, museums and cafes along the seine.",
        QUERIES[1]: "salt comes from rocks. " * 20,  # lowercase, and a loop
        QUERIES[2]: "A Refrigerator Pumps Heat Out.",  # fluent, but not lowercase
    }
    cache = tmp_path / "answers.jsonl"
    with cache.open("w") as f:
        for query, text in answers.items():
            prompt = f"{query} {LOWERCASE.phrasings[0]}"
            f.write(json.dumps({"query": prompt, "text": text, "finished": True}) + "\n")
    kept = distilled_examples(lm, LOWERCASE, list(answers), 32, cache=cache)
    assert [e.prompt for e in kept] == [QUERIES[0]]
    assert kept[0].target == answers[QUERIES[0]] and kept[0].source == "distill"


def test_a_recorded_configuration_names_the_distillation_rule_only_where_it_was_used():
    """A change of which distilled answers train retries the distilled instructions that lost,
    and leaves the rule-target ones (whose examples it does not change) decided."""
    from ifsteer.training.compete import config_settings, recorded_config
    from ifsteer.training.data import DISTILLED

    ruled = config_settings(config(), LOWERCASE.id)
    distilled = config_settings(config(), "language:response_language:de")
    assert "distilled" not in ruled and distilled["distilled"] == DISTILLED
    assert recorded_config(distilled) == recorded_config(ruled) == config()


@pytest.mark.parametrize(
    ("instruction", "targets", "source"),
    [
        (LOWERCASE, "auto", "rule"),
        (LOWERCASE, "rule", "rule"),
        (LOWERCASE, "distill", "distill"),
        (custom_instruction("Answer like a pirate."), "auto", "distill"),
    ],
)
def test_examples_come_from_the_rule_unless_distillation_is_asked_for_or_no_rule_exists(
    lm, tmp_path, monkeypatch, instruction, targets, source
):
    """The build and `ifsteer train` share this choice; the unsteered answers are generated
    only where a rule will rewrite them."""
    from ifsteer.training.data import Answer, Example

    competing = sys.modules["ifsteer.training.compete"]
    asked = []

    def unsteered(_lm, queries, *_a, **_k):
        asked.append("unsteered")
        return [Answer(q, f"{q} It Is Warm.", True) for q in queries]

    def distilled(_lm, spec, queries, *_a, **_k):
        asked.append("distill")
        return [Example(q, "a passing answer.", True, "distill") for q in queries]

    monkeypatch.setattr(competing, "unsteered_answers", unsteered)
    monkeypatch.setattr(competing, "distilled_examples", distilled)
    got = competing.training_examples(lm, instruction, tmp_path, targets=targets)
    assert got and {e.source for e in got} == {source}
    assert asked == (["unsteered"] if source == "rule" else ["distill"])
    if source == "rule":
        assert all(e.target == e.target.lower() != e.rejected for e in got)


@pytest.mark.parametrize(
    ("instruction", "targets", "message"),
    [
        (custom_instruction("Answer like a pirate."), "rule", "no rule writes targets"),
        (LOWERCASE, "rules", "unknown targets 'rules'"),
    ],
)
def test_targets_that_cannot_be_had_are_refused_before_anything_generates(
    lm, tmp_path, monkeypatch, instruction, targets, message
):
    competing = sys.modules["ifsteer.training.compete"]
    monkeypatch.setattr(competing, "distilled_examples", pytest.fail)
    with pytest.raises(InvalidSteering, match=message):
        competing.training_examples(lm, instruction, tmp_path, targets=targets)
