"""The `ifsteer` command line, one module per group of commands.

- `app`: the typer app, `main` (the console script) and what the commands share;
- `steer`: `extract`, `generate`;
- `catalogue`: `vectors show|export-gguf`, `models`, `instructions`;
- `evaluate`: `eval`, `sweep`, `report`;
- `paper`: `run-paper`;
- `serve`: `serve`.

Importing a command module registers its commands; the order below is the order of
`ifsteer --help`. Commands import the library in their bodies, so `--help` stays fast.
"""

# In this order, not sorted: it is the order of `ifsteer --help`.
from ifsteer.cli import steer, train, catalogue, evaluate, paper, serve  # noqa: F401, I001
from ifsteer.cli.app import app, main
from ifsteer.cli.steer import parse_vector_spec

__all__ = ["app", "main", "parse_vector_spec"]
