"""The CLI end to end on a tiny model saved as a local Hugging Face directory."""

from __future__ import annotations

import importlib
import json
import re
import sys

import pytest

from ifsteer import load_model
from ifsteer.calibration import Point, steerings_for
from ifsteer.cli import main, parse_vector_spec
from ifsteer.errors import InvalidSteering
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.prompts import build_pairs
from ifsteer.shipped import file_steerings, read_calibrated, write_calibrated
from ifsteer.training import ANSWER_TOKENS
from ifsteer.validation import extraction_queries
from ifsteer.vectors import extract_vectors, load_vector, load_vectors, save_vectors
from tests.unit.test_vectors import make_vector


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["ifsteer", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generate_json(monkeypatch, capsys, model_dir, vector: str, tokens: int) -> dict:
    """`ifsteer generate --json` of "Plan a picnic." with one `--vector`, its last row."""
    args = ["--model", str(model_dir), "-p", "Plan a picnic.", "-v", vector]
    code, printed, err = run(
        monkeypatch, capsys, "generate", *args, "--max-new-tokens", str(tokens), "--json"
    )
    assert code == 0, err
    return json.loads(printed.splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_lm.model.save_pretrained(path)
    tiny_lm.tokenizer.save_pretrained(path)
    return path


def test_extract_show_generate(monkeypatch, capsys, tmp_path, model_dir):
    out = tmp_path / "lower.safetensors"
    code, _, err = run(
        monkeypatch,
        capsys,
        "extract",
        "--model",
        str(model_dir),
        "--instruction-id",
        "change_case:english_lowercase",
        "--instruction",
        "Answer in lowercase.",
        "--n-pairs",
        "6",
        "--layers",
        "1,2",
        "--layer",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, err
    vectors, default = load_vectors(out)
    assert sorted(vectors) == [1, 2] and default == 2
    v = vectors[2]
    assert v.model_id == "tiny" and v.n_pairs == 6 and v.phrasings[0] == "Answer in lowercase."
    assert len(v.phrasings) > 1  # the catalogue's phrasings follow the user's

    code, shown, _ = run(monkeypatch, capsys, "vectors", "show", str(out), "--json")
    info = json.loads(shown)
    assert code == 0 and info["default_layer"] == 2 and set(info["layers"]) == {"1", "2"}

    row = generate_json(monkeypatch, capsys, model_dir, f"{out}:additive:30", 4)
    assert row["prompt"] == "Plan a picnic." and {"unsteered", "steered"} <= row.keys()


def test_free_text_instruction(monkeypatch, capsys, tmp_path, model_dir):
    out = tmp_path / "pirate.safetensors"
    code, _, err = run(
        monkeypatch,
        capsys,
        "extract",
        "--model",
        str(model_dir),
        "--instruction",
        "Talk like a pirate.",
        "--mode",
        "additive",
        "--n-pairs",
        "4",
        "--layers",
        "1",
        "--layer",
        "1",
        "--out",
        str(out),
    )
    assert code == 0, err
    v = load_vector(out)
    assert v.instruction_id == "free:talk-like-a-pirate" and v.mode == "additive"
    assert v.weight == pytest.approx(v.norm)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: save_vectors(p, [make_vector(1, hidden=32)]), "hidden size 32"),
        (lambda p: save_vectors(p, [make_vector(1, model_id="someone-else")]), "allow-transfer"),
        (lambda p: p.write_text("garbage"), "not a safetensors file"),
    ],
)
def test_bad_vectors_are_one_line_and_exit_2(
    monkeypatch, capsys, tmp_path, model_dir, make, message
):
    path = tmp_path / "v.safetensors"
    make(path)
    code, _, err = run(
        monkeypatch,
        capsys,
        "generate",
        "--model",
        str(model_dir),
        "-p",
        "Hi.",
        "-v",
        str(path),
        "--max-new-tokens",
        "2",
    )
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_layer_out_of_range_and_unknown_instruction(monkeypatch, capsys, tmp_path, model_dir):
    path = save_vectors(tmp_path / "v.safetensors", [make_vector(1, model_id="tiny")])
    code, _, err = run(
        monkeypatch,
        capsys,
        "generate",
        "--model",
        str(model_dir),
        "-p",
        "Hi.",
        "-v",
        str(path),
        "--layer",
        "9",
    )
    assert code == 2 and "holds layers [1], not 9" in err
    code, _, err = run(
        monkeypatch,
        capsys,
        "extract",
        "--model",
        str(model_dir),
        "--instruction-id",
        "change_case:english_lowercas",
        "--out",
        str(path),
    )
    assert code == 2 and "change_case:english_lowercase" in err  # suggested
    code, _, err = run(
        monkeypatch,
        capsys,
        "extract",
        "--model",
        str(model_dir),
        "--instruction",
        "x",
        "--layers",
        "1,99",
        "--out",
        str(path),
    )
    assert code == 2 and "out of range" in err
    code, _, err = run(
        monkeypatch, capsys, "generate", "--model", str(tmp_path / "nope"), "-p", "Hi."
    )
    assert code == 2 and "no model at" in err


def test_parse_vector_spec():
    assert parse_vector_spec("a.safetensors") == ("a.safetensors", None, None)
    assert parse_vector_spec("a.safetensors:additive:8") == ("a.safetensors", "additive", 8.0)
    assert parse_vector_spec("a.safetensors:-2.5") == ("a.safetensors", None, -2.5)
    with pytest.raises(InvalidSteering, match="expected PATH"):
        parse_vector_spec("a.safetensors:sideways")
    with pytest.raises(InvalidSteering, match="finite"):
        parse_vector_spec("a.safetensors:inf")


def test_threads_and_batch_size_must_be_positive(monkeypatch, capsys, tmp_path):
    for option in ("--threads", "--batch-size"):
        code, _, err = run(
            monkeypatch,
            capsys,
            "run-paper",
            "--out",
            str(tmp_path / "r"),
            "--data",
            str(tmp_path / "none.jsonl"),
            option,
            "0",
        )
        assert code == 2 and option in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--out", "v.safetensors", "--instruction-id", "punctuation:no_comma",
         "--loss", "hinge"),
        ("vectors", "build", "--trained", "--train-loss", "hinge"),
        ("vectors", "build", "--trained", "--train-lr", "0"),
        ("train", "--out", "v.safetensors", "--instruction-id", "punctuation:no_comma",
         "--max-target-tokens", "0"),
    ],
)  # fmt: skip
def test_training_options_are_checked_before_any_model_loads(monkeypatch, capsys, args):
    monkeypatch.setattr("ifsteer.cli.train.load", _no_model_may_load)
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert ("unknown loss 'hinge'" in err) or ("must be positive" in err)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--only", "detectable_format:titel"), "--only detectable_format:titel: not an id"),
        (("--groups", "language", "--only", "detectable_format:title"), "of the groups language"),
        (("--groups", "keywords", "--only", "keywords:existence:ocean"), "as one class"),
    ],
)
def test_build_refuses_an_id_it_would_skip_before_any_model_loads(
    monkeypatch, capsys, args, message
):
    """The build keeps the --only ids its groups hold: a typo used to build nothing, silently."""
    monkeypatch.setattr("ifsteer.cli.train.runner_backend", _no_model_may_load)
    code, _, err = run(monkeypatch, capsys, "vectors", "build", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_layer_the_model_lacks_is_refused_before_any_answer_is_made(
    monkeypatch, capsys, tmp_path, model_dir
):
    """On a new machine the unsteered answers take minutes; a typo in --layers must not."""
    monkeypatch.setenv("IFSTEER_HOME", str(tmp_path / "home"))
    # By import_module: as an attribute, `ifsteer.training.compete` is the package's function.
    competing = importlib.import_module("ifsteer.training.compete")
    monkeypatch.setattr(competing, "training_examples", pytest.fail)
    args = ["--instruction-id", "change_case:english_lowercase", "--layers", "1,99"]
    code, _, err = run(
        monkeypatch, capsys, "train", "--model", str(model_dir), *args, "--out", "v.safetensors"
    )
    assert code == 2 and "Traceback" not in err
    assert "layer 99 is out of range: the model has 0..3" in err


def test_a_vector_trained_at_several_layers_is_applied_at_all_of_them(
    monkeypatch, capsys, tmp_path, model_dir
):
    """`ifsteer train` writes its layers as one point, so `generate -v` (and eval, the server,
    the GGUF export) apply them together, each at its trained size, as training did."""
    home = tmp_path / "home"
    monkeypatch.setenv("IFSTEER_HOME", str(home))
    cache = home / "build" / "tiny" / f"answers-{ANSWER_TOKENS}.jsonl"
    cache.parent.mkdir(parents=True)
    answers = [{"query": q, "text": "The Answer Is Plain.", "finished": True} for q in
               extraction_queries()]  # fmt: skip
    cache.write_text("".join(json.dumps(a) + "\n" for a in answers))
    out = tmp_path / "lower.safetensors"
    lowercase = ["--instruction-id", "change_case:english_lowercase", "--layers", "1,3"]
    budget = ["--steps", "2", "--batch-size", "2", "--out", str(out)]
    code, _, err = run(monkeypatch, capsys, "train", "--model", str(model_dir), *lowercase, *budget)
    assert code == 0, err
    point = read_calibrated(out)
    assert point.method == "trained" and point.status == "unverified" and not point.recommended
    assert point.layers == (1, 3)
    assert [s.effective_weight for s in file_steerings(out)] == pytest.approx(
        [v.norm for v in point.vectors]
    )


def _no_model_may_load(*_args: object) -> None:
    raise AssertionError("a model loaded before the options were checked")


def test_vectors_list_shows_the_shipped_vectors_and_their_scores(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("IFSTEER_HOME", str(tmp_path))  # no group point cached on this machine
    code, stdout, _ = run(monkeypatch, capsys, "vectors", "list", "--json")
    assert code == 0
    rows = {row["instruction_id"]: row for row in json.loads(stdout)}
    title = rows["detectable_format:title"]
    assert title["status"] == "searched" and title["recommended"]
    assert title["score"] > title["no_steering_score"]
    assert all(row["status"] in ("searched", "verified", "pending") for row in rows.values())
    code, stdout, _ = run(monkeypatch, capsys, "vectors", "list")
    assert code == 0 and "detectable_format:title" in stdout


def test_a_points_short_form_reads_a_trained_vectors_size_per_layer():
    from ifsteer.cli.catalogue import _short_point

    assert _short_point("L22:projection:2:all", "mean_difference") == "L22 proj 2"
    assert _short_point("L18:additive:1:all", "trained") == "trained L18"
    assert _short_point("L14+18+22:additive:3:all", "trained") == "trained L14+18+22"
    assert _short_point("L14+18+22:additive:1.5:all", "trained") == "trained L14+18+22 0.5"
    assert _short_point("L1+3:additive:odd:generated", "trained") == "trained L1+3 odd gen"


def test_vectors_list_is_readable_in_80_columns(monkeypatch, capsys):
    from ifsteer.cli.app import out

    monkeypatch.setattr(out, "_width", 80)
    code, stdout, _ = run(monkeypatch, capsys, "vectors", "list", "--json")
    rows = json.loads(stdout)
    code, stdout, _ = run(monkeypatch, capsys, "vectors", "list")
    lines = stdout.splitlines()
    assert code == 0 and "…" not in stdout and max(len(line) for line in lines) <= 80
    for row in rows:  # every id whole, the score and the unsteered score on its line
        line = next(line for line in lines if line.startswith(row["instruction_id"] + " "))
        scores = [row["score"], row["no_steering_score"]]
        assert line.split()[-2:] == ["–" if v is None else f"{v:.2f}" for v in scores]
        assert ("trained" in line.split()) == (row["method"] == "trained")
    code, stdout, _ = run(monkeypatch, capsys, "vectors", "list", "--wide")
    assert code == 0 and "…" not in stdout and rows[0]["point"] in stdout
    assert rows[0]["status"] in stdout and rows[0]["method"] in stdout


def test_generate_steers_a_calibrated_file_at_its_whole_point(
    monkeypatch, capsys, tmp_path, model_dir
):
    """A vector trained at several layers jointly was validated at all of them; a file given
    by path must steer there, as the server and eval apply it, not at its first layer only."""
    lm = load_model(str(model_dir))
    instruction = get_instruction("detectable_format:title")
    pairs = build_pairs(instruction, 8, seed=0)
    vectors = extract_vectors(lm, pairs, [1, 3], instruction="t", instruction_id=instruction.id)
    point = Point((1, 3), "additive", 4.0)
    record = {"recommended": True, "point": point.key, "validation": {"score": 0.5}}
    path = write_calibrated(tmp_path / "title.safetensors", steerings_for(point, vectors), record)
    steered = generate_json(monkeypatch, capsys, model_dir, str(path), 8)["steered"]
    sampling = Sampling(max_new_tokens=8)
    whole = read_calibrated(path).steerings()
    first_only = whole[:1]
    assert steered == generate(lm, ["Plan a picnic."], steering=whole, sampling=sampling)[0].text
    assert (
        steered != generate(lm, ["Plan a picnic."], steering=first_only, sampling=sampling)[0].text
    )


def test_generate_refuses_an_instruction_that_ships_no_vector(monkeypatch, capsys):
    code, _, stderr = run(
        monkeypatch, capsys, "generate", "-p", "Hi.", "--instruction-id", "free:nothing"
    )
    assert code == 2 and "no calibrated vector ships" in stderr and "Traceback" not in stderr


def test_generate_refuses_options_it_would_not_honour_before_any_model_loads(monkeypatch, capsys):
    """A shipped file holds its point's layers only: --layer with --instruction-id alone used
    to be ignored without a word. No answer of zero tokens either, and no temperature that
    would decode greedily in silence (negative, NaN) or overflow float32."""
    monkeypatch.setattr("ifsteer.cli.steer.load", _no_model_may_load)
    args = ("-p", "Hi.", "--instruction-id", "change_case:english_lowercase", "--layer", "5")
    code, _, err = run(monkeypatch, capsys, "generate", *args)
    assert code == 2 and "Traceback" not in err
    assert "--layer moves --vector files" in err
    code, _, err = run(monkeypatch, capsys, "generate", *args[:4], "--max-new-tokens", "0")
    assert code == 2 and "--max-new-tokens must be at least 1" in err
    for temperature in ("-1", "nan", "1e-40", "3"):
        code, _, err = run(monkeypatch, capsys, "generate", *args[:4], "--temperature", temperature)
        assert code == 2 and "temperature must be 0 (greedy) or from 0.001 to 2" in err


@pytest.mark.parametrize("command", [["eval"], ["sweep", "vectors"]])
def test_no_answer_of_zero_tokens_is_asked_for_before_a_run_directory_exists(
    monkeypatch, capsys, tmp_path, command
):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    args = ["--data", "format", "--out", str(out_dir), "--max-new-tokens", "0"]
    code, _, err = run(monkeypatch, capsys, *command, *args)
    assert code == 2 and "--max-new-tokens must be at least 1" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_data_is_a_shipped_set_by_name_or_a_path(monkeypatch, capsys, tmp_path, model_dir):
    code, _, err = run(monkeypatch, capsys, "eval", "--data", "nope", "--out", str(tmp_path / "r"))
    assert code == 2 and "--data 'nope'" in err and "keywords-include" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    # the shipped format set by name: one row, unsteered, on the tiny model
    code, out, err = run(
        monkeypatch,
        capsys,
        "eval",
        "--data",
        "format",
        "--limit",
        "1",
        "--model",
        str(model_dir),
        "--settings",
        "no_instruction",
        "--max-new-tokens",
        "2",
        "--no-perplexity",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    response = json.loads((tmp_path / "r" / "responses.jsonl").read_text().splitlines()[0])
    assert response["setting"] == "no_instruction" and response["experiment"] == "format"


def test_eval_takes_vectors_or_the_shipped_ones_not_both(monkeypatch, capsys, tmp_path):
    code, _, err = run(
        monkeypatch,
        capsys,
        "eval",
        "--data",
        "format",
        "--shipped",
        "--vectors",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and "--vectors or --shipped" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command", [("serve",), ("eval",), ("extract",), ("vectors", "list"), ("run-paper",), ()]
)
def test_help_shows_what_a_user_types(monkeypatch, capsys, command):
    """Not typer's Python types (`<int>`, `<bool>`, `<list[str]>`): a flag takes nothing."""
    code, stdout, _ = run(monkeypatch, capsys, *command, "--help")
    assert code == 0 and "--help" in stdout
    assert not re.search(r"<(int|str|bool|float|path|list\[\w+\])>", stdout), stdout
    if command == ("serve",):
        assert re.search(r"--port\s+INTEGER", stdout) and re.search(r"--vectors\s+PATH", stdout)
        assert re.search(r"--allow-transfer\s+--no-allow-transfer\s+Apply", stdout)
        assert "ifsteer[vllm]" in stdout  # help text markup does not eat it
