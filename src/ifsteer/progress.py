"""Progress bars for long work, shared by the CLI and the runners.

Runners take a plain `advance(n)` callable so they stay usable (and testable) without a
terminal; the faces wrap them in a rich bar with a rate and an ETA. A run of several stages
(run-paper) reports to `Stages`, which prints nothing, or to `RichStages`, an overall bar in
estimated seconds plus one bar per stage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]
# What a runner of several long steps takes: `progress_bar` (a bar per step) or `silent`.
Bars = Callable[[str, int], AbstractContextManager[Advance]]


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[Advance]:
    """A bar on stderr (stdout stays clean for results); a no-op when disabled.

    Work that fails leaves no bar behind: a bar frozen at 0 of N above the error's one line
    would claim progress that never happened."""
    if not enabled:
        yield lambda _n: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(description, total=total)
        try:
            yield lambda n: bar.advance(task, n)
        except BaseException:
            bar.update(task, visible=False)
            raise


@contextmanager
def silent(_description: str, _total: int) -> Iterator[Advance]:
    yield lambda _n: None


class Stages:
    """Where a run reports progress; this base prints nothing (tests, library use)."""

    def start(self, estimates: Mapping[str, float]) -> None:
        """Called once with the estimated seconds of every stage."""

    @contextmanager
    def stage(self, name: str, items: int) -> Iterator[Advance]:
        yield lambda _n: None

    def message(self, text: str) -> None:
        """A line for the user."""


class RichStages(Stages):
    """An overall bar in estimated seconds (its ETA corrects itself as stages run) and one bar
    per stage, on stderr."""

    def __init__(self) -> None:
        self.console = Console(file=sys.stderr)
        self.estimates: dict[str, float] = {}
        self.progress: Any = None
        self.overall: Any = None

    def start(self, estimates: Mapping[str, float]) -> None:
        self.estimates = dict(estimates)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.overall = self.progress.add_task(
            "run-paper (est. s)", total=max(sum(estimates.values()), 1.0)
        )

    @contextmanager
    def stage(self, name: str, items: int) -> Iterator[Advance]:
        if self.progress is None:
            yield lambda _n: None
            return
        budget = self.estimates.get(name, 0.0)
        per_item = budget / items if items else 0.0
        task = self.progress.add_task(f"  {name}", total=max(items, 0))
        spent = 0.0

        def advance(n: int) -> None:
            nonlocal spent
            self.progress.advance(task, n)
            step = min(per_item * n, budget - spent)
            spent += step
            self.progress.advance(self.overall, step)

        try:
            yield advance
        finally:
            self.progress.advance(self.overall, max(budget - spent, 0.0))
            self.progress.update(task, completed=items)

    def message(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
