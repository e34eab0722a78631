"""`ifsteer train` (a trained vector for one instruction) and `ifsteer vectors build` (the
calibrated vectors that ship: search, verify, and the paper's vector against a trained one)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from ifsteer.cli.app import (
    DtypeOption,
    ModelOption,
    ThreadsOption,
    app,
    csv_floats,
    csv_ints,
    load,
    out,
    set_threads,
    vectors_app,
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
from ifsteer.errors import InvalidSteering

LayersOption = Annotated[
    str, typer.Option(help="Comma-separated layers trained jointly, e.g. 18 or 14,18.")
]

LossOption = Annotated[
    str,
    typer.Option(
        help="likelihood (of the targets) | preference (the targets over the answers a rule "
        "rewrote; rule targets only)."
    ),
]


@app.command()
def train(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Vector file to write.")],
    instruction_id: Annotated[
        str | None, typer.Option(help="Catalogue id (see `ifsteer instructions`).")
    ] = None,
    instruction: Annotated[
        str | None, typer.Option(help="Free-text instruction (trained by self-distillation).")
    ] = None,
    model: ModelOption = "smollm2-135m-instruct",
    layers: LayersOption = "18",
    targets: Annotated[
        str, typer.Option(help="rule | distill | auto (rule where one exists, else distill).")
    ] = "auto",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 60,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 0.05,
    max_target_tokens: Annotated[
        int, typer.Option(help="Target tokens kept per example (its start).")
    ] = 64,
    max_norm_ratio: Annotated[
        float, typer.Option(help="Cap on the vector's norm, as a share of the residual norm.")
    ] = 0.5,
    loss: LossOption = "likelihood",
    seed: int = 0,
    threads: ThreadsOption = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Train an additive steering vector with the model frozen (docs/method.md)."""
    from ifsteer.calibration.point import FILE_WEIGHT, Point, steerings_for
    from ifsteer.instructions import custom_instruction, get_instruction
    from ifsteer.paths import build_home
    from ifsteer.progress import progress_bar
    from ifsteer.training import TrainConfig, train_vectors
    from ifsteer.training.compete import check_targets, training_examples
    from ifsteer.training.objective import check_loss
    from ifsteer.training.train import METHOD, check_layers
    from ifsteer.vectors import save_vectors
    from ifsteer.vectors.records import point_record, write_calibration

    if (instruction is None) == (instruction_id is None):
        raise InvalidSteering("give exactly one of --instruction-id and --instruction")
    check_loss(loss)  # before the model loads: a typo costs a second, not a minute
    check_targets(targets)
    if min(steps, batch_size, max_target_tokens) < 1 or not lr > 0 or not max_norm_ratio > 0:
        raise InvalidSteering(
            "--steps, --batch-size, --lr, --max-target-tokens and --max-norm-ratio must be positive"
        )
    spec = get_instruction(instruction_id) if instruction_id else custom_instruction(instruction)
    config = TrainConfig(
        layers=tuple(csv_ints(layers) or []),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        max_target_tokens=max_target_tokens,
        max_norm_ratio=max_norm_ratio,
        loss=loss,
        seed=seed,
    )
    if not config.layers:
        raise InvalidSteering("--layers needs at least one layer")
    set_threads(threads)
    lm = load(model, dtype)
    check_layers(lm, config.layers)  # before the answers, which take minutes on a new machine
    examples = training_examples(
        lm, spec, build_home(lm.model_id), targets=targets, bars=progress_bar
    )
    started = time.perf_counter()
    with progress_bar(f"training {spec.id}", config.steps) as advance:
        trained = train_vectors(lm, spec, examples, config, progress=advance)
    vectors = list(trained.vectors.values())
    if len(vectors) == 1:
        save_vectors(out_path, vectors)  # read plainly, it is its point; a sweep may move it
    else:
        # Layers trained jointly are one vector: recorded as one point, unverified (no
        # validation ran), so that every reader of a file given by path (generate, eval, the
        # server, the GGUF export) applies them together, each at its trained size.
        point = Point(tuple(trained.vectors), "additive", weight=FILE_WEIGHT)
        record = point_record(
            status="unverified",
            recommended=False,
            point=point.key,
            mode="additive",
            scale=None,
            validation=None,
            paper_targets={},
            method=METHOD,
        )
        write_calibration(out_path, steerings_for(point, trained.vectors), record)
    curve = trained.record["loss"]
    out.print(
        f"wrote {out_path}: layers {list(trained.vectors)}, {len(examples)} examples "
        f"({trained.record['targets']}), held-out loss {curve['held_out_unsteered']:.3f} -> "
        f"{curve['held_out_best']:.3f} (step {trained.record['best_step']}), "
        f"{(time.perf_counter() - started) / 60:.1f} min"
    )


@vectors_app.command("build")
def vectors_build(
    model: ModelOption = "smollm2-135m-instruct",
    judge: Annotated[str, typer.Option(help="Perplexity model; 'none' to skip.")] = "gemma-3-270m",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Vector folder (default: the package's).")
    ] = None,
    work: Annotated[Path | None, typer.Option(help="Response logs (default: the cache).")] = None,
    groups: Annotated[str, typer.Option(help="Comma-separated groups, in order.")] = (
        "language,format,keywords,length"
    ),
    only: Annotated[str, typer.Option(help="Comma-separated instruction ids.")] = "",
    n_prompts: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    quick: Annotated[
        bool, typer.Option(help="Search one instruction per group, verify the rest.")
    ] = False,
    layers: Annotated[str | None, typer.Option(help="Stage-1 layers (default: every 4th).")] = None,
    projection_scales: Annotated[
        str | None, typer.Option(help="Stage-2 target scales (default 2,4).")
    ] = None,
    additive_scales: Annotated[
        str | None, typer.Option(help="Stage-2 additive scales (default 1,2).")
    ] = None,
    pending_only: Annotated[
        bool, typer.Option(help="Only extract the files not yet written.")
    ] = False,
    layers_only: Annotated[bool, typer.Option(help="Stage 1 of the search only.")] = False,
    trained: Annotated[
        bool,
        typer.Option(
            help="Then train a vector per instruction (keywords: per validation word, as a "
            "class); the better method ships. A rerun with other --train-* settings retries "
            "the instructions the trained vector lost."
        ),
    ] = False,
    train_layers: LayersOption = "18",
    train_steps: int = 60,
    train_lr: float = 0.05,
    train_max_target_tokens: int = 64,
    train_loss: LossOption = "likelihood",
    threads: ThreadsOption = None,
    early_stop: Annotated[
        bool,
        typer.Option(
            help="Stop a steered validation answer once its check has failed for good (no "
            "score changes; logged apart from answers run to the end)."
        ),
    ] = False,
    backend: BackendOption = "hf",
    tensor_parallel_size: TensorParallelOption = 1,
    max_model_len: MaxModelLenOption = None,
    kv_cache_gib: KvCacheOption = None,
    enforce_eager: EnforceEagerOption = False,
) -> None:
    """Rebuild calibrated vectors (seeded, resumable: rerun the same command to continue).

    `--backend vllm` makes the validation answers on vLLM (extraction, training and the judge
    stay on the HF model); its answers are logged apart from the HF engine's."""
    from dataclasses import replace

    from ifsteer.paths import build_home
    from ifsteer.progress import progress_bar
    from ifsteer.shipped import shipped_dir
    from ifsteer.shipped.build import GROUPS, Builder
    from ifsteer.training import TrainConfig
    from ifsteer.training.objective import check_loss

    check_loss(train_loss)
    if min(train_steps, train_max_target_tokens) < 1 or not train_lr > 0:
        raise InvalidSteering(
            "--train-steps, --train-lr and --train-max-target-tokens must be positive"
        )
    chosen = [g for g in groups.split(",") if g]
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown:
        raise InvalidSteering(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    ids = [i for i in only.split(",") if i]
    _check_only(chosen, ids)
    check_backend(backend)
    set_threads(threads)
    with runner_backend(
        backend,
        model,
        "float32",
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        enforce_eager=enforce_eager,
    ) as (lm, engine):
        judge_lm = None if judge == "none" else load(judge, "float32")
        builder = Builder(
            lm,
            judge_lm,
            out_dir or shipped_dir(lm.model_id),
            work or build_home(lm.model_id),
            n_prompts=n_prompts,
            seed=seed,
            batch_size=batch_size,
            bars=progress_bar,
            engine=engine,
            backend=backend,
            early_stop=early_stop,
        )
        space = builder.space
        if layers:
            space = replace(space, layers=tuple(csv_ints(layers) or ()))
        if projection_scales is not None:
            space = replace(
                space, projection_scales=tuple(csv_floats(projection_scales, "--projection-scales"))
            )
        if additive_scales is not None:
            space = replace(
                space, additive_scales=tuple(csv_floats(additive_scales, "--additive-scales"))
            )
        if layers_only:
            space = replace(
                space, projection_scales=(), additive_scales=(), multi_layer=0, try_generated=False
            )
        builder.space = space
        builder.run(chosen, ids, quick=quick, pending_only=pending_only)
        if trained:
            config = TrainConfig(
                layers=tuple(csv_ints(train_layers) or ()),
                steps=train_steps,
                lr=train_lr,
                max_target_tokens=train_max_target_tokens,
                loss=train_loss,
            )
            builder.trained(chosen, ids, config)


def _check_only(groups: Sequence[str], only: Sequence[str]) -> None:
    """`Builder.run` keeps the ids of `only` that its groups hold and drops the rest: a
    mistyped id would build nothing and say nothing, so it is refused before the model loads."""
    from ifsteer.shipped.build import KEYWORD_CLASS, group_ids

    known = {i for g in groups if g != "keywords" for i in group_ids(g)}
    if "keywords" in groups:
        known.add(KEYWORD_CLASS)
    unknown = [i for i in only if i not in known]
    if unknown:
        words = any(i.startswith(f"{KEYWORD_CLASS}:") for i in unknown)
        hint = f" (the keyword words build as one class: --only {KEYWORD_CLASS})" if words else ""
        raise InvalidSteering(
            f"--only {', '.join(unknown)}: not an id of the groups {', '.join(groups)}{hint}"
        )
