from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from ifsteer.batcher import Batcher
from ifsteer.errors import EvaluationError, MalformedVectorFile, VectorMismatch
from ifsteer.evaluation import (
    count_pending,
    read_responses,
    run_evaluation,
    summarize,
    wilson_interval,
)
from ifsteer.generation import Sampling, generate
from ifsteer.jobs import Job
from ifsteer.quality import perplexities
from ifsteer.rows import (
    SETTINGS,
    load_rows,
)
from ifsteer.shipped import file_name, write_calibrated
from ifsteer.steering import Steering
from ifsteer.vectors import load_vector_directory, save_vectors
from tests.unit.test_cli import run as run_cli
from tests.unit.test_vectors import make_vector

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SHORT = Sampling(max_new_tokens=5)
LOWER = "change_case:english_lowercase"
NO_COMMA = "punctuation:no_comma"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ifeval_row(key: int, instruction: str = LOWER, **kwargs: Any) -> dict[str, Any]:
    base = f"Describe place number {key} in a few words."
    text = {LOWER: "Use only lowercase letters.", NO_COMMA: "Do not use commas."}.get(
        instruction, "Follow the instruction."
    )
    return {
        "key": key,
        "prompt": f"{base} {text}",
        "prompt_without_instruction": base,
        "instruction_id_list": [instruction],
        "kwargs": [kwargs],
    }


def save_vector_dir(directory: Path, *vectors) -> Path:
    for v in vectors:
        save_vectors(directory / f"{v.instruction_id.replace(':', '_')}.safetensors", [v])
    return directory


def without_timing(value: Any) -> Any:
    """A summary minus wall-clock fields, which differ between any two runs; floats compare
    to 1e-6, since an answer's recorded log-probability carries its batch's rounding (a
    resumed run decodes a row beside other rows than a clean run did)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in ("seconds", "timing_s")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-6)
    return value


# --- Wilson intervals and the four-setting table from a fixed JSONL ---------------------------


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(1, 4) == pytest.approx((0.045587, 0.699358), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def record(setting: str, key: int, strict: list[bool], loose: list[bool], **extra: Any) -> dict:
    ids = [LOWER, NO_COMMA][: len(strict)]
    base = {
        "experiment": "format",
        "setting": setting,
        "key": key,
        "instruction_id_list": ids,
        "kwargs": [{}] * len(ids),
        "prompt": "p",
        "response": "r",
        "strict": strict,
        "loose": loose,
        "vectors": [],
        "fluency": {"repetition": 0.0, "perplexity": 10.0, "degenerate": False},
        "judge": None,
        "model": "tiny-llama",
        "seconds": 1.5,
    }
    return {**base, **extra}


def fixed_records() -> list[dict]:
    steer = [
        {
            "instruction_id": LOWER,
            "layer": 1,
            "mode": "projection",
            "weight": 1.0,
            "model": "tiny-llama",
        }
    ]
    return [
        # no_instruction: nothing followed strictly; one row loosely
        record("no_instruction", 1, [False], [False]),
        record("no_instruction", 2, [False], [True]),
        record("no_instruction", 3, [False, False], [False, True]),
        record("no_instruction", 4, [False], [False]),
        # steer: key 4 had no vector file, so it ran unsteered
        record("steer", 1, [True], [True], vectors=steer),
        record("steer", 2, [False], [True], vectors=steer),
        record("steer", 3, [True, False], [True, True], vectors=steer),
        record("steer", 4, [False], [False], missing_vectors=["x"]),
        # instruction: fluency varies, judge scores two rows
        record(
            "instruction",
            1,
            [True],
            [True],
            judge=1.0,
            fluency={"repetition": 0.2, "perplexity": 2.0, "degenerate": True},
        ),
        record(
            "instruction",
            2,
            [True],
            [True],
            judge=0.5,
            fluency={"repetition": 0.0, "perplexity": 4.0, "degenerate": False},
        ),
        record(
            "instruction",
            3,
            [True, True],
            [True, True],
            fluency={"repetition": 0.4, "perplexity": 9.0, "degenerate": False},
        ),
        record(
            "instruction",
            4,
            [False],
            [True],
            fluency={"repetition": 0.2, "perplexity": None, "degenerate": False},
        ),
        # instruction_steer: everything followed
        *(
            record("instruction_steer", k, [True] * n, [True] * n, vectors=steer)
            for k, n in ((1, 1), (2, 1), (3, 2), (4, 1))
        ),
        # a duplicate of an earlier (experiment, setting, key) counts once
        record("steer", 1, [False], [False], vectors=steer),
    ]


def test_four_setting_table_from_a_fixed_jsonl(tmp_path):
    path = tmp_path / "responses.jsonl"
    write_jsonl(path, fixed_records())
    with path.open("a") as f:
        f.write('{"experiment": "format", "setting": "steer", "ke')  # a killed write
    summary = summarize(path)
    assert summary["model"] == "tiny-llama"
    exp = summary["experiments"]["format"]
    assert exp["n_rows"] == 4 and list(exp["settings"]) == list(SETTINGS)
    s = exp["settings"]

    def mean_and_interval(stat: dict, successes: int, n: int) -> None:
        low, high = wilson_interval(successes, n)
        assert stat == pytest.approx({"mean": successes / n, "low": low, "high": high})

    # prompt level: a row counts when all of its instructions are followed
    for setting, strict, loose in (
        ("no_instruction", 0, 1),
        ("steer", 1, 3),
        ("instruction", 3, 4),
        ("instruction_steer", 4, 4),
    ):
        assert s[setting]["n"] == 4
        mean_and_interval(s[setting]["prompt_strict"], strict, 4)
        mean_and_interval(s[setting]["prompt_loose"], loose, 4)
    # instruction level: five instructions (row 3 has two)
    for setting, strict, loose in (
        ("no_instruction", 0, 2),
        ("steer", 2, 4),
        ("instruction", 4, 5),
        ("instruction_steer", 5, 5),
    ):
        mean_and_interval(s[setting]["instruction_strict"], strict, 5)
        mean_and_interval(s[setting]["instruction_loose"], loose, 5)
    assert s["instruction"]["fluency"] == pytest.approx(
        {"repetition": 0.2, "perplexity": 4.0, "degenerate": 0.25}
    )
    assert s["instruction"]["judge"] == pytest.approx(0.75)
    assert s["no_instruction"]["judge"] is None
    assert s["steer"]["n_unsteered"] == 1 and s["steer"]["n_missing_vectors"] == 1
    assert s["instruction_steer"]["n_unsteered"] == 0
    assert s["no_instruction"]["n_unsteered"] == 0  # not a steered setting
    per = exp["per_instruction"]
    assert per[NO_COMMA]["steer"]["n"] == 1 and per[NO_COMMA]["steer"]["strict"]["mean"] == 0.0
    assert per[LOWER]["no_instruction"]["n"] == 4
    mean_and_interval(per[LOWER]["no_instruction"]["loose"], 1, 4)
    assert exp["vector_models"] == ["tiny-llama"]
    assert summary["timing_s"] == {"format": pytest.approx(16 * 1.5)}


# --- data -----------------------------------------------------------------------------------


def test_rows_without_query_are_refused_for_no_instruction_settings(tmp_path, tiny_lm):
    row = ifeval_row(1)
    del row["prompt_without_instruction"]
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [row]))
    with pytest.raises(EvaluationError, match="no 'prompt_without_instruction'.*--settings"):
        run_evaluation(tiny_lm, rows, None, tmp_path / "run", settings=["no_instruction"])
    summary = run_evaluation(
        tiny_lm, rows, None, tmp_path / "run", settings=["instruction"], sampling=SHORT
    )
    assert summary.generated == 1


def test_a_row_whose_kwargs_name_no_vector_is_refused_with_its_line(tmp_path, tiny_lm):
    data = write_jsonl(tmp_path / "d.jsonl", [ifeval_row(1, "language:response_language")])
    rows = load_rows(data)
    with pytest.raises(EvaluationError, match=r"d.jsonl:1: .*lacks its 'language' argument"):
        run_evaluation(tiny_lm, rows, None, tmp_path / "run", settings=["instruction"])


# --- vectors --------------------------------------------------------------------------------


def test_load_vector_directory_maps_ids_to_files(tmp_path):
    a = make_vector(instruction_id=LOWER)
    b = make_vector(instruction_id=NO_COMMA)
    save_vector_dir(tmp_path, a, b)
    (tmp_path / "notes.txt").write_text("not a vector, and not a .safetensors file either")
    found = load_vector_directory(tmp_path)
    assert set(found) == {LOWER, NO_COMMA}
    assert found[LOWER].path.name == "change_case_english_lowercase.safetensors"
    save_vectors(tmp_path / "copy.safetensors", [a])
    with pytest.raises(EvaluationError, match="both hold 'change_case:english_lowercase'"):
        load_vector_directory(tmp_path)


def test_load_vector_directory_names_a_file_that_is_not_a_vector(tmp_path):
    import torch

    save_file({"x": torch.zeros(2)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(MalformedVectorFile, match="stray.safetensors"):
        load_vector_directory(tmp_path)
    with pytest.raises(EvaluationError, match="not a directory"):
        load_vector_directory(tmp_path / "nope")


def test_each_row_gets_its_own_vectors(tmp_path, tiny_lm):
    lower = make_vector(layer=1, instruction_id=LOWER, target=4.0)
    comma = make_vector(layer=2, instruction_id=NO_COMMA, target=-3.0)
    vectors = save_vector_dir(tmp_path / "vectors", lower, comma)
    rows = load_rows(
        write_jsonl(
            tmp_path / "d.jsonl",
            [
                ifeval_row(1, LOWER),
                ifeval_row(2, NO_COMMA),
                ifeval_row(3, "language:response_language", language="sw"),  # no file for it
            ],
        )
    )
    summary = run_evaluation(
        tiny_lm,
        rows,
        vectors,
        tmp_path / "run",
        sampling=SHORT,
        batch_size=3,
        settings=["no_instruction", "steer"],
    )
    assert summary.missing_vectors == ("language:response_language:sw",)
    got = {(r["setting"], r["key"]): r for r in read_responses(summary.responses_path)}
    assert [v["instruction_id"] for v in got[("steer", 1)]["vectors"]] == [LOWER]
    assert got[("steer", 2)]["vectors"] == [
        {
            "instruction_id": NO_COMMA,
            "layer": 2,
            "mode": "projection",
            "weight": 1.0,
            "model": "tiny-llama",
        }
    ]
    assert got[("steer", 3)]["vectors"] == []
    assert got[("steer", 3)]["missing_vectors"] == ["language:response_language:sw"]
    assert all(got[("no_instruction", k)]["vectors"] == [] for k in (1, 2, 3))
    assert summary.data["experiments"]["format"]["settings"]["steer"]["n_unsteered"] == 1
    # The batch of three mixed rows answered exactly as each row steered alone would be.
    for key, vector in ((1, lower), (2, comma)):
        alone = generate(
            tiny_lm,
            [rows[key - 1].prompt_without_instruction],
            steering=[Steering(vector)],
            sampling=SHORT,
        )[0].text
        assert got[("steer", key)]["response"] == alone
    line = got[("steer", 1)]
    assert line["prompt"] == rows[0].prompt_without_instruction and line["model"] == "tiny-llama"
    assert len(line["strict"]) == len(line["loose"]) == 1
    assert set(line["fluency"]) == {"repetition", "perplexity", "degenerate"}


def keyword_row(key: int, word: str, exclude: bool) -> dict[str, Any]:
    base = f"Write a short note about item {key}."
    if exclude:
        return {
            "key": key,
            "prompt": f'{base} Do not use the word "{word}".',
            "prompt_without_instruction": base,
            "instruction_id_list": ["keywords:forbidden_words"],
            "kwargs": [{"forbidden_words": [word]}],
        }
    return {
        "key": key,
        "prompt": f'{base} Include the word "{word}".',
        "prompt_without_instruction": base,
        "instruction_id_list": ["keywords:existence"],
        "kwargs": [{"keywords": [word]}],
    }


def test_a_file_that_keeps_a_vector_for_exclusion_excludes_with_it(tmp_path, tiny_lm):
    """A keyword file whose point is a trained vector at layer 1 keeps the paper's at layer 2:
    inclusion steers with the first, exclusion with the second negated."""
    word = "keywords:existence:forest"
    trained = make_vector(layer=1, instruction_id=word, mode="additive", weight=3.0)
    paper = make_vector(layer=2, instruction_id=word, mode="additive", weight=5.0)
    write_calibrated(
        tmp_path / "vectors" / file_name(word),
        [Steering(trained)],
        {"recommended": True, "point": "L1:additive:1:all"},
        [Steering(paper)],
    )
    for exclude, expected in ((True, (2, -5.0)), (False, (1, 3.0))):
        data = write_jsonl(tmp_path / f"{exclude}.jsonl", [keyword_row(1, "forest", exclude)])
        summary = run_evaluation(
            tiny_lm,
            load_rows(data),
            tmp_path / "vectors",
            tmp_path / f"run{exclude}",
            experiment="keywords_exclude" if exclude else "keywords_include",
            settings=["steer"],
            sampling=SHORT,
        )
        (line,) = read_responses(summary.responses_path)
        assert [(v["layer"], v["weight"]) for v in line["vectors"]] == [expected]


def test_exclusion_applies_the_inclusion_vector_with_negative_weight(tmp_path, tiny_lm):
    forest = make_vector(
        layer=1, instruction_id="keywords:existence:forest", mode="additive", weight=3.0
    )
    vectors = save_vector_dir(tmp_path / "vectors", forest)
    data = write_jsonl(tmp_path / "ex.jsonl", [keyword_row(1, "forest", exclude=True)])
    summary = run_evaluation(
        tiny_lm,
        load_rows(data),
        vectors,
        tmp_path / "ex",
        experiment="keywords_exclude",
        settings=["steer"],
        sampling=SHORT,
    )
    (line,) = read_responses(summary.responses_path)
    assert line["vectors"][0]["weight"] == -3.0 and line["vectors"][0]["mode"] == "additive"
    negated = generate(
        tiny_lm, [line["prompt"]], steering=[Steering(forest, weight=-3.0)], sampling=SHORT
    )[0].text
    assert line["response"] == negated
    # An override is a magnitude: the excluded word gets its negation, an included word gets it.
    for exclude, sign in ((True, -1), (False, 1)):
        data = write_jsonl(tmp_path / "kw.jsonl", [keyword_row(2, "forest", exclude)])
        experiment = "keywords_exclude" if exclude else "keywords_include"
        summary = run_evaluation(
            tiny_lm,
            load_rows(data),
            vectors,
            tmp_path / f"kw{exclude}",
            experiment=experiment,
            settings=["steer"],
            sampling=SHORT,
            weights={"keywords:*": 7.0},
        )
        (line,) = read_responses(summary.responses_path)
        assert line["vectors"][0]["weight"] == sign * 7.0


@pytest.mark.parametrize(
    ("key", "length_id"), [(1, "length:concise"), (3, "length:extremely_concise")]
)  # row 1 asks for at most 4 sentences, row 3 for at most 2 (`sentence_limit`)
def test_composition_steers_with_both_vectors_and_scores_both(tmp_path, tiny_lm, key, length_id):
    lower = make_vector(layer=1, instruction_id=LOWER)
    concise, tight = (
        make_vector(layer=2, instruction_id=i, mode="additive", weight=5.0)
        for i in ("length:concise", "length:extremely_concise")
    )
    vectors = save_vector_dir(tmp_path / "vectors", lower, concise, tight)
    data = write_jsonl(tmp_path / "d.jsonl", [ifeval_row(key)])
    summary = run_evaluation(
        tiny_lm,
        load_rows(data),
        vectors,
        tmp_path / "run",
        experiment="composition",
        settings=["instruction_steer"],
        sampling=SHORT,
    )
    (line,) = read_responses(summary.responses_path)
    assert [(v["instruction_id"], v["layer"]) for v in line["vectors"]] == [
        (LOWER, 1),
        (length_id, 2),
    ]
    assert line["instruction_id_list"] == [LOWER, "length_constraints:number_sentences"]
    assert len(line["strict"]) == 2 and "Answer in at most" in line["prompt"]


def test_perplexity_under_another_model(tmp_path, tiny_lm, tiny_gpt2):
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [ifeval_row(1)]))
    summary = run_evaluation(
        tiny_lm,
        rows,
        None,
        tmp_path / "run",
        settings=["instruction"],
        sampling=SHORT,
        fluency_lm=tiny_gpt2,
    )
    (line,) = read_responses(summary.responses_path)
    assert line["fluency_model"] == "tiny-gpt2" and line["model"] == "tiny-llama"
    if line["response"]:
        expected = perplexities(tiny_gpt2, [line["prompt"]], [line["response"]])[0]
        assert line["fluency"]["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_unsteered_perplexity_comes_from_the_generation_itself(tmp_path, tiny_lm, monkeypatch):
    """Unsteered answers are scored by the log-probabilities their own generation recorded;
    only steered answers (their perplexity is the unsteered model's) get a second forward.
    The recorded number is the generated tokens' own perplexity (which `perplexities`, reading
    the answer re-tokenized, matches only where the text re-tokenizes alike)."""
    vectors = save_vector_dir(
        tmp_path / "vectors", make_vector(layer=1, instruction_id=LOWER, target=4.0)
    )
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [ifeval_row(1), ifeval_row(2)]))
    read_again: list[str] = []

    def counted(lm, prompts, responses, batch_size=8):
        read_again.extend(prompts)
        return perplexities(lm, prompts, responses, batch_size)

    monkeypatch.setattr("ifsteer.quality.perplexities", counted)
    settings = ["no_instruction", "instruction", "steer"]
    summary = run_evaluation(
        tiny_lm, rows, vectors, tmp_path / "run", settings=settings, sampling=SHORT
    )
    lines = read_responses(summary.responses_path)
    assert sorted(read_again) == sorted(x["prompt"] for x in lines if x["setting"] == "steer")
    for line in lines:
        p = line["fluency"]["perplexity"]
        if line["setting"] == "steer":
            assert p == pytest.approx(
                perplexities(tiny_lm, [line["prompt"]], [line["response"]])[0]
            )
            continue
        batcher = Batcher(tiny_lm, batch_size=1)
        job_id = batcher.submit(
            Job(tiny_lm.render(line["prompt"]).ids, sampling=SHORT, logprobs=True)
        )
        alone = batcher.run()[job_id]
        assert alone.text == line["response"] and alone.perplexity is not None
        assert p == pytest.approx(alone.perplexity, rel=1e-4)


def test_transfer_refuses_another_hidden_size(tmp_path, tiny_lm):
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [ifeval_row(1)]))
    small = save_vector_dir(
        tmp_path / "small", make_vector(hidden=32, model_id="other", instruction_id=LOWER)
    )
    with pytest.raises(VectorMismatch, match="hidden size 32") as err:
        run_evaluation(tiny_lm, rows, small, tmp_path / "run", experiment="transfer")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_transfer_accepts_same_hidden_size_and_records_the_source(tmp_path, tiny_lm):
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [ifeval_row(1)]))
    other = save_vector_dir(
        tmp_path / "other", make_vector(model_id="instruct-twin", instruction_id=LOWER)
    )
    with pytest.raises(VectorMismatch, match="allow_transfer"):
        run_evaluation(tiny_lm, rows, other, tmp_path / "a", settings=["steer"], sampling=SHORT)
    summary = run_evaluation(
        tiny_lm,
        rows,
        other,
        tmp_path / "b",
        experiment="transfer",
        settings=["steer"],
        sampling=SHORT,
    )
    (line,) = read_responses(summary.responses_path)
    assert line["vectors"][0]["model"] == "instruct-twin" and line["model"] == "tiny-llama"
    assert summary.data["experiments"]["transfer"]["vector_models"] == ["instruct-twin"]


# --- resume ---------------------------------------------------------------------------------


@pytest.fixture
def resume_case(tmp_path):
    vectors = save_vector_dir(
        tmp_path / "vectors",
        make_vector(layer=1, instruction_id=LOWER, target=4.0),
        make_vector(layer=2, instruction_id=NO_COMMA, target=-2.0),
    )
    rows = load_rows(
        write_jsonl(
            tmp_path / "d.jsonl", [ifeval_row(k, LOWER if k % 2 else NO_COMMA) for k in range(1, 5)]
        )
    )
    return rows, vectors


class Killed(Exception):
    pass


def keys(path: Path) -> list[tuple]:
    return [(r["experiment"], r["setting"], r["key"]) for r in read_responses(path)]


def test_resume_after_a_kill_gives_no_duplicates_and_the_same_summary(
    tmp_path, tiny_lm, resume_case
):
    rows, vectors = resume_case
    clean = run_evaluation(tiny_lm, rows, vectors, tmp_path / "clean", sampling=SHORT, batch_size=2)
    assert clean.generated == 16 and clean.skipped == 0

    def kill_after_first_batch(_n: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_evaluation(
            tiny_lm,
            rows,
            vectors,
            tmp_path / "killed",
            sampling=SHORT,
            batch_size=2,
            progress=kill_after_first_batch,
        )
    responses = tmp_path / "killed" / "responses.jsonl"
    assert len(read_responses(responses)) == 2  # the first batch reached the disk
    assert count_pending(tmp_path / "killed", rows) == 14
    advanced: list[int] = []
    resumed = run_evaluation(
        tiny_lm,
        rows,
        vectors,
        tmp_path / "killed",
        sampling=SHORT,
        batch_size=2,
        progress=advanced.append,
    )
    assert resumed.generated == 14 and resumed.skipped == 2 and sum(advanced) == 14
    assert len(keys(responses)) == len(set(keys(responses))) == 16
    assert without_timing(resumed.data) == without_timing(clean.data)
    on_disk = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert without_timing(on_disk) == without_timing(summarize(responses))


def test_resume_after_a_torn_last_line(tmp_path, tiny_lm, resume_case):
    rows, vectors = resume_case
    clean = run_evaluation(
        tiny_lm,
        rows,
        vectors,
        tmp_path / "clean",
        sampling=SHORT,
        batch_size=4,
        settings=["no_instruction", "steer"],
    )
    lines = (tmp_path / "clean" / "responses.jsonl").read_text().splitlines(keepends=True)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "responses.jsonl").write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    resumed = run_evaluation(
        tiny_lm,
        rows,
        vectors,
        torn,
        sampling=SHORT,
        batch_size=4,
        settings=["no_instruction", "steer"],
    )
    assert resumed.generated == 3 and resumed.skipped == 5
    path = torn / "responses.jsonl"
    assert len(keys(path)) == len(set(keys(path))) == 8
    assert path.read_text().endswith("}\n")  # the torn half line is gone, not glued to
    assert without_timing(resumed.data) == without_timing(clean.data)


def test_resume_refuses_other_generation_settings(tmp_path, tiny_lm, resume_case):
    rows, vectors = resume_case
    run_evaluation(tiny_lm, rows[:1], vectors, tmp_path / "run", sampling=SHORT, settings=["steer"])
    with pytest.raises(EvaluationError, match="max_new_tokens"):
        run_evaluation(
            tiny_lm,
            rows,
            vectors,
            tmp_path / "run",
            settings=["steer"],
            sampling=Sampling(max_new_tokens=7),
        )
    changed = r"row 1 \(steer\) was steered with .*weight 1.0\), now with .*weight 2.0\)"
    with pytest.raises(EvaluationError, match=changed):
        run_evaluation(
            tiny_lm,
            rows,
            vectors,
            tmp_path / "run",
            settings=["steer"],
            sampling=SHORT,
            weights={LOWER: 2.0},
        )


def test_a_second_writer_is_refused(tmp_path, tiny_lm, resume_case):
    rows, vectors = resume_case
    (tmp_path / "run").mkdir()
    with (tmp_path / "run" / "responses.jsonl").open("ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(EvaluationError, match="being written by another evaluation"):
            run_evaluation(tiny_lm, rows, vectors, tmp_path / "run", sampling=SHORT)


def test_a_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(EvaluationError, match=r"responses.jsonl:2: not a JSON object"):
        read_responses(path)


def test_unknown_setting_is_refused(tmp_path, tiny_lm, resume_case):
    rows, vectors = resume_case
    with pytest.raises(EvaluationError, match="unknown settings \\['steered'\\]"):
        run_evaluation(tiny_lm, rows, vectors, tmp_path / "run", settings=["steered"])


# --- CLI ------------------------------------------------------------------------------------


def test_cli_eval_runs_resumes_and_prints_the_table(monkeypatch, capsys, tmp_path, tiny_lm):
    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    vectors = save_vector_dir(
        tmp_path / "vectors", make_vector(layer=1, model_id="tiny", instruction_id=LOWER)
    )
    data = write_jsonl(tmp_path / "d.jsonl", [ifeval_row(k) for k in (1, 2, 3)])
    args = [
        "eval",
        "--data",
        str(data),
        "--vectors",
        str(vectors),
        "--out",
        str(tmp_path / "r"),
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "4",
        "--limit",
        "2",
        "--settings",
        "instruction,instruction_steer",
        "--weight",
        f"{LOWER}=1.5",
    ]
    code, printed, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "instr+steer" in printed and "paper: Phi-3-mini" in printed
    assert "4 new responses, 0 already on disk" in printed
    lines = read_responses(tmp_path / "r" / "responses.jsonl")
    assert {r["vectors"][0]["weight"] for r in lines if r["vectors"]} == {1.5}
    code, printed, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "0 new responses, 4 already on disk" in printed


def test_cli_eval_errors_are_one_line(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", "--data", str(bad), "--out", str(tmp_path / "r")
    )
    assert (
        code == 2
        and err.strip()
        == f"error: {bad}:1: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--data",
        str(write_jsonl(tmp_path / "d.jsonl", [ifeval_row(1)])),
        "--out",
        str(tmp_path / "r"),
        "--weight",
        "oops",
    )
    assert code == 2 and "--weight takes ID=VALUE" in err
    args = ["eval", "--data", "format", "--out", str(tmp_path / "r"), "--weight", "startend:x=nan"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "VALUE a finite number; got 'startend:x=nan'" in err


def test_all_settings_share_one_engine_and_each_answer_reaches_disk_as_it_ends(
    tmp_path, tiny_lm, resume_case
):
    """One queue for every row × setting: rows of different settings decode side by side,
    and progress counts answers already on disk (so a kill loses none that were reported)."""
    rows, vectors = resume_case
    engines: list[Any] = []
    widest: list[int] = []

    class Counting(Batcher):  # the queue factory the run is handed
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

        def step(self):  # type: ignore[no-untyped-def]
            done = super().step()
            widest.append(len(self._active) + len(done))
            return done

    on_disk: list[int] = []
    responses = tmp_path / "run" / "responses.jsonl"
    summary = run_evaluation(
        tiny_lm,
        rows,
        vectors,
        tmp_path / "run",
        sampling=SHORT,
        batch_size=16,
        progress=lambda n: on_disk.append(len(read_responses(responses))),
        engine=Counting,
    )
    assert len(engines) == 1 and summary.generated == 16
    assert max(widest) == 16  # all four settings of all four rows in one batch
    assert on_disk[-1] == 16 and on_disk == sorted(on_disk)
    records = read_responses(responses)
    assert sum(r["seconds"] for r in records) > 0
