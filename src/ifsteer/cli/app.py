"""The typer application every command registers on, and what the commands share.

Every command turns an `IfsteerError` into one line on stderr and exit code 2, so a wrong model,
a layer out of range or a malformed file never shows a traceback. Commands import the library
inside their bodies, so `ifsteer --help` answers without loading torch.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ifsteer.errors import IfsteerError, InvalidSteering

app = typer.Typer(
    help="Make language models follow instructions better by activation steering.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
vectors_app = typer.Typer(help="Inspect and convert vector files.", no_args_is_help=True)
app.add_typer(vectors_app, name="vectors")
out = Console()

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Embedded model name, local Hugging Face directory, or .gguf file."
    ),
]
DtypeOption = Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")]
BatchOption = Annotated[
    int | None,
    typer.Option(help="Rows decoded together (default: sized to the model and free memory)."),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="CPU threads for torch (default: OMP_NUM_THREADS, else torch's choice). On a "
        "machine shared with other jobs, 1 can be several times faster than 2.",
    ),
]


def set_threads(threads: int | None) -> None:
    """Apply `--threads`; without it torch keeps its default, which honours OMP_NUM_THREADS."""
    if threads is None:
        return
    if threads < 1:
        raise InvalidSteering("--threads must be at least 1")
    import torch

    torch.set_num_threads(threads)


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise InvalidSteering("--batch-size must be at least 1")


def check_max_new_tokens(max_new_tokens: int) -> None:
    """The engine refuses it too, but only once the model has loaded (and a run directory or a
    group point may already exist)."""
    if max_new_tokens < 1:
        raise InvalidSteering("--max-new-tokens must be at least 1")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        command = typer.main.get_command(app)
        plain_metavars(command)
        command(prog_name="ifsteer")
    except IfsteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


_METAVARS = {int: "INTEGER", float: "NUMBER", str: "TEXT", bool: "BOOLEAN"}


def plain_metavars(command: Any) -> None:
    """Help shows what a user types after each option (`--port INTEGER`, `--vectors PATH`)
    and nothing after a flag, where typer shows Python types (`<int>`, `<bool>`, `<list[str]>`).
    A repeatable option reads `TEXT...`."""
    from typing import get_args

    for param in getattr(command, "params", []):
        # typer carries its own copy of click: options are known by what they have
        desc = getattr(param, "type_descriptor", None)
        if desc is None or not hasattr(param, "is_flag") or param.metavar is not None:
            continue
        if param.is_flag or getattr(param, "count", False):
            param.metavar = ""
            continue
        if desc.is_choice:
            label = "|".join(str(c) for c in desc.choices or ())
        elif desc.is_path:
            label = "PATH"
        else:
            kind = (get_args(desc.annotation) or (str,))[0] if desc.is_list else desc.annotation
            label = _METAVARS.get(kind, getattr(kind, "__name__", "VALUE").upper())
        param.metavar = f"{label}..." if desc.is_list else label
    if hasattr(command, "get_help_option"):  # built per call: a flag too
        command.get_help_option = _flag_help(command.get_help_option)
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)


def _flag_help(make: Any) -> Any:
    def help_option(ctx: Any) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return help_option


def load(model: str, dtype: str) -> Any:
    from transformers.utils import logging as hf_logging

    from ifsteer.models import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with out.status(f"loading {model}…"):
        return load_model(model, dtype)


def model_id_of(model: str) -> str:
    """The id `load_model` gives a --model value, without loading it (shipped points are
    looked up by it before a slow load)."""
    from pathlib import Path

    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name
    return path.stem if path.suffix == ".gguf" else model


def csv_ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidSteering(f"--layers takes comma-separated integers, got {text!r}") from None


def csv_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidSteering(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise InvalidSteering(f"{option} takes finite numbers, got {text!r}")
    return values


def check_mode(mode: str) -> str:
    """A mode name given on the command line, refused with one line when unknown."""
    from ifsteer.instructions import MODES

    if mode not in MODES:
        raise InvalidSteering(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
    return mode


def print_table(table: Any, *, simple: bool = True) -> None:
    """Draw a `ifsteer.report.tables.TextTable` with rich (a light frame when `simple`)."""
    from rich import box

    drawn = Table(title=table.title, caption=table.caption)
    if simple:
        drawn.box = box.SIMPLE
    for column in table.columns:
        drawn.add_column(
            column.name, justify="right" if column.right else "left", no_wrap=column.no_wrap
        )
    for row in table.rows:
        drawn.add_row(*row)
    out.print(drawn)
