"""`ifsteer serve`: the OpenAI-compatible server (ifsteer.server, ifsteer.backends)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ifsteer.cli.app import DtypeOption, ModelOption, app, model_id_of, out
from ifsteer.cli.app import load as _load
from ifsteer.cli.backend import (
    BackendOption,
    EnforceEagerOption,
    KvCacheOption,
    MaxModelLenOption,
    TensorParallelOption,
    check_backend,
    vllm_settings,
)

if TYPE_CHECKING:
    from ifsteer.server import Limits


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
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="A host name loopback clients may send besides localhost (a local reverse "
            "proxy's public name); repeatable.",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="IFSTEER_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="hf only: most requests decoded together (continuous batch).")
    ] = 32,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted.")] = 4096,
    max_request_prompt_tokens: Annotated[
        int, typer.Option(help="Prompt tokens of one request, all its prompts together.")
    ] = 8192,
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
    backend: BackendOption = "hf",
    tensor_parallel_size: TensorParallelOption = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(help="vLLM only: pipeline stages.")] = 1,
    max_model_len: MaxModelLenOption = None,
    kv_cache_gib: KvCacheOption = None,
    enforce_eager: EnforceEagerOption = False,
    dtype: DtypeOption = "float32",
) -> None:
    """Serve an OpenAI-compatible API whose requests can carry a `steering` field.

    Under vLLM the context defaults to the prompt + max_tokens limits."""
    check_backend(backend)
    from ifsteer.server import Limits, build_app, create_app, is_loopback, load_vector_dir
    from ifsteer.server import serve as run_server

    named = load_vector_dir(vectors) if vectors else {}
    limits = Limits(
        max_prompt_tokens=max_prompt_tokens,
        max_request_prompt_tokens=max_request_prompt_tokens,
        max_tokens=max_tokens_limit,
        max_queued=max_queued,
        request_timeout_s=request_timeout,
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
            allowed_hosts=allow_host or (),
        )
    else:
        engine = vllm_engine(
            model,
            dtype=dtype,
            limits=limits,
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            extract_pairs=extract_pairs,
        )
        application = build_app(
            engine,
            named,
            api_key=api_key,
            limits=limits,
            allow_transfer=allow_transfer,
            allowed_hosts=allow_host or (),
        )
    if not is_loopback(host) and not api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    from ifsteer.shipped import shipped_ids

    shipped = len(shipped_ids(model_id_of(model)))
    out.print(
        f"serving on http://{host}:{port}/v1 with {len(named)} vectors "
        f"({', '.join(sorted(named)) or 'none'}) and {shipped} calibrated points that ship for "
        "the model (steering by instruction_id)"
    )
    run_server(application, host=host, port=port)


def vllm_engine(model: str, *, limits: Limits, **settings: Any) -> Any:
    """A `VLLMEngine` for `--backend vllm` (`backend.vllm_settings`), with a context just long
    enough for the server's limits."""
    context = limits.max_prompt_tokens + limits.max_tokens
    resolved = vllm_settings(model, context=context, **settings)
    from ifsteer.backends.vllm import VLLMEngine

    return VLLMEngine(**resolved)
