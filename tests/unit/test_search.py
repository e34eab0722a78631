"""The staged calibration search: target-scale semantics, point choice, stages and resuming."""

from __future__ import annotations

import math

import pytest

from ifsteer.batcher import Batcher
from ifsteer.calibration.grid import Point, PointResult, choose
from ifsteer.calibration.point import projection_target, steerings_for
from ifsteer.calibration.scoring import search_log
from ifsteer.calibration.search import SearchSpace, run_search
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.prompts import build_pairs
from ifsteer.quality import Fluency
from ifsteer.steering import Steering
from ifsteer.validation import validation_prompts
from ifsteer.vectors import extract_vectors, last_token_activations

LOWER = "change_case:english_lowercase"


@pytest.fixture(scope="module")
def lower_vectors(tiny_lm):
    pairs = build_pairs(get_instruction(LOWER), 12, seed=0)
    return pairs, extract_vectors(
        tiny_lm, pairs, [1, 2, 3], instruction="lower", instruction_id=LOWER
    )


def result(point: Point, score: float, accuracy: float | None = None) -> PointResult:
    return PointResult(point, score if accuracy is None else accuracy, score, 0.0, 0.0, None, 10)


def test_target_scale_zero_is_the_without_level_and_one_the_paper(tiny_lm, lower_vectors):
    pairs, vectors = lower_vectors
    without = last_token_activations(tiny_lm, [p.without_instruction for p in pairs], [2])[2]
    v = vectors[2]
    assert projection_target(v, 1.0) == v.target
    assert projection_target(v, 0.0) == pytest.approx(
        float((without @ v.direction).mean()), rel=1e-4
    )
    # Scale 2 is "more of the instruction" whatever the sign of c̄.
    assert projection_target(v, 2.0) - projection_target(v, 1.0) == pytest.approx(v.norm)


def test_scale_one_steers_exactly_as_the_paper(tiny_lm, lower_vectors):
    _, vectors = lower_vectors
    prompts = ["Write a poem about rain.", "What causes tides?"]
    sampling = Sampling(max_new_tokens=6)
    paper = generate(tiny_lm, prompts, steering=[Steering(vectors[2])], sampling=sampling)
    ours = generate(
        tiny_lm, prompts, steering=steerings_for(Point((2,)), vectors), sampling=sampling
    )
    assert [c.text for c in ours] == [c.text for c in paper]


def test_additive_weight_is_split_across_layers_and_projection_is_not(lower_vectors):
    _, vectors = lower_vectors
    assert steerings_for(Point(), vectors) == []
    spread = steerings_for(Point((1, 3), "additive", 2.0), vectors)
    assert [s.effective_weight for s in spread] == pytest.approx([vectors[1].norm, vectors[3].norm])
    projected = steerings_for(Point((1, 3), "projection", 2.0, "generated"), vectors)
    assert [s.vector.target for s in projected] == pytest.approx(
        [vectors[1].target + vectors[1].norm, vectors[3].target + vectors[3].norm]
    )
    assert {s.positions for s in projected} == {"generated"}
    with pytest.raises(Exception, match="no vector at layer"):
        steerings_for(Point((0,)), vectors)


def test_choose_takes_the_best_and_breaks_ties_toward_the_simpler_point():
    none = result(Point(), 0.1)
    low, high = result(Point((6,)), 0.5), result(Point((10,)), 0.5)
    multi = result(Point((6, 10), "additive", 2.0), 0.5)
    generated = result(Point((6,), positions="generated"), 0.5)
    strong = result(Point((6,), "projection", 4.0), 0.5)
    assert choose([none, high, multi, generated, strong, low]).point == Point((6,))
    better = result(Point((10,), "additive", 2.0), 0.6)
    assert choose([none, low, better]) is better
    # Equal score, higher accuracy (the degenerate passes) wins the tie.
    assert choose([none, result(Point((10,)), 0.5, 0.9), low]).point == Point((10,))


def test_no_steering_wins_unless_beaten_strictly():
    none = result(Point(), 0.3)
    assert choose([none, result(Point((6,)), 0.3)]) is none
    assert choose([result(Point((6,)), 0.0), none]) is none
    assert choose([none]) is none
    with pytest.raises(Exception, match="empty"):
        choose([])


def test_run_search_chooses_the_best_valid_point_and_resumes(tiny_lm, lower_vectors, tmp_path):
    _, vectors = lower_vectors
    prompts = validation_prompts(LOWER, 3)
    space = SearchSpace(layers=(1, 2, 3), projection_scales=(2.0,), additive_scales=(1.0,))
    log = tmp_path / "log.jsonl"
    kwargs = dict(sampling=Sampling(max_new_tokens=5), log_path=log, batch_size=8)
    found = run_search(tiny_lm, LOWER, prompts, [vectors] * 3, space, **kwargs)
    # Stage 1: none + 3 layers; stage 2: 2 weights at the best layer; stage 3: generated + multi.
    assert len(found.results) == 1 + 3 + 2 + 2
    assert found.chosen == choose(found.results)
    best_score = max(r.score for r in found.results)
    assert found.chosen.score == best_score
    assert found.baseline.point == Point()
    assert found.best.point.layers
    multi = [r for r in found.results if len(r.point.layers) > 1]
    assert len(multi) == 1 and len(multi[0].point.layers) == 3
    assert len(search_log(log).records) == len(found.results) * 3

    submitted = []

    def counting(*args, **kw):  # the job queue the search is given makes every answer
        engine = Batcher(*args, **kw)
        submit = engine.submit
        engine.submit = lambda job: submitted.append(job) or submit(job)
        return engine

    kwargs["engine"] = counting
    again = run_search(tiny_lm, LOWER, prompts, [vectors] * 3, space, **kwargs)
    assert submitted == []  # everything came from the log
    assert again.to_json() == found.to_json()

    # A kill cut the last line short: that answer is made again, the rest read from the log.
    lines = log.read_text("utf-8").splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2], "utf-8")
    resumed = run_search(tiny_lm, LOWER, prompts, [vectors] * 3, space, **kwargs)
    assert len(submitted) == 1  # the one lost answer
    assert resumed.to_json() == found.to_json()
    assert log.read_text("utf-8").count("\n") == len(lines)  # the half line is gone


def test_early_stopping_gives_steered_answers_a_decider_and_no_steering_none(
    tiny_lm, lower_vectors, tmp_path
):
    # Whether the tiny model's answers are decided early is chance; the embedded model's are
    # (tests/integration/test_sweep_embedded.py). Here: who gets a decider, and every score.
    _, vectors = lower_vectors
    prompts = validation_prompts(LOWER, 2)
    space = SearchSpace(layers=(1, 2), projection_scales=(), additive_scales=(2.0,))
    options = dict(sampling=Sampling(max_new_tokens=6), batch_size=8)
    jobs = []

    def recording(*args, **kw):
        engine = Batcher(*args, **kw)
        submit = engine.submit
        engine.submit = lambda job: jobs.append(job) or submit(job)
        return engine

    full = run_search(tiny_lm, LOWER, prompts, [vectors] * 2, space, **options)
    early = run_search(
        tiny_lm, LOWER, prompts, [vectors] * 2, space, early_stop=True, engine=recording, **options
    )
    assert jobs and all((job.decided is None) == (not job.steering) for job in jobs)
    assert any(not job.steering for job in jobs)
    scores = [(r.point, r.score, r.accuracy) for r in early.results]
    assert scores == [(r.point, r.score, r.accuracy) for r in full.results]


def test_degenerate_points_are_zeroed_by_the_judge_band(tiny_lm, lower_vectors, tmp_path):
    _, vectors = lower_vectors
    prompts = validation_prompts(LOWER, 2)
    space = SearchSpace(
        layers=(2,), projection_scales=(), additive_scales=(), multi_layer=0, try_generated=False
    )
    # A band nothing fits: every answer is degenerate, so every score is zero and none wins.
    strict = Fluency(max_repetition=1.0, min_perplexity=1e9, max_perplexity=1e10)
    found = run_search(
        tiny_lm,
        LOWER,
        prompts,
        [vectors] * 2,
        space,
        judge=tiny_lm,
        fluency=strict,
        sampling=Sampling(max_new_tokens=4),
        log_path=tmp_path / "l.jsonl",
    )
    assert all(r.score == 0.0 for r in found.results)
    assert not found.recommended and found.chosen.point == Point()
    records = search_log(tmp_path / "l.jsonl").records.values()
    assert all(math.isfinite(r["perplexity"]) or not r["response"] for r in records)
