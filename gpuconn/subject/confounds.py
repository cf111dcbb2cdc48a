"""Confound files and the motion / tissue regressors derived from them.

Motion parameters are held everywhere as an ``(n_volumes, 6)`` array in
MCFLIRT ``.par`` order: rotations about x, y, z in radians, then
translations along x, y, z in mm. fMRIPrep's ``rot_*``/``trans_*`` columns
are reordered to match.

Derived regressors:

* **Friston 24** (Friston et al. 1996): the 6 parameters ``R_t``, their
  one-volume lag ``R_{t-1}`` (the first volume repeats its own values, so
  the lagged column has no artificial step), and the squares of both.
* **Framewise displacement** (Power et al. 2012):
  ``FD_t = sum |Δtrans_t| + r * sum |Δrot_t|`` with ``r = 50`` mm, ``FD_0 = 0``.
* **RMS displacement** (Jenkinson 1999, as MCFLIRT's ``_abs.rms`` and
  ``_rel.rms``): for two rigid transforms ``M1``, ``M2`` (4x4),
  ``M = M2 M1^-1 - I = [[A, t], [0, 0]]`` and the RMS displacement over a
  sphere of radius ``R`` (80 mm) centred at ``c`` is
  ``sqrt(R^2 / 5 * trace(A^T A) + (t + A c)^T (t + A c))``. Absolute RMS
  compares each volume with the reference (identity); relative RMS compares
  consecutive volumes (``rel_0 = 0``; MCFLIRT's file omits that row).
  Transforms are built from the parameters as FSL's
  ``construct_rotmat_euler`` does (``R = Rz Ry Rx`` in FSL's sign convention,
  rotation about ``c``). MCFLIRT rotates about the centre of the volume,
  which is also the centre of its RMS sphere; with the same ``c`` in both
  places ``c`` drops out of the result.
* **Spike regressors**: one column per volume whose metric exceeds the
  threshold, 1 at that volume and 0 elsewhere, as ``fsl_motion_outliers``
  writes its confound matrix.
* **aCompCor** (Behzadi et al. 2007): the top-k left singular vectors of the
  tissue signal after removing a constant and linear trend from each voxel
  and dividing it by its standard deviation (constant voxels are left at 0).
  Computed batched on the device from the ``(n_volumes, n_volumes)`` Gram
  matrix with ``torch.linalg.eigh`` in float64; each component's sign is
  chosen so its largest-magnitude entry is positive.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..core import afni
from ..core.backend import DESIGN_DTYPE, as_data, resolve_device, to_numpy
from ..core.errors import InputError
from ..core.io import existing_input, read_tsv
from ..core.textfile import numeric_rows

__all__ = [
    "MOTION_COLUMNS",
    "FMRIPREP_MOTION_COLUMNS",
    "read_motion_par",
    "read_matrix",
    "read_censor",
    "read_fmriprep_confounds",
    "fmriprep_motion",
    "load_motion",
    "MAX_ROTATION_RAD",
    "check_length",
    "friston24",
    "friston24_names",
    "framewise_displacement",
    "rigid_matrices",
    "jenkinson_rms",
    "rms_displacement",
    "spike_regressors",
    "tissue_mask",
    "acompcor",
]

#: Names of the 6 motion parameters in MCFLIRT order.
MOTION_COLUMNS = ("rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z")
#: fMRIPrep column names in the same order (they are the same names).
FMRIPREP_MOTION_COLUMNS = MOTION_COLUMNS


def read_motion_par(path: str | os.PathLike) -> np.ndarray:
    """Read an MCFLIRT ``.par`` file (or AFNI ``.1D`` motion, converted to the same order and units).

    Parameters
    ----------
    path : path-like
        Whitespace-separated, 6 columns: rx ry rz (radians) tx ty tz (mm).
        An AFNI ``dfile_rall.1D``/``motion_*.1D`` (roll pitch yaw in degrees,
        dS dL dP in mm) goes through :func:`gpuconn.core.afni.read_motion_1d`.

    Returns
    -------
    ndarray, shape (n_volumes, 6)

    Raises
    ------
    InputError
        Missing file, non-numeric values, or not 6 columns.
    """
    if afni.is_1d(path):
        return afni.read_motion_1d(path)
    params = read_matrix(path, what="motion parameters")
    if params.shape[1] != 6:
        raise InputError(
            f"motion parameters {path} have {params.shape[1]} columns; expected 6 "
            "(MCFLIRT .par: rx ry rz in radians, tx ty tz in mm)"
        )
    return params


def read_matrix(path: str | os.PathLike, *, what: str = "confound matrix") -> np.ndarray:
    """Read a plain numeric matrix (``.txt``, ``.tsv``, ``.par``, fsl_motion_outliers output).

    Columns may be separated by tabs or spaces; a header row of names is
    skipped when present. AFNI ``.1D`` files (``#`` comments, ``[cols]``
    and ``{rows}`` selectors) are read with :func:`gpuconn.core.afni.read_1d`.

    Returns
    -------
    ndarray, shape (n_volumes, n_columns)

    Raises
    ------
    InputError
        Missing, binary or empty file, non-numeric or NaN values.
    """
    if afni.is_1d(path):
        return afni.read_1d(path, what=what)
    path = existing_input(path, what=what)
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not a text file ({exc.reason}); expected a plain numeric matrix") from exc
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if lines and not _is_numeric_row(lines[0]):
        lines = lines[1:]
    matrix = numeric_rows(lines, path, what=what)
    _check_finite(matrix, path, what)
    return matrix


def read_censor(path: str | os.PathLike) -> np.ndarray:
    """Spike matrix from a censor file: an fsl_motion_outliers matrix, or an AFNI ``.1D`` column.

    Parameters
    ----------
    path : path-like
        fsl_motion_outliers ``-o`` output (one column per outlier, 1 at its
        volume), or afni_proc.py ``censor_*_combined_2.1D`` (one column,
        1 = keep, 0 = censor).

    Returns
    -------
    ndarray, shape (n_volumes, n_outliers)
    """
    if afni.is_1d(path):
        return afni.read_censor_1d(path)
    return read_matrix(path, what="censor matrix")


def _is_numeric_row(row: Sequence[str]) -> bool:
    try:
        [float(x) for x in row]
    except ValueError:
        return False
    return True


def _check_finite(matrix: np.ndarray, path, what: str, names: Sequence[str] | None = None) -> None:
    bad = ~np.isfinite(matrix)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        cols = np.flatnonzero(bad.any(axis=0))
        col_text = ", ".join(names[i] for i in cols) if names is not None else ", ".join(map(str, cols))
        raise InputError(
            f"{what} {path} has NaN/n/a values in column(s) {col_text} at row(s) "
            f"{rows[:5].tolist()}{'...' if rows.size > 5 else ''}; fill or drop them"
        )


def read_fmriprep_confounds(
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    *,
    fill_first: bool = True,
) -> pd.DataFrame:
    """Read a fMRIPrep ``*_desc-confounds_timeseries.tsv`` (or any headed TSV).

    Parameters
    ----------
    path : path-like
    columns : sequence of str, optional
        Columns to return (all when None).
    fill_first : bool, default True
        Replace ``n/a`` in the first row (derivative and FD columns, which
        fMRIPrep leaves undefined there) with 0.

    Returns
    -------
    pandas.DataFrame, shape (n_volumes, n_columns)

    Raises
    ------
    InputError
        Missing file, a requested column absent (the message lists the
        available ones), or ``n/a`` left after the first row.
    """
    table = read_tsv(path, what="confounds")
    if columns is not None:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise InputError(
                f"confounds {path} has no column(s) {', '.join(missing)}; "
                f"available: {', '.join(map(str, table.columns))}"
            )
        table = table[list(columns)]
    try:
        table = table.astype(float)
    except ValueError as exc:
        raise InputError(f"confounds {path} has non-numeric values ({exc}); expected numbers or n/a") from exc
    if fill_first and len(table):
        table.iloc[0] = table.iloc[0].fillna(0.0)
    _check_finite(table.to_numpy(), path, "confounds", list(table.columns))
    return table.reset_index(drop=True)


def fmriprep_motion(path: str | os.PathLike) -> np.ndarray:
    """The 6 motion parameters of a fMRIPrep confounds TSV in MCFLIRT order.

    Returns
    -------
    ndarray, shape (n_volumes, 6)
        rot_x, rot_y, rot_z (radians), trans_x, trans_y, trans_z (mm).
    """
    return read_fmriprep_confounds(path, FMRIPREP_MOTION_COLUMNS).to_numpy()


def load_motion(
    *,
    confounds: str | os.PathLike | None = None,
    motion_par: str | os.PathLike | None = None,
    n_volumes: int | None = None,
    bold: str | os.PathLike = "the image",
) -> np.ndarray | None:
    """Motion parameters of a run from its ``.par`` (preferred) or fMRIPrep TSV.

    Parameters
    ----------
    confounds, motion_par : path-like, optional
    n_volumes : int, optional
        Checked against the number of rows.
    bold : path-like
        Named in the length error.

    Returns
    -------
    ndarray, shape (n_volumes, 6), or None when neither file is given.

    Raises
    ------
    InputError
        Wrong number of rows (naming both files), rotations above 2 pi
        (degrees; above :data:`MAX_ROTATION_RAD` radians only a warning
        says so), or a file problem.
    """
    source = motion_par if motion_par is not None else confounds
    if source is None:
        return None
    params = read_motion_par(motion_par) if motion_par is not None else fmriprep_motion(confounds)
    check_length(params, n_volumes, source, bold)
    _check_rotation_units(params, source)
    return params


#: Largest head rotation taken as radians without a warning (0.5 rad, about 29 degrees, more than a head coil allows).
MAX_ROTATION_RAD = 0.5


def _check_rotation_units(params: np.ndarray, source) -> None:
    """Warn when rotations look like degrees (above :data:`MAX_ROTATION_RAD`); refuse them above 2 pi, which no angle in radians needs."""
    largest = float(np.abs(params[:, :3]).max(initial=0.0))
    if largest <= MAX_ROTATION_RAD:
        return
    message = (f"motion parameters {source}: rotations reach {largest:.3g}, {np.degrees(largest):.0f} degrees if radians; "
               "they look like degrees, or like translations first (SPM's rp_*.txt): gpuconn reads rx ry rz in radians, "
               "then tx ty tz in mm (MCFLIRT .par order); convert degrees with numpy.deg2rad")
    if largest > 2 * np.pi:
        raise InputError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def check_length(values, n_volumes: int | None, path, bold) -> None:
    """Raise :class:`InputError` unless ``len(values) == n_volumes`` (None: no check)."""
    if n_volumes is not None and len(values) != n_volumes:
        hint = ""
        if afni.is_1d(path) and len(values) > n_volumes:  # afni_proc's *_rall.1D and censor files span all runs
            hint = f"; for one run of a multi-run .1D select its rows, e.g. '{{0..{n_volumes - 1}}}' after the name"
        raise InputError(f"confounds {path} has {len(values)} rows but the image {bold} has {n_volumes} volumes{hint}")


def _check_params(params: np.ndarray) -> np.ndarray:
    params = np.asarray(params, dtype=float)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"motion parameters must have shape (n_volumes, 6), got {params.shape}")
    return params


def friston24(params: np.ndarray) -> np.ndarray:
    """Friston 24-parameter expansion.

    Parameters
    ----------
    params : ndarray, shape (n_volumes, 6)

    Returns
    -------
    ndarray, shape (n_volumes, 24)
        ``[R_t, R_{t-1}, R_t^2, R_{t-1}^2]``; the lag of the first volume is
        the first volume itself.
    """
    params = _check_params(params)
    lagged = np.vstack([params[:1], params[:-1]])
    return np.hstack([params, lagged, params**2, lagged**2])


def friston24_names(names: Sequence[str] = MOTION_COLUMNS) -> list[str]:
    """Column names of :func:`friston24` for parameters called ``names``."""
    return [*names, *(f"{n}_lag1" for n in names), *(f"{n}_power2" for n in names), *(f"{n}_lag1_power2" for n in names)]


def framewise_displacement(params: np.ndarray, *, radius: float = 50.0) -> np.ndarray:
    """Framewise displacement of Power et al. (2012).

    Parameters
    ----------
    params : ndarray, shape (n_volumes, 6)
        Rotations (radians) then translations (mm).
    radius : float, default 50.0
        Head radius in mm that turns rotations into arc lengths.

    Returns
    -------
    ndarray, shape (n_volumes,)
        ``FD[0] = 0``.
    """
    params = _check_params(params)
    diff = np.abs(np.diff(params, axis=0))
    fd = radius * diff[:, :3].sum(axis=1) + diff[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd])


def rigid_matrices(params: np.ndarray, *, center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rigid transforms from motion parameters (FSL ``construct_rotmat_euler``).

    Parameters
    ----------
    params : ndarray, shape (n_volumes, 6)
    center : 3 floats, default origin
        Centre of rotation in mm.

    Returns
    -------
    ndarray, shape (n_volumes, 4, 4)
        ``x' = R (x - c) + c + t`` with ``R = Rz Ry Rx``.
    """
    params = _check_params(params)
    c = np.asarray(center, dtype=float)
    n = params.shape[0]
    cos, sin = np.cos(params[:, :3]), np.sin(params[:, :3])
    rx = np.tile(np.eye(3), (n, 1, 1))
    ry, rz = rx.copy(), rx.copy()
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = cos[:, 0], sin[:, 0], -sin[:, 0], cos[:, 0]
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = cos[:, 1], -sin[:, 1], sin[:, 1], cos[:, 1]
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = cos[:, 2], sin[:, 2], -sin[:, 2], cos[:, 2]
    rot = rz @ ry @ rx
    out = np.tile(np.eye(4), (n, 1, 1))
    out[:, :3, :3] = rot
    out[:, :3, 3] = params[:, 3:] + c - rot @ c
    return out


def jenkinson_rms(
    m1: np.ndarray, m2: np.ndarray, *, radius: float = 80.0, center: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """RMS displacement between rigid transforms (Jenkinson 1999).

    Parameters
    ----------
    m1, m2 : ndarray, shape (..., 4, 4)
    radius : float, default 80.0
        Radius of the sphere in mm.
    center : 3 floats
        Centre of the sphere in mm.

    Returns
    -------
    ndarray, shape (...)
        ``sqrt(R^2/5 tr(A^T A) + |t + A c|^2)`` with ``[[A, t]] = M2 M1^-1 - I``.
    """
    diff = np.asarray(m2) @ np.linalg.inv(m1) - np.eye(4)
    a, t = diff[..., :3, :3], diff[..., :3, 3]
    shifted = t + a @ np.asarray(center, dtype=float)
    value = radius**2 / 5.0 * np.einsum("...ij,...ij->...", a, a) + np.einsum("...i,...i->...", shifted, shifted)
    return np.sqrt(np.maximum(value, 0.0))


def rms_displacement(
    params: np.ndarray, *, radius: float = 80.0, center: Sequence[float] = (0.0, 0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute and relative RMS displacement as MCFLIRT writes them.

    Parameters
    ----------
    params : ndarray, shape (n_volumes, 6)
    radius : float, default 80.0
    center : 3 floats
        Centre of rotation and of the sphere (mm).

    Returns
    -------
    absolute : ndarray, shape (n_volumes,)
        Against the reference (identity) transform.
    relative : ndarray, shape (n_volumes,)
        Against the previous volume; ``relative[0] = 0``.
    """
    mats = rigid_matrices(params, center=center)
    absolute = jenkinson_rms(np.eye(4), mats, radius=radius, center=center)
    relative = np.concatenate([[0.0], jenkinson_rms(mats[:-1], mats[1:], radius=radius, center=center)])
    return absolute, relative


def spike_regressors(metric: np.ndarray, threshold: float) -> np.ndarray:
    """One-hot columns for the volumes whose metric exceeds ``threshold``.

    Parameters
    ----------
    metric : ndarray, shape (n_volumes,)
        FD or relative RMS per volume.
    threshold : float
        Volumes with ``metric > threshold`` are outliers.

    Returns
    -------
    ndarray, shape (n_volumes, n_outliers)
        As ``fsl_motion_outliers -o`` writes it (no columns when none).
    """
    metric = np.asarray(metric, dtype=float)
    outliers = np.flatnonzero(metric > threshold)
    spikes = np.zeros((metric.size, outliers.size))
    spikes[outliers, np.arange(outliers.size)] = 1.0
    return spikes


def tissue_mask(probseg: np.ndarray, *, threshold: float = 0.9, erode: int = 1) -> np.ndarray:
    """Binary tissue mask from a probability map: ``p > threshold``, then eroded.

    Parameters
    ----------
    probseg : ndarray, shape (x, y, z)
    threshold : float, default 0.9
    erode : int, default 1
        Iterations of binary erosion (6-connected) to keep away from
        partial-volume voxels; 0 keeps the thresholded mask.

    Returns
    -------
    ndarray of bool, shape (x, y, z)
    """
    from scipy import ndimage

    mask = np.nan_to_num(np.asarray(probseg, dtype=float)) > threshold
    if erode > 0:
        mask = ndimage.binary_erosion(mask, iterations=erode)
    return mask


def acompcor(
    signals: Sequence[np.ndarray] | np.ndarray,
    *,
    n_components: int = 5,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Top principal components of detrended, variance-normalised tissue signals.

    Parameters
    ----------
    signals : ndarray, shape (n_volumes, n_voxels), or a sequence of them
        One tissue signal per subject/run (or per tissue). All must have the
        same number of volumes; voxel counts may differ (the batch is
        zero-padded, which leaves the Gram matrix unchanged).
    n_components : int, default 5
    device : torch.device or str
        As ``--device`` (``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'``).

    Returns
    -------
    ndarray, shape (n_volumes, n_components) or (n_signals, n_volumes, n_components)
        Unit-norm components; 3D when a sequence was given.

    Raises
    ------
    InputError
        A signal with fewer voxels or volumes than components.
    """
    single = isinstance(signals, np.ndarray) and signals.ndim == 2
    batch = [np.asarray(signals)] if single else [np.asarray(s) for s in signals]
    n_volumes = batch[0].shape[0]
    if any(s.shape[0] != n_volumes for s in batch):
        raise ValueError("all tissue signals must have the same number of volumes")
    for s in batch:
        if min(s.shape) < n_components:
            raise InputError(
                f"aCompCor needs at least {n_components} voxels and volumes, got a tissue signal of shape "
                f"{s.shape} (volumes, voxels); use a lower tissue threshold, less erosion, or fewer components"
            )
    device = resolve_device(device)
    width = max(s.shape[1] for s in batch)
    data = torch.zeros((len(batch), n_volumes, width), dtype=torch.float32, device=device)
    for i, s in enumerate(batch):
        data[i, :, : s.shape[1]] = as_data(s, device)
    components = _compcor_batch(data, n_components)
    out = to_numpy(components)
    return out[0] if single else out


def _detrend_normalise(data: torch.Tensor) -> torch.Tensor:
    """Remove constant + linear trend per voxel, divide by the std; float64 out."""
    n = data.shape[-2]
    trend = torch.stack(
        [torch.ones(n, dtype=DESIGN_DTYPE, device=data.device), torch.linspace(-1, 1, n, dtype=DESIGN_DTYPE, device=data.device)],
        dim=1,
    )
    basis, _ = torch.linalg.qr(trend)
    x = data.to(DESIGN_DTYPE)
    x = x - basis @ (basis.T @ x)
    std = x.std(dim=-2, keepdim=True)
    return torch.where(std > 1e-12 * x.abs().amax().clamp(min=1.0), x / std.clamp(min=1e-300), torch.zeros_like(x))


def _compcor_batch(data: torch.Tensor, n_components: int) -> torch.Tensor:
    """(b, n_volumes, n_voxels) float32 -> (b, n_volumes, k) float64 components."""
    x = _detrend_normalise(data)
    gram = x @ x.transpose(-1, -2)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    comps = vectors[..., -n_components:].flip(-1)
    peak = comps.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(comps, -2, peak))
    return comps * torch.where(sign == 0, torch.ones_like(sign), sign)
