"""`ifsteer extract` and `ifsteer generate`: make a vector, then steer with it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ifsteer.cli.app import (
    BatchOption,
    DtypeOption,
    ModelOption,
    app,
    check_batch_size,
    check_max_new_tokens,
    check_mode,
    csv_ints,
    load,
    model_id_of,
    out,
)
from ifsteer.errors import InvalidSteering


@app.command()
def extract(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Vector file to write.")],
    instruction: Annotated[
        str | None, typer.Option(help="Instruction text (free text, or one more phrasing).")
    ] = None,
    instruction_id: Annotated[
        str | None, typer.Option(help="Catalogue id (see `ifsteer instructions`).")
    ] = None,
    model: ModelOption = "smollm2-135m-instruct",
    layer: Annotated[int | None, typer.Option(help="Default layer stored in the file.")] = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers to extract (default: paper grid).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="Default mode: projection | additive.")] = None,
    n_pairs: Annotated[int, typer.Option(help="Prompt pairs (with / without).")] = 64,
    queries: Annotated[
        Path | None, typer.Option(help="Base queries: text file or jsonl (default: ours).")
    ] = None,
    batch_size: int = 16,
    dtype: DtypeOption = "float32",
) -> None:
    """Extract an instruction's steering vector from prompt pairs with and without it."""
    from ifsteer.instructions import custom_instruction, get_instruction
    from ifsteer.progress import progress_bar
    from ifsteer.prompts import BASE_QUERIES, load_queries
    from ifsteer.vectors import default_layer, default_layers, extract_instruction, save_vectors

    spec = _instruction(instruction, instruction_id, mode, custom_instruction, get_instruction)
    lm = load(model, dtype)
    wanted = csv_ints(layers) or default_layers(lm.n_layers)
    chosen = default_layer(lm.n_layers) if layer is None else layer
    wanted = sorted({*wanted, chosen})
    base = load_queries(queries) if queries else BASE_QUERIES
    with progress_bar(f"extract {spec.id}", 2 * n_pairs) as advance:
        vectors = extract_instruction(
            lm,
            spec,
            wanted,
            n_pairs=n_pairs,
            queries=base,
            batch_size=batch_size,
            progress=advance,
        )
    save_vectors(out_path, list(vectors.values()), default=chosen)
    v = vectors[chosen]
    out.print(
        f"wrote {out_path}: {spec.id} on {lm.model_id}, layers {wanted}, default layer {chosen} "
        f"({v.mode}, weight {v.weight:.3g}, ‖u‖={v.norm:.3g}, c̄={v.target:.3g})"
    )


def _instruction(
    text: str | None,
    instruction_id: str | None,
    mode: str | None,
    custom: Callable[..., Any],
    lookup: Callable[[str], Any],
) -> Any:
    """Catalogue phrasings when the id is known, plus the user's text as the first phrasing."""
    from dataclasses import replace

    from ifsteer.errors import UnknownInstruction

    if text is None and instruction_id is None:
        raise InvalidSteering("give --instruction TEXT, --instruction-id ID, or both")
    known = None
    if instruction_id is not None:
        try:
            known = lookup(instruction_id)
        except UnknownInstruction:
            if text is None:
                raise
    if known is None:
        spec = custom(text, instruction_id, mode or "projection")
    elif text is None:
        spec = known
    else:
        rest = tuple(p for p in known.phrasings if p != text)
        spec = replace(known, phrasings=(text, *rest))
    if mode is not None:
        spec = replace(spec, mode=check_mode(mode))
    return spec


def parse_vector_spec(spec: str) -> tuple[str, str | None, float | None]:
    """`PATH[:mode[:weight]]` (also `PATH:weight`) into its parts."""
    from ifsteer.instructions import MODES

    parts = spec.split(":")
    path, mode, weight = parts[0], None, None
    for part in parts[1:]:
        if part in MODES:
            mode = part
            continue
        try:
            weight = float(part)
        except ValueError:
            raise InvalidSteering(
                f"cannot read {spec!r}: expected PATH[:projection|additive[:WEIGHT]]"
            ) from None
        if not math.isfinite(weight):
            raise InvalidSteering(f"weight in {spec!r} must be finite")
    return path, mode, weight


@app.command()
def generate(
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompt text (repeatable).")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts, one a line (or jsonl with 'prompt').")
    ] = None,
    vector: Annotated[
        list[str] | None,
        typer.Option(
            "--vector",
            "-v",
            help="PATH[:mode[:weight]] (repeatable; vectors compose). A calibrated file steers "
            "at its point, every layer of it, unless a mode, a weight or --layer is given.",
        ),
    ] = None,
    layer: Annotated[
        int | None,
        typer.Option(
            help="Apply every --vector file at this layer (a shipped --instruction-id file "
            "holds its point's layers only)."
        ),
    ] = None,
    instruction_id: Annotated[
        list[str] | None,
        typer.Option(
            "--instruction-id",
            "-i",
            help="Steer with the calibrated vector that ships for this id (repeatable).",
        ),
    ] = None,
    no_steer: Annotated[bool, typer.Option("--no-steer", help="Unsteered only.")] = False,
    baseline: Annotated[
        bool, typer.Option(help="Show the unsteered answer next to the steered one.")
    ] = True,
    model: ModelOption = "smollm2-135m-instruct",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    batch_size: BatchOption = None,
    allow_transfer: Annotated[
        bool, typer.Option(help="Apply vectors extracted from another model of equal size.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Add each answer's IFEval verdict for --instruction-id.")
    ] = False,
    dtype: DtypeOption = "float32",
) -> None:
    """Generate with steering vectors, next to the unsteered answer.

    `--instruction-id` steers with the calibrated vector that ships for the model, so no
    extraction is needed; `ifsteer vectors list` shows which ship.
    """
    from ifsteer.generation import Sampling
    from ifsteer.generation import generate as run
    from ifsteer.progress import progress_bar
    from ifsteer.prompts import load_queries
    from ifsteer.sampling import check_temperature
    from ifsteer.shipped import file_steerings
    from ifsteer.steering import check_steering

    check_batch_size(batch_size)
    check_max_new_tokens(max_new_tokens)
    check_temperature(temperature)
    texts = list(prompt or []) + (load_queries(prompts_file) if prompts_file else [])
    if not texts:
        raise InvalidSteering("give at least one --prompt or a --prompts-file")
    if layer is not None and not vector:
        raise InvalidSteering(
            "--layer moves --vector files; an --instruction-id steers at its calibrated point"
        )
    steering = []
    for spec in [] if no_steer else vector or []:
        path, mode, weight = parse_vector_spec(spec)
        steering += file_steerings(path, layer, mode, weight)  # type: ignore[arg-type]
    found = [] if no_steer else _points(model, instruction_id or [])  # before a slow load
    lm = load(model, dtype)
    for shipped_id, point in found:
        steering += _calibrated(lm, shipped_id, point).steerings()
    check_steering(lm, steering, allow_transfer=allow_transfer)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    runs = {"steered": steering} if steering else {}
    if not steering or baseline:
        runs = {"unsteered": [], **runs}
    results = {}
    with progress_bar("generate", len(texts) * len(runs)) as advance:
        for name, steer_with in runs.items():
            results[name] = run(
                lm,
                texts,
                steering=steer_with,
                sampling=sampling,
                batch_size=batch_size,
                allow_transfer=allow_transfer,
                progress=advance,
            )
    answers = {name: [c.text for c in completions] for name, completions in results.items()}
    verdicts = _verdicts(instruction_id or [], texts, answers) if check else {}
    _show_generations(texts, answers, verdicts, as_json)


def _points(model: str, ids: Sequence[str]) -> list[tuple[str, Any]]:
    """Each id's calibrated point for the model (`ifsteer.shipped.points`): its shipped file,
    or its group's point (extracted once, cached); `NotShipped` before any model loads."""
    from ifsteer.shipped.points import Points

    points = Points(model_id_of(model))
    return [(i, points.require(i)) for i in ids]


def _calibrated(lm: Any, instruction_id: str, point: Any) -> Any:
    """The point as a `ShippedVector`, said on stderr (stdout may be JSON lines): a group's
    point is labelled unverified, since no validation ran for this id."""
    from rich.console import Console

    from ifsteer.shipped.points import GroupPoint, extract_point

    err = Console(stderr=True, soft_wrap=True)
    if isinstance(point, GroupPoint):
        err.print(
            f"{instruction_id}: no file ships; extracting it once at its group's point "
            f"(layers {list(point.layers)}, from {point.donor.instruction_id}), cached in "
            f"{point.path.parent}"
        )
        point = extract_point(lm, point)
    info = point.describe()
    if point.status == "unverified":
        label = f"[yellow]unverified[/yellow]: its group's point, from {info.get('group_of')}"
    else:
        label = f"{point.status}, {'recommended' if point.recommended else 'not recommended'}"
    err.print(f"{instruction_id}: {info['point']} at layers {info['layers']} ({label})")
    return point


def _verdicts(
    instruction_ids: Sequence[str], texts: Sequence[str], answers: dict[str, list[str]]
) -> dict[str, list[bool]]:
    """Whether each answer passes every given instruction's IFEval loose check."""
    from ifsteer.checks import check as run_check
    from ifsteer.validation import check_for

    if not instruction_ids:
        raise InvalidSteering("--check needs the --instruction-id whose check to run")
    checks = [check_for(i) for i in instruction_ids]
    return {
        name: [
            all(run_check(cid, kwargs, text, answer).loose for cid, kwargs in checks)
            for text, answer in zip(texts, texts_answers, strict=True)
        ]
        for name, texts_answers in answers.items()
    }


def _show_generations(
    texts: Sequence[str],
    answers: dict[str, list[str]],
    verdicts: dict[str, list[bool]],
    as_json: bool,
) -> None:
    if as_json:
        for i, text in enumerate(texts):
            row: dict[str, Any] = {"prompt": text, **{k: v[i] for k, v in answers.items()}}
            row |= {f"{k}_passed": v[i] for k, v in verdicts.items()}
            print(json.dumps(row, ensure_ascii=False))
        return
    table = Table(show_lines=True)
    table.add_column("prompt", style="cyan", max_width=30)
    for name in answers:
        table.add_column(name)
    for i, text in enumerate(texts):
        cells = []
        for name, texts_answers in answers.items():
            mark = ""
            if name in verdicts:
                mark = "\n[green]IFEval ✓[/green]" if verdicts[name][i] else "\n[red]IFEval ✗[/red]"
            cells.append(texts_answers[i].replace("[", "\\[") + mark)
        table.add_row(text, *cells)
    out.print(table)
