"""`--backend` on `eval` and `sweep` (cli/backend.py), without vLLM: a bad backend, or vLLM
missing, is one line before anything loads; `--backend hf` runs the HF engine as before."""

from __future__ import annotations

import sys

import pytest

import ifsteer.cli.backend as backend_cli
from ifsteer.batcher import Batcher
from ifsteer.vectors import save_vectors
from tests.unit.test_cli import run
from tests.unit.test_evaluation import ifeval_row, write_jsonl
from tests.unit.test_vectors import make_vector

LOWER = "change_case:english_lowercase"


@pytest.fixture
def inputs(tmp_path):
    """Rows asking for lowercase, and a vector file serving them."""
    data = write_jsonl(tmp_path / "rows.jsonl", [ifeval_row(1), ifeval_row(2)])
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    save_vectors(vectors / "lower.safetensors", [make_vector(layer=1, instruction_id=LOWER)])
    return data, vectors


def _eval(data, vectors, tmp_path, *extra: str) -> list[str]:
    return [
        "eval",
        "--data",
        str(data),
        "--vectors",
        str(vectors),
        "--out",
        str(tmp_path / "run"),
        *extra,
    ]


def _sweep(data, vectors, *extra: str) -> list[str]:
    return ["sweep", str(vectors), "--data", str(data), *extra]


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_an_unknown_backend_is_one_line(monkeypatch, capsys, tmp_path, inputs, command):
    data, vectors = inputs
    args = _eval(data, vectors, tmp_path) if command == "eval" else _sweep(data, vectors)
    code, _, err = run(monkeypatch, capsys, *args, "--backend", "tgi")
    assert code == 2 and err == "error: unknown backend 'tgi'; choose hf or vllm\n"


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_without_vllm_the_runners_say_how_to_install_it(
    monkeypatch, capsys, tmp_path, inputs, command
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    data, vectors = inputs
    args = _eval(data, vectors, tmp_path) if command == "eval" else _sweep(data, vectors)
    code, _, err = run(monkeypatch, capsys, *args, "--backend", "vllm")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the vLLM backend needs vLLM") and "--with-vllm" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweeps").exists()


def test_bad_vllm_options_are_refused_before_vllm_is_looked_for(
    monkeypatch, capsys, tmp_path, inputs
):
    def unreachable():
        raise AssertionError("vLLM looked for")

    monkeypatch.setattr(backend_cli, "require_vllm_cli", unreachable)
    data, vectors = inputs
    for option in ("--kv-cache-gib", "--max-model-len", "--tensor-parallel-size"):
        code, _, err = run(
            monkeypatch, capsys, *_eval(data, vectors, tmp_path), "--backend", "vllm", option, "0"
        )
        assert code == 2 and err.count("\n") == 1 and option in err, err


def test_the_hf_backend_hands_the_runners_the_hf_engine(monkeypatch, tiny_lm):
    monkeypatch.setattr(backend_cli, "load", lambda model, dtype: tiny_lm)
    with backend_cli.runner_backend("hf", "tiny", "float32") as (lm, engine):
        assert (lm, engine) == (tiny_lm, Batcher)


def _no_model_may_load(*_args: object) -> None:
    raise AssertionError("a model loaded before the backend was checked")


@pytest.mark.parametrize(
    ("backend", "message"),
    [("tgi", "error: unknown backend 'tgi'"), ("vllm", "error: the vLLM backend needs vLLM")],
)
def test_vectors_build_checks_its_backend_before_any_model_loads(
    monkeypatch, capsys, tmp_path, backend, message
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setattr("ifsteer.cli.train.load", _no_model_may_load)
    monkeypatch.setattr("ifsteer.cli.backend.load", _no_model_may_load)
    work = tmp_path / "work"
    args = ("vectors", "build", "--work", str(work), "--out", str(tmp_path / "out"))
    code, _, err = run(monkeypatch, capsys, *args, "--backend", backend, "--early-stop")
    assert code == 2 and err.count("\n") == 1 and err.startswith(message), err
    assert not work.exists() and not (tmp_path / "out").exists()


def test_vectors_build_passes_its_engine_and_early_stop_to_the_builder(
    monkeypatch, capsys, tmp_path, tiny_lm
):
    import ifsteer.shipped.build as build

    made = []

    class Recorder(build.Builder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def run(self, *args, **kwargs):
            pass

    monkeypatch.setattr(build, "Builder", Recorder)
    monkeypatch.setattr("ifsteer.cli.backend.load", lambda *_a: tiny_lm)
    args = ("vectors", "build", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
    code, _, err = run(monkeypatch, capsys, *args, "--judge", "none", "--early-stop")
    assert code == 0, err
    (builder,) = made
    assert builder.engine is Batcher and builder.early_stop and builder.setting == ".early"
