"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

Device = Annotated[
    str,
    typer.Option("--device", help="Where tensors live: auto (cuda when torch sees a GPU), cpu, cuda or cuda:N."),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the NumPy generator behind every random draw.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
