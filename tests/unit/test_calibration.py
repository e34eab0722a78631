"""Layer/weight selection on synthetic score tables, the validation split, and a real sweep on a
tiny random model."""

from __future__ import annotations

import json
import random

import pytest

from ifsteer.batcher import Batcher
from ifsteer.calibration import (
    AnswerLog,
    Point,
    PointResult,
    SweepResult,
    apply_choice,
    choose,
    group_vector_files,
    load_sweep,
    save_sweep,
    score_point,
    sweep,
    sweep_filename,
    sweep_layers,
    sweep_recommends,
    sweep_weights,
    validation_groups,
)
from ifsteer.errors import IfsteerError, InvalidSteering, VectorMismatch
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.report import plot_sweep
from ifsteer.rows import Row
from ifsteer.steering import Steering
from ifsteer.vectors import (
    default_layer,
    default_layers,
    extract_instruction,
    load_vectors,
    read_vector_file,
    save_vectors,
)
from tests.conftest import make_tiny, tiny_llama_config

LOWER = "change_case:english_lowercase"
NO_COMMA = "punctuation:no_comma"


def point(layer, score, weight=None, accuracy=None, degenerate=0.0):
    accuracy = score if accuracy is None else accuracy
    return PointResult(Point.swept(layer, weight), accuracy, score, degenerate, 0.0, None, 4)


def picked(result):
    """(layer, weight, score) of a chosen sweep point."""
    return (*result.point.coordinates, result.score)


def shuffled(grid, seed=0):
    grid = list(grid)
    random.Random(seed).shuffle(grid)
    return grid


# --- choose -----------------------------------------------------------------------------------


def test_choose_picks_the_best_layer():
    grid = [point(None, 0.25), point(6, 0.5), point(8, 0.75), point(10, 0.5), point(12, 0.0)]
    for seed in range(3):
        assert picked(choose(shuffled(grid, seed))) == (8, None, 0.75)


def test_choose_takes_the_lowest_layer_on_ties():
    grid = [point(None, 0.0), point(14, 0.75), point(8, 0.75), point(20, 0.75), point(6, 0.5)]
    for seed in range(4):
        assert choose(shuffled(grid, seed)).point.coordinates[0] == 8


def test_no_steering_wins_when_no_layer_beats_it():
    tie = [point(None, 0.5), point(6, 0.5), point(8, 0.25)]
    assert picked(choose(tie)) == (None, None, 0.5)
    assert not choose(tie).steered
    better = [point(None, 0.75), point(6, 0.5), point(8, 0.25)]
    assert choose(shuffled(better)).point.coordinates[0] is None
    # but a strictly better layer beats it
    assert choose([point(None, 0.5), point(6, 0.75)]).point.coordinates[0] == 6


def test_a_degenerate_layer_is_zeroed_and_cannot_win():
    # layer 10 "follows" the instruction on every prompt, but most answers are loops
    accuracy, score = score_point([True, True, True, True], [True, True, True, False])
    assert (accuracy, score) == (1.0, 0.0)
    grid = [
        point(None, 0.25),
        point(8, 0.5),
        point(10, score, accuracy=accuracy, degenerate=0.75),
    ]
    assert choose(grid).point.coordinates[0] == 8


def test_a_failed_response_scores_the_same_whatever_its_fluency():
    # what lets a sweep stop a row whose check has failed for good: its text is cut short,
    # so its repetition and perplexity change, and they must not matter
    passed = [True, False, False, False]
    for flags in ([False] * 4, [False, True, True, True], [True, True, True, False]):
        fluent = [False, *flags[1:]]
        assert score_point(passed, fluent) == (0.25, 0.25)
    assert score_point(passed, [True, True, True, True]) == (0.25, 0.0)  # the pass degenerated


def test_score_point_counts_only_fluent_passes():
    assert score_point([True, True, False, False], [False, True, False, False]) == (0.5, 0.25)
    assert score_point([True, True], [True, False]) == (1.0, 0.5)  # half is not "most"
    assert score_point([], []) == (0.0, 0.0)
    with pytest.raises(ValueError):
        score_point([True], [])


def test_weight_grid_ties_go_to_the_lowest_layer_then_smallest_weight():
    grid = [
        point(None, 0.0),
        point(6, 0.75, weight=-120.0),
        point(6, 0.75, weight=40.0),
        point(6, 0.75, weight=80.0),
        point(4, 0.5, weight=20.0),
        point(8, 0.75, weight=20.0),
    ]
    assert picked(choose(shuffled(grid))) == (6, 40.0, 0.75)


def test_ties_go_to_the_higher_accuracy_before_the_lower_layer():
    # the search's rule, now the sweep's too: equal scores, but layer 10's extra passes show
    # it steers (they degenerated, so they do not count in the score)
    grid = [point(None, 0.0), point(6, 0.5), point(10, 0.5, accuracy=0.75)]
    assert choose(shuffled(grid)).point.coordinates[0] == 10


def test_choose_without_a_baseline_and_empty():
    assert choose([point(12, 0.0), point(10, 0.0)]).point.coordinates[0] == 10
    with pytest.raises(InvalidSteering):
        choose([])


# --- a real sweep on a tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny10(tiny_tokenizer):
    return make_tiny(tiny_llama_config(layers=10), tiny_tokenizer, "tiny-llama-10")


@pytest.fixture()
def lower_file(tiny10, tmp_path):
    layers = sorted({*default_layers(10), default_layer(10)})
    vectors = extract_instruction(tiny10, get_instruction(LOWER), layers, n_pairs=4)
    return save_vectors(tmp_path / "lower.safetensors", list(vectors.values()), default=3)


ROWS = [
    Row(
        1,
        "Describe a forest. Use only lowercase letters.",
        "Describe a forest.",
        (LOWER,),
        ({},),
        "d:1",
    ),
    Row(2, "Plan a picnic. Use only lowercase letters.", "Plan a picnic.", (LOWER,), ({},), "d:2"),
]


def test_sweep_covers_the_paper_grid_and_records_the_choice(tiny10, lower_file, tmp_path):
    advanced = []
    result = sweep_layers(
        tiny10,
        lower_file,
        ROWS,
        sampling=Sampling(max_new_tokens=4),
        batch_size=1,
        progress=advanced.append,
    )
    assert [p.point.coordinates for p in result.grid] == [
        (None, None),
        *((layer, None) for layer in range(10 // 5, 10, 2)),
    ]
    assert all(p.n == 2 and 0.0 <= p.score <= p.accuracy <= 1.0 for p in result.grid)
    assert sum(advanced) == 2 * 5 and len(result.responses) == 10
    assert result.chosen == choose(result.grid)
    assert result.rows == ["1", "2"] and result.vector_ids == [LOWER]

    # each row really was steered at its point's layer (batch 1: no padding, exact match)
    vectors, _ = load_vectors(lower_file)
    at4 = [r for r in result.responses if r["layer"] == 4 and r["key"] == 2][0]
    alone = generate(
        tiny10,
        ["Plan a picnic."],
        steering=[Steering(vectors[4])],
        sampling=Sampling(max_new_tokens=4),
    )
    assert at4["response"] == alone[0].text
    plain = [r for r in result.responses if r["layer"] is None and r["key"] == 2][0]
    assert (
        plain["response"]
        == generate(tiny10, ["Plan a picnic."], sampling=Sampling(max_new_tokens=4))[0].text
    )

    apply_choice(result, [lower_file])
    vectors, default = load_vectors(lower_file)
    record = vectors[default].extra["sweep"]
    assert record["recommended"] == result.recommended
    assert default == (result.chosen.point.coordinates[0] if result.recommended else 3)

    written = save_sweep(result, tmp_path / "sweeps")
    plot_sweep(load_sweep(written), written.with_suffix(".png"))
    assert written.name == "change_case__english_lowercase.json"
    data = load_sweep(written)
    assert data["chosen"]["layer"] == result.chosen.point.coordinates[0]
    assert [p["layer"] for p in data["grid"]] == [None, 2, 4, 6, 8]
    assert {"accuracy", "fluency", "score", "n", "weight"} <= set(data["grid"][0])
    assert (tmp_path / "sweeps" / "change_case__english_lowercase.png").stat().st_size > 1000
    lines = (tmp_path / "sweeps" / "change_case__english_lowercase.responses.jsonl").read_text()
    assert len(lines.splitlines()) == 10


def test_rows_with_an_unserved_instruction_do_not_calibrate(tiny10, lower_file):
    # The CLI's grouping and the library's sweep apply one rule: a row one of whose
    # instructions no vector steers passes or fails for reasons no layer changes.
    unserved = "length_constraints:number_words"
    mixed = Row(
        3,
        "Describe a lake. Use only lowercase letters. Use at most 20 words.",
        "Describe a lake.",
        (LOWER, unserved),
        ({}, {"num_words": 20, "relation": "less than"}),
        "d:3",
    )
    rows = [mixed, *ROWS]
    assert validation_groups(rows, {LOWER}, n_prompts=5) == {LOWER: ROWS}
    assert validation_groups(rows, {LOWER}, n_prompts=1) == {LOWER: ROWS[:1]}
    assert validation_groups(rows, set(), n_prompts=5) == {}
    result = sweep_layers(
        tiny10, lower_file, rows, layers=[4], sampling=Sampling(max_new_tokens=2), batch_size=4
    )
    assert result.rows == ["1", "2"]
    with pytest.raises(IfsteerError, match="no validation row has a vector file"):
        sweep_layers(tiny10, lower_file, [mixed], layers=[4], sampling=Sampling(max_new_tokens=2))


def test_sweep_with_the_instruction_and_a_weight_grid(tiny10, lower_file):
    result = sweep_weights(
        tiny10,
        lower_file,
        ROWS[:1],
        weights=[2.0, -2.0],
        layers=[4, 6],
        sampling=Sampling(max_new_tokens=3),
        batch_size=8,
        with_instruction=True,
    )
    assert [p.point.coordinates for p in result.grid] == [
        (None, None),
        (4, 2.0),
        (4, -2.0),
        (6, 2.0),
        (6, -2.0),
    ]
    assert result.with_instruction and result.mode == "additive"
    with pytest.raises(VectorMismatch):
        sweep_layers(tiny10, lower_file, ROWS, layers=[5], sampling=Sampling(max_new_tokens=2))


def _result(layer, weight=None):
    grid = [point(None, 0.25), point(2, 0.5 if layer == 2 else 0.0, weight=weight)]
    return SweepResult(
        LOWER,
        "tiny-llama-10",
        False,
        "projection",
        grid,
        point(layer, 0.5 if layer else 0.25, weight=weight),
        rows=["1"],
    )


def test_apply_choice_keeps_the_default_when_no_steering_wins(lower_file):
    apply_choice(_result(None), [lower_file])
    vectors, default = load_vectors(lower_file)
    assert default == 3
    assert vectors[default].extra["sweep"]["recommended"] is False
    assert vectors[default].extra["sweep"]["no_steering_score"] == 0.25
    assert not sweep_recommends(read_vector_file(lower_file))  # what run-paper reads back
    assert sweep_recommends(read_vector_file(lower_file), with_instruction=True)  # not swept

    apply_choice(_result(2, 7.5), [lower_file])
    vectors, default = load_vectors(lower_file)
    assert default == 2 and vectors[2].weight == 7.5
    assert vectors[2].extra["sweep"]["recommended"] is True
    assert sweep_recommends(read_vector_file(lower_file))

    with_instruction = _result(4)
    with_instruction = SweepResult(**{**with_instruction.__dict__, "with_instruction": True})
    apply_choice(with_instruction, [lower_file])
    vectors, default = load_vectors(lower_file)
    assert default == 4  # set_default=True by default
    assert vectors[4].extra["sweep_with_instruction"]["layer"] == 4
    assert vectors[4].extra["sweep"]["layer"] == 2  # the earlier record stays


def test_group_files_and_names():
    mapping = {
        "language:response_language:de": "de.safetensors",
        "language:response_language:ru": "ru.safetensors",
        LOWER: "lower.safetensors",
    }
    assert set(group_vector_files("language:response_language", mapping)) == {
        "language:response_language:de",
        "language:response_language:ru",
    }
    assert set(group_vector_files(LOWER, mapping)) == {LOWER}
    assert sweep_filename("language:response_language") == "language__response_language"
    json.dumps(_result(2).to_json())  # serialisable as is


def test_cli_sweep_writes_the_choice(monkeypatch, capsys, tmp_path, tiny10, lower_file):
    import sys

    from ifsteer.cli import main

    model_dir = tmp_path / "tiny-llama-10"
    tiny10.model.save_pretrained(model_dir)
    tiny10.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "validation.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "key": r.key,
                    "prompt": r.prompt,
                    "prompt_without_instruction": r.prompt_without_instruction,
                    "instruction_id_list": list(r.instruction_id_list),
                    "kwargs": [{}],
                }
            )
            + "\n"
            for r in ROWS
        )
    )
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    target = lower_file.rename(vectors / "lower.safetensors")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "ifsteer",
            "sweep",
            str(target),
            "--data",
            str(data),
            "--model",
            str(model_dir),
            "--n-prompts",
            "1",
            "--layers",
            "2,6",
            "--max-new-tokens",
            "2",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert LOWER in printed
    data_ = load_sweep(tmp_path / "sweeps" / "change_case__english_lowercase.json")
    assert [p["layer"] for p in data_["grid"]] == [None, 2, 6] and data_["rows"] == ["1"]
    vectors_, default = load_vectors(target)
    assert vectors_[default].extra["sweep"]["layer"] == data_["chosen"]["layer"]


def test_groups_swept_together_share_one_queue_and_match_sweeping_alone(
    tiny10, lower_file, tmp_path
):
    from ifsteer.calibration import calibrate, calibrate_groups
    from ifsteer.vectors import load_vector_files

    comma_layers = sorted({*default_layers(10), default_layer(10)})
    comma = extract_instruction(tiny10, get_instruction(NO_COMMA), comma_layers, n_pairs=4)
    save_vectors(tmp_path / "comma.safetensors", list(comma.values()), default=3)
    comma_rows = [
        Row(3, "Plan a trip. Do not use commas.", "Plan a trip.", (NO_COMMA,), ({},), "d:3")
    ]
    groups = {LOWER: ROWS, NO_COMMA: comma_rows}
    files = load_vector_files(tmp_path)
    sampling = Sampling(max_new_tokens=4)
    alone = {
        g: calibrate(
            tiny10,
            files,
            g,
            rows,
            tmp_path / "alone",
            layers=[4, 6],
            sampling=sampling,
            batch_size=1,
        )[0]
        for g, rows in groups.items()
    }
    engines = []

    def counting(*args, **kwargs):  # the queue factory the sweep is handed
        engines.append(Batcher(*args, **kwargs))
        return engines[-1]

    advanced: list[int] = []
    together = calibrate_groups(
        tiny10,
        load_vector_files(tmp_path),
        groups,
        tmp_path / "one",
        layers=[4, 6],
        sampling=sampling,
        batch_size=1,
        progress=advanced.append,
        engine=counting,
    )
    assert len(engines) == 1 and sum(advanced) == (2 + 1) * 3
    for group, (result, _, written) in together.items():
        assert written.is_file()
        assert [r["response"] for r in result.responses] == [
            r["response"] for r in alone[group].responses
        ]
        assert result.grid == alone[group].grid and result.chosen == alone[group].chosen


def test_a_killed_sweep_resumes_from_its_answers_on_disk(tiny10, lower_file, tmp_path):
    answers = tmp_path / "answers.jsonl"
    options = dict(sampling=Sampling(max_new_tokens=4), batch_size=2, layers=[4, 6])
    full = sweep_layers(tiny10, lower_file, ROWS, **options)

    class Killed(Exception):
        pass

    finished = []

    def killed_after_three(*args, **kwargs):  # an engine that dies after three answers
        engine = Batcher(*args, **kwargs)
        step = engine.step

        def dying_step():
            out = step()
            finished.extend(out)
            if len(finished) >= 3:
                raise Killed
            return out

        engine.step = dying_step
        return engine

    with pytest.raises(Killed):
        sweep_layers(
            tiny10, lower_file, ROWS, answers=answers, engine=killed_after_three, **options
        )
    on_disk = answers.read_text().splitlines()
    assert len(on_disk) == len(finished) and 3 <= len(on_disk) < 6
    with answers.open("a") as f:
        f.write('{"key": "cut short')  # the line a kill interrupted
    submitted = []

    def counting(*args, **kwargs):
        engine = Batcher(*args, **kwargs)
        submit = engine.submit
        engine.submit = lambda job: submitted.append(job) or submit(job)
        return engine

    advanced: list[int] = []
    resumed = sweep_layers(
        tiny10,
        lower_file,
        ROWS,
        answers=answers,
        engine=counting,
        progress=advanced.append,
        **options,
    )
    assert len(submitted) == 6 - len(on_disk) and sum(advanced) == 6
    assert [r["response"] for r in resumed.responses] == [r["response"] for r in full.responses]
    assert resumed.grid == full.grid and resumed.chosen == full.chosen


def test_a_sweep_reuses_answers_logged_under_the_keys_it_always_wrote(tiny10, lower_file, tmp_path):
    # run-paper's `sweeps/answers.jsonl` stays valid now that a sweep's points are `Point`s:
    # an answer is keyed by the (layer, weight) pair the sweep has always written
    sampling = Sampling(max_new_tokens=2)
    answers = tmp_path / "answers.jsonl"
    lines = []
    for row in ROWS:
        for layer in (None, 4):
            text = row.prompt_without_instruction
            key = AnswerLog.key(LOWER, False, None, [layer, None], row.key, text, sampling, True)
            completion = {"text": f"logged {layer}", "prompt_tokens": 1, "completion_tokens": 2}
            completion |= {"finish_reason": "length"}
            lines.append(json.dumps({"key": key, "completion": completion}) + "\n")
    answers.write_text("".join(lines))
    submitted = []

    def counting(*args, **kwargs):
        engine = Batcher(*args, **kwargs)
        engine.submit = submitted.append
        return engine

    result = sweep_layers(
        tiny10, lower_file, ROWS, layers=[4], sampling=sampling, answers=answers, engine=counting
    )
    assert submitted == []
    assert [r["response"] for r in result.responses] == ["logged None"] * 2 + ["logged 4"] * 2
    assert [p.point for p in result.grid] == [Point(), Point.swept(4)]


def test_a_sweep_refuses_a_point_it_cannot_name(tiny10, lower_file):
    # a search's point (a relative scale, or several layers) has no (layer, weight) to record
    for odd in (Point((4,), "projection", 2.0), Point.swept(4, 1.0, "additive")):
        with pytest.raises(InvalidSteering, match="one layer at a weight"):
            sweep(tiny10, lower_file, ROWS, [Point(), odd], sampling=Sampling(max_new_tokens=2))
