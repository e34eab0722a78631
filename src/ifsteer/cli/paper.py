"""`ifsteer run-paper`: the paper's format experiment end to end (ifsteer.pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ifsteer.cli.app import (
    BatchOption,
    DtypeOption,
    ModelOption,
    ThreadsOption,
    app,
    check_batch_size,
    load,
    out,
    set_threads,
)
from ifsteer.datasets import resolve_data
from ifsteer.errors import InvalidSteering


@app.command("run-paper")
def run_paper_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory (resumable).")],
    data: Annotated[
        str,
        typer.Option(help="IFEval's format set (shipped as 'format') or a jsonl of your own."),
    ] = "format",
    model: ModelOption = "smollm2-135m-instruct",
    limit: Annotated[
        int, typer.Option(help="Evaluation rows, spread over all instructions; 0 = all.")
    ] = 24,
    sweep_prompts: Annotated[
        int,
        typer.Option(help="Validation prompts per instruction (from our own queries)."),
    ] = 10,
    layer_step: Annotated[
        int,
        typer.Option(help="Sweep every Nth layer of range(L//5, L), aligned on L-4 (paper: 2)."),
    ] = 8,
    max_new_tokens: int = 256,
    batch_size: BatchOption = None,
    n_pairs: Annotated[int, typer.Option(help="Prompt pairs per vector.")] = 16,
    with_instruction: Annotated[
        bool, typer.Option(help="Sweep with the instruction text in the prompt.")
    ] = False,
    perplexity: Annotated[
        bool,
        typer.Option(
            help="Also score answers' perplexity under the model (slower; flags "
            "ppl < 2.5 as degenerate)."
        ),
    ] = False,
    dtype: DtypeOption = "float32",
    threads: ThreadsOption = None,
) -> None:
    """The paper's format experiment end to end: extract, sweep, evaluate, report.

    The defaults are a quick run (24 evaluation rows, 3 sweep layers); the plan it prints says
    how long it will take and names the paper-sized command.
    """
    import logging
    import time

    from ifsteer.pipeline import PaperConfig, plan_run, preview, run_paper
    from ifsteer.progress import RichStages

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    check_batch_size(batch_size)
    set_threads(threads)
    if limit < 0 or sweep_prompts < 0 or max_new_tokens < 1 or n_pairs < 1:
        raise InvalidSteering("--limit and --sweep-prompts must be ≥ 0, the other sizes ≥ 1")
    config = PaperConfig(
        data=resolve_data(data),
        out=out_dir,
        model=model,
        limit=limit or None,
        sweep_prompts=sweep_prompts,
        layer_step=layer_step,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        n_pairs=n_pairs,
        with_instruction=with_instruction,
        perplexity=perplexity,
        dtype=dtype,
    )
    started = time.perf_counter()
    lm = load(model, dtype)
    plan = plan_run(config, lm.n_layers)
    estimates, text = preview(config, plan, lm)
    out.print(text)
    stages = RichStages()
    stages.start(estimates)
    try:
        report = run_paper(lm, config, stages=stages, plan=plan)
    finally:
        stages.stop()
    took = time.perf_counter() - started
    estimated = sum(estimates.values())
    out.print(f"done in {took / 60:.1f} min (estimated: {estimated / 60:.1f} min); open {report}")
