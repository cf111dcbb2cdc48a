"""What the report draws besides the statistics: an anatomical underlay, tSNR, carpets, censored volumes, QC-FC.

* :func:`underlay`: a T1 template resampled (trilinear, affine-aware) onto
  the study grid, else the mean EPI of the included runs;
* :func:`tsnr` and :func:`carpet`: one run's temporal SNR map and its
  voxels-by-volumes carpet (each voxel detrended and z-scored), as
  fMRIPrep's reports show them;
* :func:`censored_volumes`: the volumes a run's denoising censored (spike
  columns of its design, or the volumes it dropped);
* :func:`qc_fc`: QC-FC, the correlation across subjects of mean framewise
  displacement with each connectivity value (voxel of a seed map, edge of an
  ROI matrix), as xcp_d reports it (Ciric et al. 2017).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from ..core import io
from ..core.prefetch import prefetch

__all__ = ["underlay", "resample_to", "mean_epi", "tsnr", "carpet", "censored_volumes", "qc_fc"]


def resample_to(img: nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """A 3D image's values at the reference grid's voxel centres (trilinear, world coordinates; 0 outside).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        3D (a 4D image's first volume is used).
    reference : nibabel.Nifti1Image
        The target grid (its shape's first three axes and affine).

    Returns
    -------
    ndarray, shape reference.shape[:3]
    """
    data = np.asarray(img.dataobj, dtype=np.float64)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    to_source = np.linalg.solve(img.affine, reference.affine)
    return ndimage.affine_transform(data, to_source[:3, :3], offset=to_source[:3, 3], output_shape=reference.shape[:3],
                                    order=1, mode="constant", cval=0.0)


def mean_epi(paths: Sequence[str | os.PathLike], reference: nib.Nifti1Image) -> np.ndarray:
    """Mean over runs of each run's temporal mean (float64), on the reference grid.

    A run on another grid is resampled (:func:`resample_to`). Runs are read
    ahead by a few threads (:func:`gpuconn.core.prefetch.prefetch`, in the
    caller's device scope; decompression releases the GIL); the sum is
    taken in run order, so the result does not depend on the thread count.
    """

    def run_mean(path) -> np.ndarray:
        img = io.load_header(path, ndim=4, what="BOLD")  # also FEAT folders and AFNI datasets, in standard space
        mean = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3] + (-1,)).mean(axis=-1, dtype=np.float64)
        same = img.shape[:3] == reference.shape[:3] and np.allclose(img.affine, reference.affine, atol=1e-4)
        return mean if same else resample_to(nib.Nifti1Image(mean, img.affine), reference)

    total = np.zeros(reference.shape[:3])
    threads = min(4, os.cpu_count() or 1)
    for mean in prefetch(paths, run_mean, ahead=threads, workers=threads):  # a run in memory per thread
        total += mean
    return total / max(len(paths), 1)


def underlay(template: str | os.PathLike | None, bold_paths: Sequence[str | os.PathLike],
             reference: nib.Nifti1Image) -> tuple[np.ndarray, str]:
    """The report's anatomical background on the study grid, and what it is.

    Parameters
    ----------
    template : path-like or None
        A T1 template in the study's space (``[report] template`` /
        ``--template``); resampled onto ``reference``.
    bold_paths : sequence of path-like
        The included runs' preprocessed BOLD (the mean EPI when no template).
    reference : nibabel.Nifti1Image
        The study grid (the group mask).

    Returns
    -------
    data : ndarray, shape reference.shape[:3]
    description : str
        E.g. ``"T1 template tpl.nii.gz"`` or ``"mean EPI of 20 included runs"``.
    """
    if template:
        img = io.load_image(template, what="report template")
        return resample_to(img, reference), f"T1 template {Path(template).name}"
    return mean_epi(bold_paths, reference), f"mean EPI of {len(bold_paths)} included runs"


def tsnr(data: np.ndarray) -> np.ndarray:
    """Temporal SNR, ``mean / sd`` over the last axis (sample SD, ``ddof=1``); 0 where the SD is 0.

    Parameters
    ----------
    data : ndarray, shape (..., n_volumes)

    Returns
    -------
    ndarray, shape data.shape[:-1]
    """
    data = np.asarray(data, dtype=np.float64)
    mean, sd = data.mean(axis=-1), data.std(axis=-1, ddof=1)
    return np.divide(mean, sd, out=np.zeros_like(mean), where=sd > 0)


def carpet(data: np.ndarray, mask: np.ndarray, *, max_rows: int = 1000) -> np.ndarray:
    """A carpet: in-mask voxels (evenly subsampled to ``max_rows``) by volumes, each linearly detrended and z-scored.

    Parameters
    ----------
    data : ndarray, shape (x, y, z, n_volumes)
    mask : ndarray of bool, shape (x, y, z)
    max_rows : int, default 1000

    Returns
    -------
    ndarray, shape (n_rows, n_volumes)
        Constant voxels are rows of 0.
    """
    series = np.asarray(data, dtype=np.float64)[mask]
    if len(series) > max_rows:
        series = series[np.linspace(0, len(series) - 1, max_rows).round().astype(int)]
    varies = np.ptp(series, axis=1, keepdims=True) > 0  # a constant voxel's detrended rounding noise is not signal
    if series.shape[1] > 2:
        series = series - np.polynomial.polynomial.polyval(np.arange(series.shape[1]), np.polynomial.polynomial.polyfit(
            np.arange(series.shape[1]), series.T, 1))
    sd = series.std(axis=1, keepdims=True)
    return np.divide(series - series.mean(axis=1, keepdims=True), sd, out=np.zeros_like(series), where=varies & (sd > 0))


def censored_volumes(design_tsv: str | os.PathLike) -> np.ndarray:
    """0-based volumes a run's denoising censored, from its ``*_desc-denoised_design.tsv`` and sidecar.

    Spike censoring (``censor = "spikes"``) leaves one ``motion_outlier_*``
    column per censored volume in the design; dropped volumes
    (``censor = "drop"``) are listed in the sidecar (``CensoredVolumes``).

    Returns
    -------
    ndarray of int, sorted
    """
    design = io.read_tsv(design_tsv, what="denoising design")
    spikes = design[[c for c in design.columns if str(c).startswith("motion_outlier_")]].to_numpy(dtype=float)
    found = set(np.flatnonzero((spikes != 0).any(axis=1)).tolist()) if spikes.size else set()
    sidecar = io.sidecar_path(design_tsv)
    if sidecar.exists():
        found |= set(json.loads(sidecar.read_text()).get("CensoredVolumes", []))
    return np.array(sorted(found), dtype=int)


def qc_fc(values: np.ndarray, mean_fd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QC-FC: Pearson r across subjects of mean FD with each connectivity value, and its two-sided p.

    Parameters
    ----------
    values : ndarray, shape (n_subjects, n_values)
        Seed-map voxels or ROI-matrix edges (Fisher z), one row per subject.
    mean_fd : ndarray, shape (n_subjects,)

    Returns
    -------
    r, p : ndarray, shape (n_values,)
        NaN where a value (or FD) is constant across subjects or fewer than
        3 subjects are given.

    See Also
    --------
    scipy.stats.pearsonr : the definition (the tests' reference).
    """
    values = np.asarray(values, dtype=np.float64)
    fd = np.asarray(mean_fd, dtype=np.float64)
    n = len(fd)
    if n < 3:
        return np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    x = fd - fd.mean()
    y = values - values.mean(axis=0)
    denominator = np.sqrt((x @ x) * (y * y).sum(axis=0))
    varies = (np.ptp(values, axis=0) > 0) & (np.ptp(fd) > 0)  # exactly constant: no r (its centred values are rounding noise)
    r = np.divide(x @ y, denominator, out=np.full(values.shape[1], np.nan), where=varies & (denominator > 0))
    r = np.clip(r, -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt((n - 2) / (1.0 - r**2))
    return r, 2 * stats.t.sf(np.abs(t), n - 2)
