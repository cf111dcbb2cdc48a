"""``gpuconn flame``: mixed-effects group analysis as FSL flameo (fe, ols, FLAME1) with GRF clusters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Device, Flag


def flame(
    cope: Annotated[Path, typer.Option("--cope", help="4D cope image, one volume per subject.")],
    varcope: Annotated[Path, typer.Option("--varcope", "--vc", help="4D varcope image, same grid and order.")],
    design_mat: Annotated[Path, typer.Option("--dm", help="Design matrix (FSL VEST design.mat).")],
    design_con: Annotated[Path, typer.Option("--tc", help="t contrasts (FSL VEST design.con).")],
    design_fts: Annotated[Optional[Path], typer.Option("--fc", help="F tests (FSL VEST design.fts).")] = None,
    design_grp: Annotated[Optional[Path], typer.Option("--cs", help="Variance groups (FSL VEST design.grp).")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Mask (default: voxels non-zero in some cope).")] = None,
    run_mode: Annotated[str, typer.Option("--runmode", help="fe, ols, flame1 or flame12.")] = "flame1",
    log_dir: Annotated[Path, typer.Option("--ld", help="Output folder (flameo's logdir).")] = Path("stats"),
    cluster_z: Annotated[float, typer.Option("--cluster-z", help="Cluster-forming z threshold.")] = 2.3,
    cluster_p: Annotated[float, typer.Option("--cluster-p", help="GRF cluster p threshold.")] = 0.05,
    no_clusters: Annotated[bool, Flag("--no-clusters", help="Skip the GRF cluster inference.")] = False,
    n_jumps: Annotated[int, typer.Option("--nj", help="flame12: MCMC jumps per voxel.")] = 5000,
    burnin: Annotated[int, typer.Option("--bi", help="flame12: jumps discarded at the start.")] = 500,
    sample_every: Annotated[int, typer.Option("--se", help="flame12: jumps per sample.")] = 1,
    fix_mean: Annotated[bool, Flag("--fm", help="flame12: fix the t-fit mean at FLAME1's estimate.")] = False,
    z_lower: Annotated[float, typer.Option("--zlt", help="flame12: lower z of the band sent to MCMC.")] = 2.0,
    z_upper: Annotated[float, typer.Option("--zut", help="flame12: upper z of the band sent to MCMC.")] = 20.0,
    sigma_dof: Annotated[float, typer.Option("--sdof", help="flame12: sigma (mm) smoothing the MCMC dof; -1 off.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="flame12: seed of the MCMC random numbers.")] = 10,
    device: Device = "auto",
) -> None:
    """Mixed-effects GLM on first-level copes/varcopes (flameo), GRF cluster-corrected (as FEAT)."""
    from gpuconn.core.errors import InputError
    from gpuconn.stats.flame import McmcOptions, run_flame

    if n_jumps <= burnin or burnin < 0 or sample_every < 1:
        raise InputError(f"--nj {n_jumps} --bi {burnin} --se {sample_every}: need 0 <= --bi < --nj and --se >= 1")
    mcmc = McmcOptions(n_jumps=n_jumps, burnin=burnin, sample_every=sample_every, seed=seed, fix_mean=fix_mean,
                       z_lower=z_lower, z_upper=z_upper, sigma_dof_mm=sigma_dof)

    tables = run_flame(
        cope, varcope, design_mat, design_con, log_dir, ftest_path=design_fts, groups_path=design_grp,
        mask_path=mask, run_mode=run_mode, z_threshold=None if no_clusters else cluster_z, cluster_p=cluster_p,
        device=device, mcmc=mcmc,
    )
    for name, table in tables.items():
        typer.echo(f"flame: {name}: {len(table)} cluster(s) with z > {cluster_z:g} and GRF p < {cluster_p:g}")
    typer.echo(f"flame: {run_mode} outputs in {log_dir}")
