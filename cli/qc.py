"""``gpuconn qc``: motion summary and exclusion table for a study."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from gpuconn.subject.options import QC_METRICS, QcOptions

from .options import DaskScheduler, FeatDirs, Participants, Quiet, Workers, stage_options

_QC = QcOptions()


def qc(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output TSV (a JSON sidecar is written beside it).")],
    derivatives: Annotated[Path | None, typer.Option("--derivatives", help="fMRIPrep-style derivatives folder.")] = None,
    participant_label: Participants = [],
    space: Annotated[str, typer.Option("--space", help="space- entity of the BOLD files under --derivatives.")] = "MNI152NLin2009cAsym",
    motion_par: Annotated[list[Path], typer.Option("--motion-par", help="MCFLIRT .par or AFNI dfile_rall.1D (repeatable) instead of --derivatives.")] = [],
    confounds: Annotated[list[Path], typer.Option("--confounds", help="fMRIPrep confounds TSV (repeatable) instead of --derivatives.")] = [],
    feat: FeatDirs = [],
    abs_threshold: Annotated[float, typer.Option("--abs-threshold", help="Exclude above this max absolute RMS displacement (mm).")] = _QC.abs_threshold,
    rel_threshold: Annotated[float, typer.Option("--rel-threshold", help="Exclude above this max relative RMS displacement (mm).")] = _QC.rel_threshold,
    outlier_metric: Annotated[str, typer.Option("--outlier-metric", help=f"{' or '.join(QC_METRICS)}: Power's FD or Jenkinson's relative RMS, for outlier counts.")] = _QC.outlier_metric,
    outlier_threshold: Annotated[float, typer.Option("--outlier-threshold", help="Outlier threshold in mm.")] = _QC.outlier_threshold,
    scheduler: DaskScheduler = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Mean/max FD, relative and absolute RMS displacement, outliers and exclusion per run."""
    from gpuconn.core.feat import feat_runs
    from gpuconn.core.io import write_tsv
    from gpuconn.core.tasks import check_options, dask_client
    from gpuconn.subject.qc import feat_motion_sources, motion_sources, qc_table

    options = stage_options(QcOptions, locals())
    check_options(scheduler, workers)
    sources = feat_motion_sources(feat_runs(feat, registration=False))
    if derivatives is not None or motion_par or confounds or not feat:
        sources += motion_sources(
            derivatives=derivatives, participant_label=participant_label, space=space, motion_par=motion_par,
            confounds=confounds,
        )  # fmt: skip
    with dask_client(scheduler=scheduler, workers=workers) as client:  # None: one process
        table = qc_table(sources, options, client=client, progress=not quiet)
    write_tsv(table, out, params={"command": "gpuconn qc", **dataclasses.asdict(options)}, sidecar=True)
    n_excluded = int(table["excluded"].sum())
    typer.echo(f"gpuconn qc: {len(table)} run(s), {n_excluded} excluded -> {out}")
