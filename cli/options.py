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
DaskScheduler = Annotated[
    str | None,
    typer.Option("--dask-scheduler", help="Run the tasks on a running Dask cluster (tcp://host:8786); needs gpuconn[dask]."),
]
Workers = Annotated[
    int | None,
    typer.Option("--workers", help="Run the tasks on a local Dask cluster of N worker processes (N GPUs with dask-cuda)."),
]
