"""``gpuconn demo``: simulate a small cLBP-like study, analyse it end to end, say what was found."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import Device, Quiet, Seed
from .study import print_start, print_step, resumable


def demo(
    out: Annotated[Path, typer.Argument(help="Folder for the simulated data (OUT/data) and the results (OUT/results).")],
    n_patients: Annotated[int, typer.Option("--n-patients", help="Simulated cLBP patients (pre and post).")] = 8,
    n_controls: Annotated[int, typer.Option("--n-controls", help="Simulated healthy controls (pre).")] = 6,
    n_volumes: Annotated[int, typer.Option("--n-volumes", help="Volumes per run.")] = 120,
    voxel_size: Annotated[float, typer.Option("--voxel-size", help="Voxel size of the simulated MNI grid, mm.")] = 4.0,
    n_perm: Annotated[int | None, typer.Option("--n-perm", help="Permutations (default: the demo study file's).")] = None,
    device: Device = "auto",
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Simulate a study with planted effects, run the bundled demo study on it, report what was found."""
    from gpuconn.core.io import output_lock
    from gpuconn.study.demo import run_demo

    console = Console(highlight=False, soft_wrap=True)
    began = time.perf_counter()
    with resumable(f"gpuconn demo {out}"), output_lock(out, folder=True):
        result = run_demo(out, n_patients=n_patients, n_controls=n_controls, n_volumes=n_volumes,
                          voxel_size=voxel_size, n_perm=n_perm, device=device, seed=seed, progress=not quiet,
                          on_step=print_step, on_start=print_start, console=console)
    console.print(f"report: {result.report}")
    for line in result.lines:
        console.print(line)
    console.print(f"demo finished in {time.perf_counter() - began:.0f} s")
