"""Subject-level denoising: one nuisance GLM with the filters in it, then smoothing.

Order of operations for one run (what :func:`denoise_runs` does):

1. Load the BOLD series and brain mask; take aCompCor and the global signal
   from the **unsmoothed** data (as fMRIPrep does), so smoothing does not mix
   grey matter into the tissue signals.
2. Build the nuisance design, columns in this order: motion (6 or Friston 24),
   physiological (``hr_crf``, ``rv_rrf``), aCompCor, global signal, extra
   named confounds, motion-outlier spikes, the high-pass discrete cosine set
   (``cosine_XX``: periods longer than ``1 / high_pass``, exactly nilearn's
   ``create_cosine_drift`` / SPM), the optional low-pass cosine set
   (``lowpass_XX``: DCT-II components above ``low_pass``), and a constant.
   All of them are regressed **jointly** in one least-squares model, so the
   filter cannot re-introduce nuisance signal (Lindquist et al. 2018). The
   optional low-pass is the same DCT set at high frequencies, so band-pass
   filtering stays one orthogonal projection (it costs those degrees of
   freedom, as any filter does, and the count is reported).
3. Censoring: motion outliers enter as spike columns (default, as the
   reference study's ``fsl_motion_outliers`` matrix), or their volumes are
   dropped (``censor='drop'``: the cosine set is built on the full time grid,
   then the censored rows are removed from data and design, as nilearn does).
   A spike column fits its volume exactly, so that volume's residuals are 0:
   the sidecar lists those volumes (``SpikeCensoredVolumes``) and the seed
   and ROI maps leave them out rather than correlate zeros.
4. Rank: columns are scaled to unit maximum, a column-pivoted QR finds the
   rank, and columns that depend on the others are **dropped with a warning
   naming them** (and listed in the sidecar). Fewer than ``min_dof``
   (default 10) residual degrees of freedom is an :class:`InputError`.
5. Residuals ``Y - Q Q^T Y`` (``Q`` orthonormal basis of the kept design, in
   float64; data are float32 on the device and cast to float64 chunk by
   chunk for the projection). Residuals have zero mean (the constant is in
   the model).
6. Gaussian smoothing with ``fwhm`` mm inside the brain mask:
   ``sigma = fwhm / (2 sqrt(2 ln 2)) / voxel_size`` per axis, kernel truncated
   at 4 sigma as :func:`scipy.ndimage.gaussian_filter`, separable 1-D
   convolutions (each a product with a banded matrix along one axis, over
   the mask's bounding box); the result is ``S(Y * m) / S(m)`` inside the mask ``m`` and
   0 outside, so voxels near the mask edge are not darkened by the zeros
   outside the brain. Because the design is shared by all voxels of a run,
   spatial smoothing and the temporal projection commute exactly: smoothing
   the residuals equals regressing the smoothed data (FSL FEAT smooths first,
   then filters; the result is the same).

Runs are batched on the device (zero-padded to a common number of volumes
and voxels, which leaves each projection unchanged) and streamed: only one
batch of runs is held in memory at a time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import linalg

from ..core.backend import DESIGN_DTYPE, as_data, resolve_device, to_numpy, uses_device
from ..core.bids import DEFAULT_SPACE, find_runs
from ..core.errors import InputError, OptionError
from ..core.io import (
    check_same_grid, load_header, load_image, load_mask, masked_data, read_tsv, save_image, sidecar_path, split_ext,
    write_tsv,
)
from ..core.prefetch import images_ahead, prefetch
from ..core.tasks import map_tasks
from . import confounds as cf
from .options import DenoiseOptions
from .physio import PHYSIO_COLUMNS, physio_confounds, physio_regressors

__all__ = [
    "DenoiseOptions",
    "SPIKE_VOLUMES_KEY",
    "RunFiles",
    "PreparedRun",
    "cosine_basis",
    "lowpass_basis",
    "nuisance_design",
    "drop_dependent_columns",
    "orthonormal_basis",
    "regress_out",
    "gaussian_sigma",
    "gaussian_kernel",
    "smooth",
    "repetition_time",
    "prepare_run",
    "clean_runs",
    "denoise_runs",
    "output_paths",
    "finished_run",
    "collect_runs",
]

#: Sidecar entry listing the output volumes fitted by spike regressors (all-zero residuals): the seed and ROI maps
#: leave them out (:func:`gpuconn.maps.series.prepare_inputs`).
SPIKE_VOLUMES_KEY = "SpikeCensoredVolumes"

_VOXEL_CHUNK = 65536  # voxels cast to float64 at a time in the projection


@dataclass(frozen=True)
class RunFiles:
    """The input files of one run (None where absent).

    ``confounds`` is a fMRIPrep confounds TSV; ``motion_par`` an MCFLIRT
    ``.par`` (used for motion instead of the TSV's columns);
    ``censor_file`` an fsl_motion_outliers matrix (used instead of
    detecting outliers); ``physio`` a BIDS ``*_physio.tsv.gz``; ``wm`` and
    ``csf`` probability maps (or binary masks) on the BOLD grid.
    """

    bold: Path
    mask: Path
    confounds: Path | None = None
    motion_par: Path | None = None
    censor_file: Path | None = None
    physio: Path | None = None
    wm: Path | None = None
    csf: Path | None = None
    label: str = ""

    @classmethod
    def from_run(cls, run, **overrides) -> "RunFiles":
        """From a :class:`gpuconn.core.bids.Run`, fields in ``overrides`` replacing the run's (no mask is an error)."""
        fields = dict(bold=run.bold, mask=run.mask, confounds=run.confounds, physio=run.physio, wm=run.wm, csf=run.csf, label=run.label,
                      motion_par=getattr(run, "motion", None), censor_file=getattr(run, "censor", None))
        fields.update(overrides)
        if fields["mask"] is None:
            raise OptionError(f"no brain mask (*_desc-brain_mask.nii.gz) beside {run.bold}; give one with {{mask}}")
        return cls(**fields)


@dataclass
class PreparedRun:
    """A validated run: its data in the mask and the design that cleans it.

    Attributes
    ----------
    files : RunFiles
    img : nibabel.Nifti1Image
    mask : ndarray of bool, shape (x, y, z)
    data : ndarray, shape (n_volumes, n_voxels), float32
    design : pandas.DataFrame, shape (n_kept, n_columns)
        The design actually used (dependent columns removed).
    keep : ndarray of bool, shape (n_volumes,)
        Volumes kept (all unless ``censor='drop'``).
    dropped_columns : list of str
    n_outliers : int
    tr : float
    spike_volumes : list of int
        Volumes (0-based, of the output series) fitted by a spike regressor
        (``censor='spikes'``): their residuals are exactly 0.
    """

    files: RunFiles
    img: nib.Nifti1Image
    mask: np.ndarray
    data: np.ndarray
    design: pd.DataFrame
    keep: np.ndarray
    dropped_columns: list[str] = field(default_factory=list)
    n_outliers: int = 0
    tr: float = 0.0
    spike_volumes: list[int] = field(default_factory=list)

    @property
    def dof(self) -> int:
        """Residual degrees of freedom."""
        return int(self.keep.sum()) - self.design.shape[1]


def _dct_columns(n_volumes: int, ks: np.ndarray) -> np.ndarray:
    t = np.arange(n_volumes)
    return np.sqrt(2.0 / n_volumes) * np.cos(np.pi / n_volumes * (t[:, None] + 0.5) * ks[None, :])


def cosine_basis(n_volumes: int, *, tr: float, high_pass: float) -> np.ndarray:
    """High-pass discrete cosine set, as nilearn ``create_cosine_drift`` (no constant).

    Parameters
    ----------
    n_volumes : int
    tr : float
        Seconds.
    high_pass : float
        Hz; components with frequency ``k / (2 n TR) <= high_pass`` are kept.

    Returns
    -------
    ndarray, shape (n_volumes, floor(2 n TR high_pass))
    """
    order = min(n_volumes - 1, int(np.floor(2 * n_volumes * high_pass * tr)))
    return _dct_columns(n_volumes, np.arange(1, order + 1))


def lowpass_basis(n_volumes: int, *, tr: float, low_pass: float) -> np.ndarray:
    """DCT-II components with frequency ``k / (2 n TR) > low_pass`` (their removal low-passes).

    Returns
    -------
    ndarray, shape (n_volumes, n_components)
    """
    first = int(np.floor(2 * n_volumes * low_pass * tr)) + 1
    return _dct_columns(n_volumes, np.arange(max(first, 1), n_volumes))


def nuisance_design(
    confounds: pd.DataFrame,
    *,
    tr: float,
    high_pass: float | None,
    low_pass: float | None = None,
) -> pd.DataFrame:
    """Append the cosine sets and a constant to the confounds.

    Parameters
    ----------
    confounds : pandas.DataFrame, shape (n_volumes, n_confounds)
    tr : float
    high_pass, low_pass : float or None
        Hz.

    Returns
    -------
    pandas.DataFrame, shape (n_volumes, n_confounds + n_cosines + 1)

    Raises
    ------
    OptionError
        ``high_pass`` at or above the Nyquist frequency ``1 / (2 tr)``;
        ``low_pass`` not above ``high_pass``.
    """
    n = len(confounds)
    parts = [confounds.reset_index(drop=True)]
    nyquist = 0.5 / tr
    if high_pass and high_pass >= nyquist:
        raise OptionError(f"{{high_pass}} {high_pass:g} Hz is at or above the Nyquist frequency {nyquist:.4g} Hz of "
                          f"TR {tr:g} s: it would remove the whole signal; give a cutoff in Hz, e.g. {{high_pass}} "
                          "0.006 (a period of 167 s)")
    if high_pass:
        hp = cosine_basis(n, tr=tr, high_pass=high_pass)
        parts.append(pd.DataFrame(hp, columns=[f"cosine_{i:02d}" for i in range(hp.shape[1])]))
    if low_pass:
        if high_pass and low_pass <= high_pass:
            raise OptionError(f"{{low_pass}} {low_pass} Hz must be above {{high_pass}} {high_pass} Hz")
        lp = lowpass_basis(n, tr=tr, low_pass=low_pass)
        parts.append(pd.DataFrame(lp, columns=[f"lowpass_{i:02d}" for i in range(lp.shape[1])]))
    parts.append(pd.DataFrame({"constant": np.ones(n)}))
    return pd.concat(parts, axis=1)


def drop_dependent_columns(design: pd.DataFrame, *, source: str | os.PathLike = "design") -> tuple[pd.DataFrame, list[str]]:
    """Remove columns that are linear combinations of the others, with a warning.

    Columns are scaled to unit maximum magnitude; a column-pivoted QR ranks
    them and those past the numerical rank (``|R_ii| <= max(n, p) eps |R_00|``)
    are dropped. All-zero columns are always dropped.

    Returns
    -------
    design : pandas.DataFrame
        The kept columns, in their original order.
    dropped : list of str
    """
    values = design.to_numpy(dtype=float)
    scale = np.abs(values).max(axis=0)
    scaled = values / np.where(scale > 0, scale, 1.0)
    _, r, perm = linalg.qr(scaled, mode="economic", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = max(scaled.shape) * np.finfo(float).eps * (diag[0] if diag.size else 0.0)
    rank = int((diag > tol).sum())
    dropped_idx = sorted(set(perm[rank:].tolist()) | set(np.flatnonzero(scale == 0).tolist()))
    dropped = [str(design.columns[i]) for i in dropped_idx]
    if dropped:
        warnings.warn(
            f"nuisance design for {source}: dropped {len(dropped)} column(s) that depend on the others: {', '.join(dropped)}",
            UserWarning,
            stacklevel=2,
        )
    return design.drop(columns=dropped), dropped


def orthonormal_basis(design: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Orthonormal basis of the design's column space on the kept volumes.

    Parameters
    ----------
    design : ndarray, shape (n_kept, p)
        Full column rank (see :func:`drop_dependent_columns`).
    keep : ndarray of bool, shape (n_volumes,), optional
        Where the kept rows sit; the returned basis has zero rows elsewhere.

    Returns
    -------
    ndarray, shape (n_volumes, p), float64
    """
    q, _ = np.linalg.qr(np.asarray(design, dtype=float))
    if keep is None:
        return q
    full = np.zeros((keep.size, q.shape[1]))
    full[keep] = q
    return full


def regress_out(data: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Residuals of a batch of runs after projecting out their nuisance bases.

    Parameters
    ----------
    data : torch.Tensor, shape (n_runs, n_volumes, n_voxels), float32
    bases : torch.Tensor, shape (n_runs, n_volumes, p), float64
        Orthonormal columns (zero-padded rows/columns allowed), same device.

    Returns
    -------
    torch.Tensor, shape (n_runs, n_volumes, n_voxels), float32
        ``Y - Q (Q^T Y)`` computed in float64, chunk by chunk over voxels.
    """
    out = torch.empty_like(data)
    qt = bases.transpose(-1, -2)
    for start in range(0, data.shape[-1], _VOXEL_CHUNK):
        y = data[..., start : start + _VOXEL_CHUNK].to(DESIGN_DTYPE)
        out[..., start : start + _VOXEL_CHUNK] = (y - bases @ (qt @ y)).to(data.dtype)
    return out


def gaussian_sigma(fwhm: float, voxel_size: Sequence[float]) -> np.ndarray:
    """Gaussian sigma in voxels per axis: ``fwhm / (2 sqrt(2 ln 2)) / voxel_size``."""
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / np.asarray(voxel_size, dtype=float)


def gaussian_kernel(sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian weights as :func:`scipy.ndimage.gaussian_filter1d` uses them.

    Returns
    -------
    ndarray, shape (2 r + 1,)
        ``r = int(truncate sigma + 0.5)``, normalised to sum 1.
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _gaussian_matrix(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """(size, size) banded matrix applying the truncated kernel with zeros beyond the edges."""
    kernel = gaussian_kernel(sigma)
    radius = kernel.size // 2
    offset = np.arange(size)[None, :] - np.arange(size)[:, None]
    matrix = np.where(np.abs(offset) <= radius, kernel[np.clip(offset + radius, 0, kernel.size - 1)], 0.0)
    return torch.as_tensor(matrix, dtype=like.dtype, device=like.device)


def _convolve_separable(volumes: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Zero-padded separable Gaussian of (n, x, y, z) volumes.

    Each 1-D pass is a product with a banded (symmetric) matrix along one
    axis: one large matmul per axis, fast on both CPU (BLAS) and GPU.
    """
    x = volumes
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        matrix = _gaussian_matrix(x.shape[axis + 1], float(sigma), x)
        x = torch.movedim(torch.movedim(x, axis + 1, -1) @ matrix, -1, axis + 1)
    return x


def smooth(volumes: torch.Tensor, mask: torch.Tensor, *, fwhm: float, voxel_size: Sequence[float]) -> torch.Tensor:
    """Gaussian smoothing inside a mask, normalised by the smoothed mask.

    Parameters
    ----------
    volumes : torch.Tensor, shape (n, x, y, z)
    mask : torch.Tensor of bool, shape (x, y, z)
    fwhm : float
        mm.
    voxel_size : 3 floats
        mm.

    Returns
    -------
    torch.Tensor, shape (n, x, y, z)
        ``S(v m) / S(m)`` inside the mask, 0 outside; ``volumes`` unchanged
        when ``fwhm`` is 0.

    See Also
    --------
    scipy.ndimage.gaussian_filter, nilearn.image.smooth_img : the same
        kernel (``truncate=4``), without the mask normalisation.
    """
    if fwhm <= 0:
        return volumes
    sigmas = gaussian_sigma(fwhm, voxel_size)
    # everything outside the mask is zero, so the mask's bounding box is all the work
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in torch.nonzero(mask, as_tuple=True)) if mask.any() else None
    out = torch.zeros_like(volumes)
    if box is None:
        return out
    sub_mask = mask[box]
    m = sub_mask.to(volumes.dtype)
    weight = _convolve_separable(m.unsqueeze(0), sigmas)[0]
    smoothed = _convolve_separable(volumes[(slice(None),) + box] * m, sigmas)
    tiny = torch.finfo(volumes.dtype).tiny
    out[(slice(None),) + box] = torch.where(sub_mask, smoothed / weight.clamp(min=tiny), torch.zeros_like(smoothed))
    return out


def repetition_time(img: nib.Nifti1Image, path, override: float | None = None) -> float:
    """TR in seconds: ``override``, else the NIfTI header (ms headers converted), else the BIDS sidecar.

    A header TR of 0 or none (some converters and resampling tools write
    that) falls back to ``RepetitionTime`` in the BOLD's JSON sidecar, with
    a warning saying so.
    """
    if override is not None:
        if override <= 0:
            raise OptionError(f"{{tr}} must be positive, got {override}")
        return float(override)
    zooms = img.header.get_zooms()
    tr = float(zooms[3]) if len(zooms) > 3 else 0.0
    if img.header.get_xyzt_units()[1] == "msec":
        tr /= 1000.0
    if tr > 0:
        return tr
    sidecar = sidecar_path(path)
    try:
        from_sidecar = float(json.loads(sidecar.read_text()).get("RepetitionTime", 0.0)) if sidecar.exists() else 0.0
    except (ValueError, TypeError, AttributeError) as exc:
        raise OptionError(f"{sidecar} has no readable RepetitionTime ({exc}); fix the sidecar or pass {{tr}}") from exc
    if not from_sidecar > 0:
        raise OptionError(f"BOLD {path} has no repetition time in its header (pixdim[4] = {tr}) nor a RepetitionTime "
                          f"in {sidecar.name}; pass {{tr}}")
    warnings.warn(f"{path}: the header's repetition time is {tr}; using RepetitionTime = {from_sidecar} s from "
                  f"{sidecar.name}", UserWarning, stacklevel=2)
    return from_sidecar


def _on_bold_grid(prob: nib.Nifti1Image, path, img: nib.Nifti1Image, bold) -> nib.Nifti1Image:
    """A WM/CSF probability map on the BOLD grid: as it is, or resampled (trilinear, through both affines).

    fMRIPrep writes the anatomical ``res-1`` maps beside a ``res-2`` BOLD in
    the same space; they are resampled with a warning naming both grids.
    """
    try:
        check_same_grid(img, bold, prob, path)
        return prob
    except InputError:
        from nibabel.processing import resample_from_to

    shape = img.shape[:3]
    warnings.warn(f"{path}: its {prob.shape[:3]} grid of {tuple(float(z) for z in prob.header.get_zooms()[:3])} mm "
                  f"is not the BOLD's ({shape}, {bold}); resampled to it (trilinear, by the affines)",
                  UserWarning, stacklevel=3)
    return resample_from_to(prob, (shape, img.affine), order=1)


def _tissue_signals(files: RunFiles, img, data_4d: np.ndarray | None, options: DenoiseOptions) -> list[tuple[str, np.ndarray | None]]:
    """WM and CSF signals (n_volumes, n_voxels) in their thresholded, eroded masks.

    Combined mode needs ``acompcor`` voxels in WM and CSF together; separate
    mode in each.
    """
    masks = []
    for name, path in (("wm", files.wm), ("csf", files.csf)):
        prob = _on_bold_grid(load_image(path, ndim=3, what=f"{name.upper()} map"), path, img, files.bold)
        masks.append((name, path, cf.tissue_mask(np.asarray(prob.dataobj), threshold=options.tissue_threshold, erode=options.erode)))
    groups = [masks] if options.acompcor_mode == "combined" else [[m] for m in masks]
    for group in groups:
        count = sum(int(m.sum()) for _, _, m in group)
        if count < options.acompcor:
            where = " and ".join(f"{name.upper()} map {path}" for name, path, _ in group)
            raise OptionError(
                f"{where} leave{'s' if len(group) == 1 else ''} {count} voxels after threshold {options.tissue_threshold} "
                f"and {options.erode} erosion(s); aCompCor needs at least {options.acompcor}: lower {{tissue_threshold}} "
                "or use {erode} 0"
            )
    return [(name, None if data_4d is None else data_4d[m].T) for name, _, m in masks]


def _acompcor(files: RunFiles, img, data_4d, options: DenoiseOptions, device) -> pd.DataFrame:
    k = options.acompcor
    if files.wm is not None and files.csf is not None:
        tissues = _tissue_signals(files, img, data_4d, options)
        if data_4d is None:  # validation pass: right shape, generic values
            n_cols = k if options.acompcor_mode == "combined" else 2 * k
            return pd.DataFrame(_placeholder(img.shape[-1], n_cols), columns=[f"placeholder_{i:02d}" for i in range(n_cols)])
        if options.acompcor_mode == "combined":
            comps = cf.acompcor(np.hstack([s for _, s in tissues]), n_components=k, device=device)
            return pd.DataFrame(comps, columns=[f"a_comp_cor_{i:02d}" for i in range(k)])
        stacked = cf.acompcor([s for _, s in tissues], n_components=k, device=device)
        return pd.concat(
            [pd.DataFrame(c, columns=[f"{name}_comp_cor_{i:02d}" for i in range(k)]) for (name, _), c in zip(tissues, stacked)],
            axis=1,
        )
    names = [f"a_comp_cor_{i:02d}" for i in range(k)]
    if files.confounds is not None:
        available = read_tsv(files.confounds, what="confounds").columns
        if all(n in available for n in names):
            warnings.warn(f"no WM/CSF maps for {files.bold}; using {names[0]}..{names[-1]} from {files.confounds}", UserWarning, stacklevel=3)
            table = cf.read_fmriprep_confounds(files.confounds, names)
            cf.check_length(table, img.shape[-1], files.confounds, files.bold)
            return table
    raise OptionError(
        f"aCompCor needs WM and CSF maps ({{wm}}/{{csf}}) or a_comp_cor_XX columns in the confounds for {files.bold}; "
        "pass them or use {acompcor} 0"
    )


def _outliers(files: RunFiles, params: np.ndarray | None, n_volumes: int, options: DenoiseOptions) -> np.ndarray:
    """Spike matrix (n_volumes, n_outliers) from a censor file or the motion metric."""
    if files.censor_file is not None:
        spikes = cf.read_censor(files.censor_file)
        cf.check_length(spikes, n_volumes, files.censor_file, files.bold)
        return spikes
    if options.outlier_metric == "none":
        return np.zeros((n_volumes, 0))
    if params is None:
        raise OptionError(f"outlier detection needs motion parameters for {files.bold}; pass {{confounds}} or "
                          "{motion_par}, or {outlier_metric} none")
    metric = cf.framewise_displacement(params) if options.outlier_metric == "fd" else cf.rms_displacement(params)[1]
    return cf.spike_regressors(metric, options.outlier_threshold)


_PER_VOLUME_PHYSIO = ("heart_rate", "respiratory_volume")


def _physio_table(files: RunFiles, tr: float, n_volumes: int) -> pd.DataFrame | None:
    """HR/RV regressors from the recording, else from per-volume confounds columns, else None."""
    if files.physio is not None:
        return physio_confounds(files.physio, tr=tr, n_volumes=n_volumes)
    if files.confounds is not None and set(_PER_VOLUME_PHYSIO) <= set(read_tsv(files.confounds, what="confounds").columns):
        table = cf.read_fmriprep_confounds(files.confounds, list(_PER_VOLUME_PHYSIO))
        cf.check_length(table, n_volumes, files.confounds, files.bold)
        regressors = physio_regressors(table["heart_rate"].to_numpy(), table["respiratory_volume"].to_numpy(), tr=tr)
        return pd.DataFrame(regressors, columns=list(PHYSIO_COLUMNS))
    return None


def _placeholder(n_volumes: int, n_columns: int) -> np.ndarray:
    """Generic (full-rank) stand-ins for data-derived regressors in the validation pass."""
    return np.random.default_rng(0).standard_normal((n_volumes, n_columns))


def _confound_table(files: RunFiles, img, data_4d, brain: np.ndarray, tr: float, options: DenoiseOptions, device) -> tuple[pd.DataFrame, np.ndarray]:
    """Nuisance regressors (before the cosine sets) and the spike matrix.

    ``data_4d`` None is the validation pass: data-derived columns get placeholders.
    """
    n = img.shape[-1]
    parts = []
    # motion is read only for what uses it: a TSV without motion columns serves --motion none runs
    detect = files.censor_file is None and options.outlier_metric != "none"
    params = None
    if options.motion != "none" or detect:
        params = cf.load_motion(confounds=files.confounds, motion_par=files.motion_par, n_volumes=n, bold=files.bold)
    if options.motion != "none":
        if params is None:
            raise OptionError(f"{{motion}} {options.motion} needs {{confounds}} (fMRIPrep TSV) or {{motion_par}} for "
                              f"{files.bold}")
        if options.motion == "24":
            parts.append(pd.DataFrame(cf.friston24(params), columns=cf.friston24_names()))
        else:
            parts.append(pd.DataFrame(params, columns=list(cf.MOTION_COLUMNS)))
    if options.physio != "no":
        physio = _physio_table(files, tr, n)
        if physio is not None:
            parts.append(physio)
        elif options.physio == "yes":
            raise OptionError(
                f"{{physio}} yes but no *_physio.tsv.gz and no {'/'.join(_PER_VOLUME_PHYSIO)} confounds columns "
                f"for {files.bold}; pass {{physio_file}} FILE or use {{physio}} auto"
            )
    if options.acompcor > 0:
        parts.append(_acompcor(files, img, data_4d, options, device))
    if options.global_signal:
        gs = _placeholder(n, 1)[:, 0] if data_4d is None else data_4d[brain].mean(axis=0)
        parts.append(pd.DataFrame({"global_signal": gs}))
    if options.columns:
        if files.confounds is None:
            raise OptionError(f"{{columns}} {','.join(options.columns)} needs a confounds TSV for {files.bold}")
        extra = cf.read_fmriprep_confounds(files.confounds, list(options.columns))
        cf.check_length(extra, n, files.confounds, files.bold)
        parts.append(extra)
    spikes = _outliers(files, params, n, options)
    table = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=range(n))
    return table, spikes


@uses_device
def prepare_run(
    files: RunFiles,
    options: DenoiseOptions = DenoiseOptions(),
    *,
    device: torch.device | str = "cpu",
    load_data: bool = True,
) -> PreparedRun:
    """Load and validate one run and build its nuisance design.

    Parameters
    ----------
    files : RunFiles
    options : DenoiseOptions
    device : torch.device or str
        Where aCompCor is computed, and FEAT inputs are resampled.
    load_data : bool, default True
        False is a cheap validation pass: the BOLD data stay on disk, aCompCor
        and global-signal columns are placeholders, ``data`` is empty; every
        file, length, column and degrees-of-freedom check still runs.

    Returns
    -------
    PreparedRun

    Raises
    ------
    InputError
        Any input problem (grids, lengths, NaNs, missing columns, too few
        degrees of freedom), naming the file.
    """
    img = load_image(files.bold, ndim=4, what="BOLD") if load_data else load_header(files.bold, ndim=4, what="BOLD")
    brain, _ = load_mask(files.mask, reference=img, reference_path=files.bold, what="brain mask")
    tr = repetition_time(img, files.bold, options.tr)
    data_4d = np.asarray(img.dataobj) if load_data else None
    n = img.shape[-1]
    table, spikes = _confound_table(files, img, data_4d, brain, tr, options, device)
    keep = np.ones(n, dtype=bool)
    if options.censor == "drop":
        keep = ~spikes.astype(bool).any(axis=1)
    elif spikes.shape[1]:
        table = pd.concat([table, pd.DataFrame(spikes, columns=[f"motion_outlier_{i:02d}" for i in range(spikes.shape[1])])], axis=1)
    design = nuisance_design(table, tr=tr, high_pass=options.high_pass, low_pass=options.low_pass)
    design, dropped = design.loc[keep].reset_index(drop=True), []
    if design.shape[1] < keep.sum():  # else too few volumes whatever the rank: said below
        design, dropped = drop_dependent_columns(design, source=files.bold)
    dof = int(keep.sum()) - design.shape[1]
    if dof < options.min_dof:
        raise InputError(
            f"{files.bold}: {max(dof, 0)} residual degrees of freedom left ({int(keep.sum())} volumes kept, "
            f"{design.shape[1]} regressors); need at least {options.min_dof}: use fewer regressors or a higher outlier threshold"
        )
    data = masked_data(img, brain, path=files.bold) if load_data else np.empty((n, 0), dtype=np.float32)
    spiked = np.flatnonzero(spikes.astype(bool).any(axis=1)).tolist() if options.censor == "spikes" else []
    return PreparedRun(files, img, brain, data, design, keep, dropped, int(spikes.shape[1]), tr, spiked)


def clean_runs(runs: Sequence[PreparedRun], *, fwhm: float, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Regress each run's design out of its data (batched), then smooth.

    Parameters
    ----------
    runs : sequence of PreparedRun
    fwhm : float
        mm; 0 for none.
    device : torch.device or str

    Returns
    -------
    list of ndarray, each shape (x, y, z, n_kept), float32
    """
    device = resolve_device(device)
    n_max = max(r.data.shape[0] for r in runs)
    v_max = max(r.data.shape[1] for r in runs)
    p_max = max(r.design.shape[1] for r in runs)
    data = torch.zeros((len(runs), n_max, v_max), dtype=torch.float32, device=device)
    bases = torch.zeros((len(runs), n_max, p_max), dtype=DESIGN_DTYPE, device=device)
    for i, r in enumerate(runs):
        n, v = r.data.shape
        keep = np.concatenate([r.keep, np.zeros(n_max - n, dtype=bool)])
        q = orthonormal_basis(r.design.to_numpy(float), keep)
        bases[i, :, : q.shape[1]] = torch.as_tensor(q, device=device)
        data[i, :n, :v] = as_data(r.data, device) * torch.as_tensor(keep[:n, None], device=device)
    residuals = regress_out(data, bases)
    del data, bases
    out = []
    for i, r in enumerate(runs):
        n, v = r.data.shape
        res = residuals[i, :n, :v][torch.as_tensor(r.keep, device=device)]
        mask = torch.as_tensor(r.mask, device=device)
        volumes = torch.zeros((res.shape[0],) + r.mask.shape, dtype=res.dtype, device=device)
        volumes[:, mask] = res
        volumes = smooth(volumes, mask, fwhm=fwhm, voxel_size=r.img.header.get_zooms()[:3])
        out.append(np.moveaxis(to_numpy(volumes), 0, -1))
    return out


def collect_runs(
    derivatives: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    participant_label: Sequence[str] | None = None,
    space: str | None = None,
    **overrides,
) -> tuple[list[RunFiles], list[Path]]:
    """The runs of a derivatives folder and their output folders (``out/sub-X[/ses-Y]/func``).

    Parameters
    ----------
    derivatives, out_dir : path-like
    participant_label : sequence of str, optional
    space : str, optional
        Default :data:`gpuconn.core.bids.DEFAULT_SPACE`.
    **overrides
        :class:`RunFiles` fields (``mask``, ``wm``, ``csf``) that replace
        every run's own, e.g. a template mask where runs have none.

    Returns
    -------
    files : list of RunFiles
    out_dirs : list of Path
    """
    runs = find_runs(derivatives, participant_label=participant_label, space=space or DEFAULT_SPACE)
    files = [RunFiles.from_run(run, **overrides) for run in runs]
    out_dirs = [Path(out_dir) / run.bold.parent.relative_to(Path(derivatives)) for run in runs]
    return files, out_dirs


def output_paths(files: RunFiles, out_dir: str | os.PathLike) -> dict[str, Path]:
    """BIDS-derivative output names: ``*_desc-denoised_bold.nii.gz``, ``*_desc-denoised_design.tsv``, ``*_desc-brain_mask.nii.gz``.

    The mask is the one the run was denoised and smoothed in, written beside
    it as fMRIPrep names masks, so the output folder is itself a derivatives
    folder (``gpuconn seed --derivatives OUT --bold-desc denoised`` needs no
    ``--mask``).
    """
    name = files.bold.name
    stem = name.split("_desc-")[0] if "_desc-" in name else split_ext(name)[0].split("_bold")[0]  # also x+tlrc.HEAD, x.feat
    folder = Path(out_dir)
    return {
        "bold": folder / f"{stem}_desc-denoised_bold.nii.gz",
        "design": folder / f"{stem}_desc-denoised_design.tsv",
        "mask": folder / f"{stem}_desc-brain_mask.nii.gz",
    }


def _sources(files: RunFiles) -> dict[str, Path]:
    """The input files of a run as its sidecar records them (``Sources``)."""
    return {k: v for k, v in vars(files).items() if v is not None and k != "label"}


def finished_run(files: RunFiles, out_dir: str | os.PathLike, options: DenoiseOptions) -> bool:
    """Whether a run's outputs are complete from the same inputs and settings, so a rerun may skip it.

    True when all three outputs (:func:`output_paths`) exist, the BOLD's
    sidecar records the same ``Sources`` and ``Options``, and no input file
    is newer than the denoised BOLD. Each output is written atomically and
    the mask last, so an interrupted run is never taken as finished.
    """
    from dataclasses import asdict

    paths = output_paths(files, out_dir)
    sidecar = sidecar_path(paths["bold"])
    if not all(p.exists() for p in (*paths.values(), sidecar)):
        return False
    try:
        recorded = json.loads(sidecar.read_text()).get("Parameters", {})
    except (json.JSONDecodeError, OSError, AttributeError):
        return False
    same = (recorded.get("Sources") == {k: str(v) for k, v in _sources(files).items()}
            and recorded.get("Options") == json.loads(json.dumps(asdict(options))))
    written = paths["bold"].stat().st_mtime
    return same and all(Path(p).stat().st_mtime <= written for p in _sources(files).values() if Path(p).exists())


def _params(run: PreparedRun, options: DenoiseOptions) -> dict:
    from dataclasses import asdict

    return {
        "Sources": _sources(run.files),
        "Options": asdict(options),
        "RepetitionTime": run.tr,
        "Columns": list(run.design.columns),
        "DroppedColumns": run.dropped_columns,
        "NumberOfOutliers": run.n_outliers,
        "VolumesKept": int(run.keep.sum()),
        "CensoredVolumes": np.flatnonzero(~run.keep).tolist(),
        SPIKE_VOLUMES_KEY: run.spike_volumes,
        "ResidualDegreesOfFreedom": run.dof,
        "Order": "confounds (+aCompCor/global from unsmoothed data) + cosine high-pass (+low-pass) + constant regressed jointly; then Gaussian smoothing inside the brain mask normalised by the smoothed mask",
    }


@uses_device
def denoise_runs(
    files: Sequence[RunFiles],
    out_dirs: Sequence[str | os.PathLike],
    options: DenoiseOptions = DenoiseOptions(),
    *,
    device: torch.device | str = "auto",
    batch_size: int = 1,
    on_run: Callable[[int], None] | None = None,
    read_ahead: int = 1,
    client=None,
    progress: bool = False,
) -> Iterator[dict[str, Path]]:
    """Denoise runs, streaming ``batch_size`` runs at a time; write NIfTI, design TSV, JSON.

    Each batch is fully validated before any of its outputs is written.
    While a batch is cleaned on the device, the next ``read_ahead`` batches
    are read and prepared on threads (:func:`gpuconn.core.prefetch.prefetch`;
    fewer when they would take over a quarter of the host's available
    memory); the outputs are identical to a serial run. With ``client``,
    each batch is one Dask task that denoises and writes its runs on a
    worker (the same batches as in one process, so the same outputs); the
    paths come once every task has finished.

    Parameters
    ----------
    files : sequence of RunFiles
    out_dirs : sequence of path-like
        Output folder per run.
    options : DenoiseOptions
    device : torch.device or str
    batch_size : int, default 1
    on_run : callable, optional
        Called with the number of runs finished (progress).
    read_ahead : int, default 1
        Batches prepared ahead; 0 reads serially.
    client : distributed.Client, optional
        Run the batches as Dask tasks (:func:`gpuconn.core.tasks.map_tasks`);
        ``device`` is resolved on each worker.
    progress : bool, default False
        With ``client``: a progress bar over the finished tasks.

    Yields
    ------
    dict
        The output paths of each run (see :func:`output_paths`).
    """
    if client is not None:
        pairs = [(f, Path(d)) for f, d in zip(files, out_dirs, strict=True)]
        batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
        task = functools.partial(_denoise_batch, options=options, device=str(device))
        for paths in map_tasks(client, task, batches, description="denoise", progress=progress):
            yield from paths
            if on_run is not None:
                on_run(len(paths))
        return
    device = resolve_device(device)
    starts = range(0, len(files), batch_size)
    read_ahead = images_ahead(files[0].bold, read_ahead, n_items=len(starts), images_per_item=batch_size, ndim=4,
                              what="BOLD") if files else 0
    batches = prefetch(starts, lambda start: [prepare_run(f, options, device=device)
                                              for f in files[start : start + batch_size]], ahead=read_ahead)
    for start, batch in zip(starts, batches):
        cleaned = clean_runs(batch, fwhm=options.fwhm, device=device)
        for run, volumes, out_dir in zip(batch, cleaned, out_dirs[start : start + batch_size]):
            paths = output_paths(run.files, out_dir)
            params = _params(run, options)
            write_tsv(run.design, paths["design"], params=params, sidecar=False, float_format="%.8g")
            save_image(volumes, run.img, paths["bold"], params=params)
            save_image(run.mask.astype(np.uint8), run.img.slicer[..., 0], paths["mask"], sidecar=False, dtype=np.uint8)
            yield paths
        if on_run is not None:
            on_run(len(batch))
        del batch, cleaned


def _denoise_batch(
    batch: Sequence[tuple[RunFiles, Path]], options: DenoiseOptions, device: str
) -> list[dict[str, Path]]:
    """One Dask task: :func:`denoise_runs` on one batch of runs, written on the worker."""
    files, out_dirs = zip(*batch)
    return list(denoise_runs(files, out_dirs, options, device=device, batch_size=len(files)))
