"""``gpuconn flame``: mixed-effects group analysis as FSL flameo (fe, ols, FLAME1) with GRF clusters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gpuconn.stats.options import GrfOptions, McmcOptions

from .options import ClusterP, ClusterZ, Device, Flag, stage_options

_GRF = GrfOptions()
_MCMC = McmcOptions()


def flame(
    cope: Annotated[Path, typer.Option("--cope", help="4D cope image, one volume per subject.")],
    varcope: Annotated[Path, typer.Option("--varcope", "--vc", help="4D varcope image, same grid and order.")],
    design_mat: Annotated[Path, typer.Option("--dm", help="Design matrix (FSL VEST design.mat).")],
    design_con: Annotated[Path, typer.Option("--tc", help="t contrasts (FSL VEST design.con).")],
    design_fts: Annotated[Optional[Path], typer.Option("--fc", help="F tests (FSL VEST design.fts).")] = None,
    design_grp: Annotated[Optional[Path], typer.Option("--cs", help="Variance groups (FSL VEST design.grp).")] = None,
    mask_path: Annotated[Optional[Path], typer.Option("--mask", help="Mask (default: voxels non-zero in some cope).")] = None,
    run_mode: Annotated[str, typer.Option("--runmode", help="fe, ols, flame1 or flame12.")] = "flame1",
    log_dir: Annotated[Path, typer.Option("--ld", help="Output folder (flameo's logdir).")] = Path("stats"),
    cluster_z: ClusterZ = _GRF.cluster_z,
    cluster_p: ClusterP = _GRF.cluster_p,
    no_clusters: Annotated[bool, Flag("--no-clusters", help="Skip the GRF cluster inference.")] = False,
    n_jumps: Annotated[int, typer.Option("--nj", help="flame12: MCMC jumps per voxel.")] = _MCMC.n_jumps,
    burnin: Annotated[int, typer.Option("--bi", help="flame12: jumps discarded at the start.")] = _MCMC.burnin,
    sample_every: Annotated[int, typer.Option("--se", help="flame12: jumps per sample.")] = _MCMC.sample_every,
    fix_mean: Annotated[bool, Flag("--fm", help="flame12: fix the t-fit mean at FLAME1's estimate.")] = _MCMC.fix_mean,
    z_lower: Annotated[float, typer.Option("--zlt", help="flame12: lower z of the band sent to MCMC.")] = _MCMC.z_lower,
    z_upper: Annotated[float, typer.Option("--zut", help="flame12: upper z of the band sent to MCMC.")] = _MCMC.z_upper,
    sigma_dof_mm: Annotated[
        float, typer.Option("--sdof", help="flame12: sigma (mm) smoothing the MCMC dof; -1 off.")
    ] = _MCMC.sigma_dof_mm,
    seed: Annotated[int, typer.Option("--seed", help="flame12: seed of the MCMC random numbers.")] = _MCMC.seed,
    device: Device = "auto",
) -> None:
    """Mixed-effects GLM on first-level copes/varcopes (flameo), GRF cluster-corrected (as FEAT)."""
    from gpuconn.stats.flame import run_flame

    mcmc = stage_options(McmcOptions, locals())
    clusters = None if no_clusters else stage_options(GrfOptions, locals())
    tables = run_flame(
        cope, varcope, design_mat, design_con, log_dir, ftest_path=design_fts, groups_path=design_grp,
        mask_path=mask_path, run_mode=run_mode, clusters=clusters, device=device, mcmc=mcmc,
    )
    for name, table in tables.items():
        typer.echo(f"flame: {name}: {len(table)} cluster(s) with z > {cluster_z:g} and GRF p < {cluster_p:g}")
    typer.echo(f"flame: {run_mode} outputs in {log_dir}")
