"""Motion QC per run and the study's exclusion table.

For each run: mean and maximum framewise displacement (Power), mean and
maximum relative RMS displacement and maximum absolute RMS displacement
(Jenkinson, as MCFLIRT), and the number of outlier volumes (metric above
its threshold). A run is excluded when its maximum absolute RMS
displacement exceeds ``abs_threshold`` (default 3 mm) or its maximum
relative RMS displacement exceeds ``rel_threshold`` (default 2 mm), as in
the reference study; the thresholds are a
:class:`~gpuconn.subject.options.QcOptions`. ``mean_rel_rms`` is the column later used as a group
covariate.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.bids import DEFAULT_SPACE, find_runs
from ..core.errors import InputError, OptionError
from ..core.feat import FeatRun
from ..core.tasks import map_tasks
from .confounds import framewise_displacement, load_motion, rms_displacement
from .options import QcOptions

__all__ = ["QC_COLUMNS", "motion_summary", "qc_table", "motion_sources", "feat_motion_sources"]

#: Columns of :func:`qc_table` after the run identifiers.
QC_COLUMNS = (
    "n_volumes",
    "mean_fd",
    "max_fd",
    "mean_rel_rms",
    "max_rel_rms",
    "max_abs_rms",
    "n_outliers",
    "excluded",
    "exclusion_reason",
)


def motion_summary(params: np.ndarray, options: QcOptions | None = None) -> dict:
    """QC figures of one run.

    Parameters
    ----------
    params : ndarray, shape (n_volumes, 6)
        Rotations (radians) then translations (mm).
    options : QcOptions, optional
        The exclusion limits and the outlier rule (default: ``QcOptions()``).

    Returns
    -------
    dict
        Keys :data:`QC_COLUMNS`. ``mean_rel_rms`` averages volumes 1..n-1
        (as MCFLIRT's ``_rel_mean.rms``; volume 0 has no predecessor).
    """
    options = options or QcOptions()
    fd = framewise_displacement(params)
    absolute, relative = rms_displacement(params)
    metric = fd if options.outlier_metric == "fd" else relative
    reasons = []
    if absolute.max() > options.abs_threshold:
        reasons.append(f"max absolute displacement {absolute.max():.2f} mm > {options.abs_threshold:g} mm")
    if relative.max() > options.rel_threshold:
        reasons.append(f"max relative displacement {relative.max():.2f} mm > {options.rel_threshold:g} mm")
    following = slice(1, None) if len(params) > 1 else slice(None)
    return {
        "n_volumes": int(len(params)),
        "mean_fd": float(fd[following].mean()),
        "max_fd": float(fd.max()),
        "mean_rel_rms": float(relative[following].mean()),
        "max_rel_rms": float(relative.max()),
        "max_abs_rms": float(absolute.max()),
        "n_outliers": int((metric > options.outlier_threshold).sum()),
        "excluded": bool(reasons),
        "exclusion_reason": "; ".join(reasons),
    }


def qc_table(runs: Iterable[tuple[dict, np.ndarray]], options: QcOptions | None = None, *, client=None,
             progress: bool = False) -> pd.DataFrame:
    """One row per run: identifiers then :func:`motion_summary`.

    Parameters
    ----------
    runs : iterable of (identifiers, params)
        ``identifiers`` is a dict such as ``{'participant_id': 'sub-01',
        'session': 'pre'}``; ``params`` the run's motion parameters.
    options : QcOptions, optional
        Passed to :func:`motion_summary` (default: ``QcOptions()``).
    client : distributed.Client, optional
        Compute each run's summary as one Dask task
        (:func:`gpuconn.core.tasks.map_tasks`); the same table.
    progress : bool, default False
        Progress bar over the Dask tasks.

    Returns
    -------
    pandas.DataFrame
    """
    runs = list(runs)
    summary = functools.partial(motion_summary, options=options or QcOptions())
    if client is None:
        summaries = [summary(params) for _, params in runs]
    else:

        summaries = map_tasks(client, summary, [params for _, params in runs], description="qc", progress=progress)
    return pd.DataFrame([{**ids, **row} for (ids, _), row in zip(runs, summaries, strict=True)])


def motion_sources(
    *,
    derivatives: str | os.PathLike | None = None,
    participant_label: Sequence[str] = (),
    space: str | None = None,
    motion_par: Sequence[str | os.PathLike] = (),
    confounds: Sequence[str | os.PathLike] = (),
) -> list[tuple[dict, np.ndarray]]:
    """Motion parameters of every run, read (and checked) before any output.

    Either a derivatives folder (each run's confounds TSV) or lists of
    ``.par`` / confounds files.

    Returns
    -------
    list of (identifiers, params)
        Identifiers ``participant_id``, ``session``, ``source`` (the file).

    Raises
    ------
    InputError
        Neither or both kinds of input, or a run without a confounds TSV.
    """

    files = [*motion_par, *confounds]
    if (derivatives is None) == (not files):
        raise OptionError("give either {derivatives} or {motion_par}/{confounds} files")
    if derivatives is not None:
        sources = []
        for run in find_runs(derivatives, participant_label=list(participant_label) or None, space=space or DEFAULT_SPACE):
            if run.confounds is None and run.motion is None:
                raise InputError(f"no *_desc-confounds_timeseries.tsv beside {run.bold}; qc needs the motion parameters")
            ids = {"participant_id": f"sub-{run.subject}", "session": run.session or "n/a",
                   "source": (run.motion or run.confounds).name}
            sources.append((ids, load_motion(confounds=run.confounds, motion_par=run.motion)))
        return sources
    out = [({"source": Path(p).name}, load_motion(motion_par=p)) for p in motion_par]
    return out + [({"source": Path(p).name}, load_motion(confounds=p)) for p in confounds]


def feat_motion_sources(runs: list[FeatRun]) -> list[tuple[dict, np.ndarray]]:
    """MCFLIRT motion of each FEAT run, as :func:`motion_sources` returns it (``source``: the folder name).

    Raises
    ------
    InputError
        A run without ``mc/prefiltered_func_data_mcf.par``.
    """
    out = []
    for run in runs:
        if run.motion_par is None:
            raise InputError(f"FEAT folder {run.folder} has no mc/prefiltered_func_data_mcf.par; qc needs the motion")
        out.append(({"source": run.folder.name}, load_motion(motion_par=run.motion_par)))
    return out
