"""`ifsteer vectors show|export-gguf`, `ifsteer models`, `ifsteer instructions`: what there is."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ifsteer.cli.app import ModelOption, app, model_id_of, out, vectors_app
from ifsteer.errors import InvalidSteering


@vectors_app.command("list")
def vectors_list(
    model: ModelOption = "smollm2-135m-instruct",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list, for scripts.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column in full (status, the whole point).")
    ] = False,
) -> None:
    """Calibrated vectors that ship for a model, and how each did on validation; then the group
    points made on this machine for ids with no file (unverified: no validation ran).

    The default table fits an 80-column terminal; `--wide` adds the status, the method and the
    full calibration point, `--json` gives every field."""
    from rich import box

    from ifsteer.shipped import listing
    from ifsteer.shipped.points import Points

    points = Points(model_id_of(model))
    rows = listing(points.model_id, points.shipped_folder)
    for point in points.cached():
        info = point.describe()
        rows.append(
            {
                "instruction_id": point.instruction_id,
                **{k: info[k] for k in ("status", "recommended", "point", "method", "layers")},
                "score": None,
                "no_steering_score": None,
                "n_prompts": None,
                "group_of": info.get("group_of"),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(
        title=f"calibrated vectors shipped for {model} ({len(rows)})",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("instruction", no_wrap=True)
    if wide:
        table.add_column("status", no_wrap=True)
        table.add_column("method", no_wrap=True)
    table.add_column("steer", no_wrap=True)
    table.add_column("point")  # a multi-layer point wraps at its space, not the ids
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("base", justify="right", no_wrap=True)
    for row in rows:
        point = row["point"] if wide else _short_point(row["point"], row["method"])
        status = [row["status"], row["method"]] if wide else []
        table.add_row(
            row["instruction_id"],
            *status,
            "yes" if row["recommended"] else "no",
            point,
            _score(row["score"]),
            _score(row["no_steering_score"]),
        )
    (Console(width=max(out.width, 120)) if wide else out).print(table)
    out.print(
        "steer: whether the vector beat no steering on its validation prompts; score: "
        "validation score steered, base: unsteered; trained: a trained vector (docs/method.md)"
    )
    if any(row["status"] == "unverified" for row in rows):
        out.print(
            "unverified: an id with no file, steered at its group's point (`generate -i`, the "
            f"server), cached in {points.cache_folder}"
        )


def _short_point(point: str, method: str) -> str:
    """`L22:projection:1:all` as `L22 proj 1`: the layer, mode and weight; positions only
    when they are not all. A trained vector is `trained L18`: additive at its own size (the
    point's scale counts each of its layers, so three layers at their size read 3)."""
    parts = point.split(":")
    if len(parts) != 4:
        return point
    layer, mode, weight, positions = parts
    if method == "trained":
        try:
            size = f"{float(weight) / len(layer.split('+')):g}"
        except ValueError:  # a point some other tool wrote: shown as it is
            size = weight
        short = f"trained {layer}" + ("" if size == "1" else f" {size}")
    else:
        short = f"{layer} {mode[:4]} {weight}"
    return short if positions == "all" else f"{short} {positions[:3]}"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


@vectors_app.command("show")
def vectors_show(path: Path, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Metadata of a vector file: model, layers, instruction, defaults."""
    from ifsteer.vectors import describe, read_vector_file

    file = read_vector_file(path)
    info = describe(file.default)
    info["default_layer"] = file.default_layer
    info["layers"] = {
        layer: {"norm": v.norm, "target": v.target} for layer, v in sorted(file.layers.items())
    }
    del info["layer"], info["norm"], info["target"]
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=str(path), show_header=False)
    for key, value in info.items():
        if key == "layers":
            value = ", ".join(
                f"{k} (‖u‖ {v['norm']:.3g}, c̄ {v['target']:.3g})" for k, v in value.items()
            )
        elif key == "phrasings":
            value = "\n".join(value)
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def models() -> None:
    """Models available offline: embedded ones and whether their cache is ready."""
    from ifsteer.models import EMBEDDED_MODELS, cache_dir

    table = Table()
    for column in ("name", "package", "cached", "description"):
        table.add_column(column)
    for m in EMBEDDED_MODELS.values():
        cached = (cache_dir(m.name) / "config.json").is_file()
        table.add_row(m.name, m.package, "yes" if cached else "on first use", m.description)
    out.print(table)
    out.print("Any local Hugging Face directory or .gguf file also works: --model PATH")


@app.command()
def instructions() -> None:
    """The built-in instruction catalogue (free-text instructions work too)."""
    from ifsteer.instructions import list_instructions

    table = Table()
    for column in ("id", "mode", "canonical phrasing"):
        table.add_column(column)
    for ins in list_instructions():
        table.add_row(ins.id, ins.mode, ins.phrasings[0])
    out.print(table)
    out.print('Also: keywords:existence:<word>, or --instruction "any text" for your own.')


@vectors_app.command("export-gguf")
def vectors_export_gguf(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="ifsteer vector file.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="GGUF file to write.")],
    layer: Annotated[
        int | None,
        typer.Option(
            help="Layer to export (default: a calibrated file's point, every layer of it; "
            "else the file's default layer)."
        ),
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(help="Weight in the vector's own mode, for one layer (default: stored)."),
    ] = None,
) -> None:
    """Write a vector as a llama.cpp control vector (use with --control-vector)."""
    from ifsteer.gguf_export import additive_coefficient, to_gguf
    from ifsteer.shipped import file_steerings

    if weight is not None and not math.isfinite(weight):
        raise InvalidSteering(f"--weight must be finite, got {weight}")
    steerings = file_steerings(path, layer, weight=weight)
    if any(s.positions != "all" for s in steerings):
        raise InvalidSteering(
            f"{path}: its point steers only the {steerings[0].positions} tokens, and a llama.cpp "
            "control vector steers every token; pass --layer to export the vector alone"
        )
    vectors = [
        s.vector.with_defaults(mode=s.effective_mode, weight=s.effective_weight) for s in steerings
    ]
    to_gguf(vectors, out_path)
    written = ", ".join(f"direction.{v.layer} = {additive_coefficient(v):.4g}·û" for v in vectors)
    modes = {v.mode for v in vectors}
    how = "additive" if modes == {"additive"} else "projection as its additive equivalent"
    out.print(f"wrote {out_path}: {written} ({how}); llama.cpp: --control-vector {out_path}")
