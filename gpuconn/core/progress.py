"""Progress on standard error, shared by the CLI and the study runner.

On a terminal: a rich progress bar. Elsewhere (a log file, a batch job): no
bar (no control characters or blank lines), but the same one line that a
terminal also gets after the first step when the whole will take at least
10 s: how long that step took and about how long the whole will take, so a
run that will last a week says so at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["progress_bar"]

_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True, completed: int = 0
) -> Iterator[Callable[[int], None]]:
    """Show a progress bar while the block runs; yields ``advance(n=1)``.

    Parameters
    ----------
    description : str
        Shown left of the bar (e.g. ``'denoise'``).
    total : int
        Number of steps.
    enabled : bool, default True
        False gives a no-op ``advance`` (library use, tests).
    completed : int, default 0
        Steps done before (a resumed run); the estimate counts only new ones.
    """
    if not enabled:
        yield lambda n=1: None
        return
    estimate = _Estimate(description, total - completed)
    if not _console.is_terminal:
        yield estimate.advance
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            estimate.advance(n)

        yield advance


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


#: Say nothing of steps expected to take less than this (seconds).
ESTIMATE_FROM_S = 10.0


class _Estimate:
    """Says once, after the first step that did work, how long the whole is likely to take."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, total
        self.done, self.began, self.said = 0, time.perf_counter(), False

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.said or n <= 0 or self.done >= self.total:
            return
        elapsed = time.perf_counter() - self.began
        if elapsed <= 0:
            return
        self.said = True
        total = elapsed / self.done * self.total
        if total < ESTIMATE_FROM_S:
            return
        _console.print(f"{self.description}: {self.done} of {self.total} in {_duration(elapsed)}; about "
                       f"{_duration(total)} in all", markup=False, highlight=False)
