"""``gpuconn simulate``: write a synthetic study with planted effects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import Quiet, Seed


def simulate(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the study into (fMRIPrep derivatives layout).")],
    n_patients: Annotated[int, typer.Option("--n-patients", help="cLBP patients (sessions pre and post).")] = 8,
    n_controls: Annotated[int, typer.Option("--n-controls", help="Healthy controls (session pre).")] = 6,
    n_volumes: Annotated[int, typer.Option("--n-volumes", help="Volumes per run.")] = 120,
    voxel_size: Annotated[float, typer.Option("--voxel-size", help="Isotropic voxel size of the MNI grid, mm.")] = 4.0,
    tr: Annotated[float, typer.Option("--tr", help="Repetition time, s.")] = 3.0,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Simulate a small cLBP-like study (patients pre/post, controls) with planted effects."""
    from gpuconn.core.progress import progress_bar
    from gpuconn.study.simulate import simulate_study

    n_runs = 2 * n_patients + n_controls
    with progress_bar("simulate", n_runs, enabled=not quiet) as advance:
        summary = simulate_study(
            out_dir,
            n_patients=n_patients,
            n_controls=n_controls,
            n_volumes=n_volumes,
            voxel_size=voxel_size,
            tr=tr,
            seed=seed,
            progress=advance,
        )
    console = Console(highlight=False, soft_wrap=True)
    groups = summary.participants["group"].value_counts().to_dict()
    console.print(f"wrote {summary.root}: {summary.n_runs} runs of {n_volumes} volumes (TR {tr} s)")
    console.print(f"  participants: {groups.get('cLBP', 0)} cLBP (pre + post), {groups.get('HC', 0)} HC (pre)")
    console.print(f"  grid: {summary.shape} at {voxel_size} mm, {summary.n_brain_voxels} brain voxels")
    for effect in summary.ground_truth["effects"]:
        console.print(f"  planted {effect['name']}: {effect['description']}")
    for subject, reason in summary.ground_truth["excluded"].items():
        console.print(f"  planted QC failure: {subject} ({reason})")
    console.print(f"  truth: {summary.root / 'ground_truth.json'}")
