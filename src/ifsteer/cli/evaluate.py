"""`ifsteer eval`, `ifsteer sweep` and `ifsteer report`: measure, calibrate, look.

Each command parses its options and calls the library: rows from `ifsteer.rows`, the loop from
`ifsteer.evaluation`, sweeps from `ifsteer.calibration`, tables and figures from
`ifsteer.report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from ifsteer.cli.app import (
    BatchOption,
    DtypeOption,
    ModelOption,
    ThreadsOption,
    app,
    check_batch_size,
    check_max_new_tokens,
    csv_floats,
    csv_ints,
    load,
    out,
    print_table,
    set_threads,
)
from ifsteer.cli.backend import (
    BackendOption,
    EnforceEagerOption,
    KvCacheOption,
    MaxModelLenOption,
    TensorParallelOption,
    check_backend,
    runner_backend,
)
from ifsteer.datasets import resolve_data
from ifsteer.errors import InvalidSteering

T = TypeVar("T")


def _eval_assignments(
    values: list[str] | None, option: str, cast: Callable[[str], T], value: str
) -> dict[str, T]:
    """`ID=VALUE` options (ID may be a glob such as `keywords:*`) into a dict; `value` says
    what VALUE may be."""
    parsed: dict[str, T] = {}
    for item in values or []:
        key, sep, raw = item.rpartition("=")
        try:
            if not sep or not key:
                raise ValueError
            parsed[key] = cast(raw)
        except ValueError:
            raise InvalidSteering(f"{option} takes ID=VALUE, VALUE {value}; got {item!r}") from None
    return parsed


def _eval_finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError
    return value


def _eval_mode(text: str) -> str:
    from ifsteer.instructions import MODES

    if text not in MODES:
        raise ValueError
    return text


@app.command("eval")
def eval_command(
    data: Annotated[
        str,
        typer.Option(
            help="A shipped set (format, keywords-include, keywords-exclude, ifeval, ...) or an "
            "IFEval-format jsonl: prompt, prompt_without_instruction, instruction_id_list, kwargs."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Run directory (responses.jsonl, summary.json); rerun into it to resume.",
        ),
    ],
    vectors: Annotated[
        Path | None, typer.Option(help="Directory of vector files, matched by instruction id.")
    ] = None,
    shipped: Annotated[
        bool,
        typer.Option(
            help="Steer with the calibrated vectors that ship for --model, where their search "
            "recommends steering; the other rows run unsteered, as in the paper."
        ),
    ] = False,
    model: ModelOption = "smollm2-135m-instruct",
    experiment: Annotated[
        str,
        typer.Option(
            help="format | keywords_include | keywords_exclude | length | composition | transfer."
        ),
    ] = "format",
    settings: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of no_instruction,steer,instruction,"
            "instruction_steer (default: all four)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    max_new_tokens: int = 256,
    batch_size: BatchOption = None,
    allow_transfer: Annotated[
        bool, typer.Option(help="Accept vectors of another model with the same hidden size.")
    ] = False,
    weight: Annotated[
        list[str] | None,
        typer.Option(
            help="ID=W: weight override by vector id or glob (repeatable); excluded words get -W."
        ),
    ] = None,
    mode: Annotated[
        list[str] | None, typer.Option(help="ID=projection|additive override (repeatable).")
    ] = None,
    perplexity: Annotated[
        bool, typer.Option(help="Score each response's perplexity (unsteered).")
    ] = True,
    fluency_model: Annotated[
        str | None,
        typer.Option(
            help="Score perplexity under this model instead (e.g. gemma-3-270m); "
            "only then does perplexity < 2.5 flag a response as degenerate."
        ),
    ] = None,
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint of an LLM quality judge.")
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help="Model name to ask the judge for.")
    ] = None,
    judge_api_key: Annotated[
        str | None, typer.Option(envvar="IFSTEER_JUDGE_API_KEY", help="Bearer token for the judge.")
    ] = None,
    dtype: DtypeOption = "float32",
    threads: ThreadsOption = None,
    backend: BackendOption = "hf",
    tensor_parallel_size: TensorParallelOption = 1,
    max_model_len: MaxModelLenOption = None,
    kv_cache_gib: KvCacheOption = None,
    enforce_eager: EnforceEagerOption = False,
) -> None:
    """Evaluate the four settings (no instruction, steer, instruction, instruction + steer).

    `--backend vllm` generates on vLLM (the HF model on the side checks vectors and scores
    perplexity); the run directory is the same."""
    check_batch_size(batch_size)
    check_max_new_tokens(max_new_tokens)
    check_backend(backend)
    set_threads(threads)
    import logging

    from ifsteer.evaluation import count_pending, run_evaluation
    from ifsteer.generation import Sampling
    from ifsteer.progress import progress_bar
    from ifsteer.quality import Judge
    from ifsteer.report.tables import paper_table, settings_table
    from ifsteer.rows import SETTINGS, load_rows, prepare_rows
    from ifsteer.vectors import load_vector_directory

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    chosen = [s.strip() for s in settings.split(",") if s.strip()] if settings else list(SETTINGS)
    if (judge_url is None) != (judge_model is None):
        raise InvalidSteering("give --judge-url and --judge-model together")
    judge = None if judge_url is None else Judge(judge_url, str(judge_model), judge_api_key)
    weights = _eval_assignments(weight, "--weight", _eval_finite, "a finite number")
    modes = _eval_assignments(mode, "--mode", _eval_mode, "projection or additive")
    rows = prepare_rows(load_rows(resolve_data(data), limit), experiment)
    if shipped and vectors is not None:
        raise InvalidSteering("give --vectors or --shipped, not both")
    found = load_vector_directory(vectors) if vectors is not None else None
    if shipped:
        from ifsteer.shipped import recommended_files

        found = recommended_files(model)
        out.print(
            f"steering with {len(found)} shipped vectors their search recommends: "
            + ", ".join(sorted(found))
        )
    pending = count_pending(out_dir, rows, experiment=experiment, settings=chosen)
    with (
        runner_backend(
            backend,
            model,
            dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager,
        ) as (lm, engine),
        progress_bar(f"eval {experiment}", pending) as advance,
    ):
        scorer = load(fluency_model, dtype) if fluency_model and perplexity else None
        summary = run_evaluation(
            lm,
            rows,
            found,
            out_dir,
            settings=chosen,
            experiment=experiment,
            sampling=Sampling(max_new_tokens=max_new_tokens),
            batch_size=batch_size,
            allow_transfer=allow_transfer,
            weights=weights,
            modes=modes,  # type: ignore[arg-type]
            judge=judge,
            perplexity=perplexity,
            fluency_lm=scorer,
            progress=advance,
            engine=engine,
        )
    if summary.missing_vectors:
        out.print(
            f"[yellow]no vector file for {len(summary.missing_vectors)} ids "
            f"({', '.join(summary.missing_vectors)}): those rows ran unsteered[/yellow]"
        )
    for table in (settings_table(summary.data, experiment), paper_table(summary.data, experiment)):
        if table is not None:
            print_table(table)
    out.print(
        f"{summary.generated} new responses, {summary.skipped} already on disk; "
        f"wrote {summary.responses_path} and {summary.summary_path}"
    )


@app.command("sweep")
def sweep_command(
    vectors: Annotated[
        Path, typer.Argument(help="A vector file, or a directory of them (one sweep each).")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Validation rows: a shipped set's name or an IFEval-format jsonl; the first "
            "--n-prompts rows of each instruction are used."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where sweep JSON/PNG go (default: sweeps/ next to the vectors)."
        ),
    ] = None,
    instruction_id: Annotated[
        str | None, typer.Option(help="Sweep only this instruction (IFEval id).")
    ] = None,
    n_prompts: Annotated[int, typer.Option(help="Validation prompts per instruction.")] = 4,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers (default: range(L//5, L, 2)).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated weights: a layer × weight grid (additive vectors)."),
    ] = None,
    with_instruction: Annotated[
        bool, typer.Option(help="Keep the instruction text in the prompt while sweeping.")
    ] = False,
    set_default: Annotated[
        bool, typer.Option(help="Write the winning layer/weight as the file's default.")
    ] = True,
    perplexity: Annotated[
        bool, typer.Option(help="Also flag answers the model finds too predictable (ppl < 2.5).")
    ] = False,
    model: ModelOption = "smollm2-135m-instruct",
    max_new_tokens: int = 128,
    batch_size: BatchOption = None,
    dtype: DtypeOption = "float32",
    threads: ThreadsOption = None,
    backend: BackendOption = "hf",
    tensor_parallel_size: TensorParallelOption = 1,
    max_model_len: MaxModelLenOption = None,
    kv_cache_gib: KvCacheOption = None,
    enforce_eager: EnforceEagerOption = False,
) -> None:
    """Choose each vector's layer (and weight) on validation prompts; write it into the file.

    `--backend vllm` generates on vLLM; the choice and the files written are the same."""
    check_batch_size(batch_size)
    check_max_new_tokens(max_new_tokens)
    check_backend(backend)
    set_threads(threads)
    from ifsteer.calibration import calibrate_groups, validation_groups
    from ifsteer.generation import Sampling
    from ifsteer.progress import progress_bar
    from ifsteer.report import plot_sweep
    from ifsteer.report.tables import sweep_table
    from ifsteer.rows import load_rows
    from ifsteer.rundir import SWEEPS
    from ifsteer.vectors import default_layers, load_vector_files

    if data is None:
        raise InvalidSteering(
            "give --data NAME|PATH: validation rows in IFEval format, e.g. "
            "--data inclusion-validation (keywords) or a jsonl of your own"
        )
    if n_prompts < 1:
        raise InvalidSteering("--n-prompts must be at least 1")
    files = load_vector_files(vectors)
    groups = validation_groups(load_rows(resolve_data(data)), files, n_prompts, instruction_id)
    if not groups:
        raise InvalidSteering(
            f"no row of {data} has an instruction served by the vectors in {vectors} "
            f"({', '.join(sorted(files))})"
        )
    grid_layers = csv_ints(layers)
    grid_weights = csv_floats(weights, "--weights")
    target = out_dir or (vectors if vectors.is_dir() else vectors.parent).parent / SWEEPS
    sampling = Sampling(max_new_tokens=max_new_tokens)
    label = next(iter(groups)) if len(groups) == 1 else f"{len(groups)} groups"
    with runner_backend(
        backend,
        model,
        dtype,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        enforce_eager=enforce_eager,
    ) as (lm, engine):
        n_points = 1 + len(grid_layers or default_layers(lm.n_layers)) * len(grid_weights or [None])
        total = sum(len(rows) for rows in groups.values()) * n_points
        with progress_bar(f"sweep {label}", total) as advance:
            done = calibrate_groups(
                lm,
                files,
                dict(sorted(groups.items())),
                target,
                weights=grid_weights,
                set_default=set_default,
                layers=grid_layers,
                with_instruction=with_instruction,
                sampling=sampling,
                batch_size=batch_size,
                perplexity=perplexity,
                progress=advance,
                engine=engine,
            )
    for group, (result, updated, written) in done.items():
        plot_sweep(result.to_json(), written.with_suffix(".png"))
        print_table(sweep_table(result), simple=False)
        layer, weight = result.chosen.point.coordinates
        verdict = (
            f"layer {layer}" + ("" if weight is None else f", weight {weight:g}")
            if result.recommended
            else "no steering: no layer beat the unsteered model (recorded as not recommended)"
        )
        out.print(f"{group}: {verdict}; updated {len(updated)} vector file(s), wrote {written}")


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with summary.json.")],
) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/figures/*.png."""
    from ifsteer.report import render_report

    with out.status("rendering report…"):
        path = render_report(run_dir)
    out.print(f"wrote {path}")
