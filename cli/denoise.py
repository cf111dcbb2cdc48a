"""``gpuconn denoise``: nuisance regression with high-pass, censoring and smoothing per run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpuconn.subject.options import DenoiseOptions

from .options import (DaskScheduler, Derivatives, Device, FeatDirs, Flag, Participants, Quiet, Space, Workers,
                      stage_options)

_DENOISE = DenoiseOptions()

_File = Path | None


def denoise(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (as sub-X/ses-Y/func with --derivatives).")],
    bold: Annotated[_File, typer.Option("--bold", help="One 4D BOLD file (single-run mode; needs --mask).")] = None,
    mask: Annotated[_File, typer.Option("--mask", help="Brain mask on the BOLD grid (with --derivatives: for every run).")] = None,
    confounds: Annotated[_File, typer.Option("--confounds", help="fMRIPrep *_desc-confounds_timeseries.tsv or a .1D of regressors (columns col0, col1...) (single-run mode).")] = None,
    motion_par: Annotated[_File, typer.Option("--motion-par", help="MCFLIRT .par or AFNI dfile_rall.1D/motion_*.1D: motion instead of the TSV's columns.")] = None,
    censor_file: Annotated[_File, typer.Option("--censor-file", help="fsl_motion_outliers matrix or AFNI censor_*.1D (1 keep, 0 censor): spikes instead of detecting outliers.")] = None,
    physio_file: Annotated[_File, typer.Option("--physio", help="BIDS *_physio.tsv.gz (with its .json) (single-run mode).")] = None,
    wm: Annotated[_File, typer.Option("--wm", help="WM probability map or mask on the BOLD grid (with --derivatives: for every run).")] = None,
    csf: Annotated[_File, typer.Option("--csf", help="CSF probability map or mask on the BOLD grid (with --derivatives: for every run).")] = None,
    derivatives: Derivatives = None,
    feat: FeatDirs = [],
    participant_label: Participants = [],
    space: Space = "MNI152NLin2009cAsym",
    motion: Annotated[str, typer.Option("--motion", help="Motion regressors: 6, 24 (Friston) or none.")] = _DENOISE.motion,
    acompcor: Annotated[int, typer.Option("--acompcor", help="aCompCor components (0: none).")] = _DENOISE.acompcor,
    acompcor_mode: Annotated[str, typer.Option("--acompcor-mode", help="combined (WM+CSF in one PCA) or separate (k per tissue).")] = _DENOISE.acompcor_mode,
    tissue_threshold: Annotated[float, typer.Option("--tissue-threshold", help="WM/CSF probability threshold.")] = _DENOISE.tissue_threshold,
    erode: Annotated[int, typer.Option("--erode", help="Erosions of the WM/CSF masks (voxels).")] = _DENOISE.erode,
    physio: Annotated[str, typer.Option("--physio-mode", help="HR/RV regressors: auto (when a recording exists), yes, no.")] = _DENOISE.physio,
    global_signal: Annotated[bool, Flag("--global-signal", help="Regress the mean signal in the brain mask.")] = _DENOISE.global_signal,
    outlier_metric: Annotated[str, typer.Option("--outlier-metric", help="fd (Power) or rms (Jenkinson relative), or none.")] = _DENOISE.outlier_metric,
    outlier_threshold: Annotated[float, typer.Option("--outlier-threshold", help="Outlier threshold in mm.")] = _DENOISE.outlier_threshold,
    censor: Annotated[str, typer.Option("--censor", help="spikes (a regressor per outlier) or drop (remove the volumes).")] = _DENOISE.censor,
    high_pass: Annotated[float, typer.Option("--high-pass", help="High-pass cutoff in Hz (cosine set in the model; 0: none).")] = _DENOISE.high_pass or 0.0,
    low_pass: Annotated[float, typer.Option("--low-pass", help="Low-pass cutoff in Hz (cosine set in the model; 0: none).")] = _DENOISE.low_pass or 0.0,
    fwhm: Annotated[float, typer.Option("--fwhm", help="Gaussian smoothing FWHM in mm inside the brain mask (0: none).")] = _DENOISE.fwhm,
    columns: Annotated[list[str], typer.Option("--column", help="Extra confounds TSV column (repeatable).")] = list(_DENOISE.columns),
    tr: Annotated[float | None, typer.Option("--tr", help="Repetition time in s (default: the BOLD header).")] = _DENOISE.tr,
    min_dof: Annotated[int, typer.Option("--min-dof", help="Least residual degrees of freedom accepted.")] = _DENOISE.min_dof,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Runs regressed together on the device.")] = 1,
    overwrite: Annotated[bool, Flag("--overwrite", help="Recompute runs whose outputs exist from the same inputs and settings (default: skip them, e.g. after an interrupted run).")] = False,
    device: Device = "auto",
    scheduler: DaskScheduler = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Regress motion, physiological, aCompCor and outlier regressors with the high-pass in one model, then smooth.

    Runs whose outputs already exist from the same inputs and settings are
    skipped (--overwrite recomputes them). Ctrl-C or SIGTERM keeps the runs
    already written and exits 130; rerunning the command finishes the rest.
    """
    import warnings

    from gpuconn.core.errors import InputError
    from gpuconn.core.feat import feat_runs
    from gpuconn.core.io import keep_outputs
    from gpuconn.core.progress import progress_bar
    from gpuconn.core.tasks import dask_client
    from gpuconn.subject.denoise import RunFiles, collect_runs, denoise_runs, finished_run, prepare_run

    # the options object from the arguments of the same names (0 Hz, as TOML and typer write "none", is None)
    options = stage_options(DenoiseOptions, {**locals(), "high_pass": high_pass or None, "low_pass": low_pass or None,
                                             "columns": tuple(columns)})
    single = dict(confounds=confounds, motion_par=motion_par, censor_file=censor_file, physio=physio_file, wm=wm,
                  csf=csf)
    if sum([bold is not None, derivatives is not None, bool(feat)]) != 1:
        raise InputError("give one of --bold (with --mask), --derivatives or --feat")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if derivatives is not None:
        # --mask, --wm, --csf given with --derivatives: one image (e.g. a template's) for every run
        common = {k: v for k, v in dict(mask=mask, wm=wm, csf=csf).items() if v is not None}
        files, out_dirs = collect_runs(derivatives, out, participant_label=participant_label, space=space, **common)
        per_run = [k for k in ("confounds", "motion_par", "censor_file", "physio") if single[k] is not None]
        if per_run:
            raise InputError(f"--{per_run[0].replace('_', '-')} belongs to one run; use it with --bold, not --derivatives")
    elif feat:  # FEAT folders: standard-space views of their data and mask, MCFLIRT motion
        runs = feat_runs(feat)
        if len(runs) > 1 and any(single[k] is not None for k in ("confounds", "motion_par", "censor_file", "physio")):
            raise InputError("--confounds/--motion-par/--censor-file/--physio belong to one run; give one --feat folder")
        files = [RunFiles(bold=r.bold, mask=mask or r.mask, label=r.label,
                          **{**single, "motion_par": motion_par or r.motion_par}) for r in runs]
        out_dirs = [out] if len(runs) == 1 else [out / r.label for r in runs]
    else:
        if mask is None:
            raise InputError("--bold needs --mask (the brain mask on the BOLD grid)")
        files, out_dirs = [RunFiles(bold=bold, mask=mask, **single)], [out]
    done = [not overwrite and finished_run(f, d, options) for f, d in zip(files, out_dirs)]
    if any(done):
        typer.echo(f"gpuconn denoise: {sum(done)} of {len(files)} run(s) already denoised in {out} from the same inputs "
                   "and settings, skipped (--overwrite recomputes them)")
        files, out_dirs = [f for f, d in zip(files, done) if not d], [o for o, d in zip(out_dirs, done) if not d]
    with warnings.catch_warnings():  # the full pass warns about the real design
        warnings.simplefilter("ignore")
        for f in files:  # every input checked before any output is written
            prepare_run(f, options, device=device, load_data=False)
    written: list[dict] = []
    try:
        with dask_client(scheduler=scheduler, workers=workers) as client:  # None: one process
            # with Dask: one task per batch of runs, written by the workers, and a bar over the tasks
            with progress_bar("denoise", len(files), enabled=not quiet and client is None) as advance:
                for paths in denoise_runs(files, out_dirs, options, device=device, batch_size=batch_size,
                                          on_run=advance, client=client, progress=not quiet):
                    written.append(paths)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI raises it as Ctrl-C): keep the complete runs
        keep_outputs([p for paths in written for p in paths.values()])
        typer.echo(f"gpuconn denoise: interrupted after {len(written)} of {len(files)} run(s); their outputs are kept "
                   f"in {out}, and rerunning the same command skips them", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"gpuconn denoise: {len(written)} run(s) -> {out}")
