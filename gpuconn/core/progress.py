"""Rich progress bars on standard error, shared by the CLI and the study runner."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["progress_bar"]

_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Show a progress bar while the block runs; yields ``advance(n=1)``.

    Parameters
    ----------
    description : str
        Shown left of the bar (e.g. ``'denoise'``).
    total : int
        Number of steps.
    enabled : bool, default True
        False gives a no-op ``advance`` (library use, tests).
    """
    if not enabled:
        yield lambda n=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
