"""Parametric GLM with Gaussian-random-field cluster inference (FSL smoothest + cluster).

This is the reference study's inference: OLS t maps turned into z, the
smoothness of the residuals estimated as FSL ``smoothest`` does, and
cluster p-values from Gaussian random field theory as FSL ``cluster`` /
``easythresh`` give them (cluster-forming Z, cluster p < alpha).

Smoothness (FSL ``smoothest``)
------------------------------
Residuals are standardised per voxel (mean 0, variance 1 over volumes).
Along each axis ``d``, the lag-1 correlation ``rho_d`` is the sum over the
non-edge voxels (those whose x-1, y-1, z-1 neighbours are in the mask) and
volumes of ``u(v) u(v - e_d)`` divided by the same sum of
``(u(v)^2 + u(v - e_d)^2) / 2``. For a Gaussian-smoothed field with kernel
variance ``s_d^2`` (voxels²), ``rho_d = exp(-1 / (4 s_d^2))``, so

    s_d^2 = -1 / (4 ln rho_d),   FWHM_d = sqrt(8 ln 2 s_d^2)  (voxels),
    DLH = (s_x^2 s_y^2 s_z^2)^(-1/2) / sqrt(8) * c(dof)  (|Lambda|^(1/2) per voxel),
    RESELS = FWHM_x FWHM_y FWHM_z  (voxels per resel),

with ``c(dof)`` smoothest's temporal degrees-of-freedom correction
(:func:`dof_correction`).

Cluster p (Friston et al. 1994, as FSL ``cluster``)
---------------------------------------------------
For a z threshold ``u`` in a search volume of ``V`` voxels (D = 3):

    E[m] = V (2 pi)^(-(D+1)/2) DLH (u^2 - 1) exp(-u^2 / 2)   expected clusters,
    E[N] = V (1 - Phi(u))                                   expected voxels above u,
    beta = (Gamma(D/2 + 1) E[m] / E[N])^(2/D),
    P(size >= k) = exp(-beta k^(2/D)),
    p(k) = 1 - exp(-E[m] P(size >= k))                      (Poisson clumping).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import special, stats

from ..core.backend import DESIGN_DTYPE, resolve_device, to_numpy
from ..core.errors import InputError, OptionError
from ..core.io import load_image, masked_data, provenance, save_image, unmask, write_json, write_tsv
from .clusters import label_maps, neighbour_table
from .design import Design, load_design
from .glm import glm_statistic
from .options import GrfOptions
from .randomise import analysis_mask
from .tables import cluster_table
from .zstat import t_to_z

__all__ = [
    "Smoothness",
    "dof_correction",
    "estimate_smoothness",
    "expected_clusters",
    "cluster_p_values",
    "grf_cluster_p",
    "ols_residuals",
    "write_grf_clusters",
    "parametric_glm",
]


@dataclass(frozen=True)
class Smoothness:
    """Smoothness of a residual field (FSL ``smoothest`` output).

    Attributes
    ----------
    dlh : float
        ``|Lambda|^(1/2)`` per voxel (smoothest ``DLH``).
    volume : int
        Voxels in the mask (``VOLUME``).
    resels : float
        Voxels per resel (``RESELS``).
    fwhm_voxels, fwhm_mm : ndarray, shape (3,)
        FWHM along x, y, z.
    """

    dlh: float
    volume: int
    resels: float
    fwhm_voxels: np.ndarray
    fwhm_mm: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record (smoothest's names in upper case)."""
        return {"DLH": self.dlh, "VOLUME": self.volume, "RESELS": self.resels,
                "FWHMvoxels": self.fwhm_voxels.tolist(), "FWHMmm": self.fwhm_mm.tolist()}


# smoothest's temporal-dof correction of DLH: sqrt of a value interpolated
# from this table (dof -> factor), 1.1 below 6 dof, 1 + 1.0321/dof above 500.
_DOF_TABLE = {
    5: 1.5423138, 6: 1.3757105, 7: 1.2842680, 8: 1.2272151, 9: 1.1885232, 10: 1.1606988, 11: 1.1398000,
    12: 1.1235677, 13: 1.1106196, 14: 1.1000651, 15: 1.0913060, 16: 1.0839261, 17: 1.0776276, 18: 1.0721920,
    19: 1.0674553, 20: 1.0632924, 25: 1.0483053, 30: 1.0390117, 40: 1.0281339, 50: 1.0219834, 60: 1.0180339,
    70: 1.0152850, 80: 1.0132621, 90: 1.0117115, 100: 1.0104851, 150: 1.0068808, 200: 1.0051200,
    300: 1.0033865, 500: 1.0020191,
}


def dof_correction(dof: float) -> float:
    """smoothest's multiplier of DLH for residuals with ``dof`` degrees of freedom.

    Reproduces smoothest's interpolation as it is computed there: with ``b``
    the first table entry at or above ``int(dof)`` and ``a`` the one before,
    ``sqrt(T[b] + (T[b] - T[a]) / (b - a) * (dof - a))`` (which adds the
    slope term to the upper entry, not the lower one); 1.1 below 6 dof and
    ``sqrt(1 + 1.0321 / dof)`` above 500.
    """
    if dof < 6:
        return 1.1
    keys = sorted(_DOF_TABLE)
    upper = next((k for k in keys if k >= int(dof)), None)
    if upper is None:
        return float(np.sqrt(1.0321 / dof + 1.0))
    lower = keys[keys.index(upper) - 1]
    slope = (_DOF_TABLE[upper] - _DOF_TABLE[lower]) / (upper - lower)
    return float(np.sqrt(slope * (dof - lower) + _DOF_TABLE[upper]))


def estimate_smoothness(
    residuals: np.ndarray | torch.Tensor,
    mask: np.ndarray,
    *,
    dof: float | None = None,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Smoothness:
    """Estimate smoothness from GLM residuals, as FSL ``smoothest -r res4d -d dof -m mask``.

    Parameters
    ----------
    residuals : ndarray or Tensor, shape (n_obs, n_voxels)
        Residuals in the mask's voxel order (any device).
    mask : ndarray of bool, shape (x, y, z)
        A z extent of 1 gives smoothest's 2D mode.
    dof : float, optional
        Residual degrees of freedom (default ``n_obs - 1``); used for the
        DLH correction when ``n_obs > 1``.
    voxel_size : tuple of float
        mm per voxel along x, y, z (for ``fwhm_mm``).

    Returns
    -------
    Smoothness

    Notes
    -----
    As smoothest: with more than 2 volumes each voxel's residuals are
    standardised (mean 0, sample variance 1) and voxels of zero variance
    leave the mask; the sums run over the voxels whose x-1, y-1 (and z-1)
    neighbours are all in the mask; a ratio above 0.99999999 is set to
    0.99999 (extreme smoothness, with a warning). Unlike smoothest (which
    takes ``|ratio|``), a ratio <= 0 is an error.

    Raises
    ------
    InputError
        No voxel with all its backward neighbours in the mask, or residuals
        uncorrelated or anticorrelated along an axis.
    """
    res = torch.as_tensor(residuals).to(DESIGN_DTYPE)
    n_obs = res.shape[0]
    if res.ndim != 2 or res.shape[1] != int(mask.sum()):
        raise InputError(f"residuals must be (n_obs, {int(mask.sum())}), got {tuple(res.shape)}")
    valid = torch.ones(res.shape[1], dtype=torch.bool, device=res.device)
    if n_obs > 2:
        centred = res - res.mean(dim=0)
        var = (centred * centred).sum(dim=0) / (n_obs - 1)
        valid = var > 0
        res = centred / torch.where(valid, var, torch.ones_like(var)).sqrt()
    use_z = mask.shape[2] > 1
    n_axes = 3 if use_z else 2
    table = torch.as_tensor(neighbour_table(mask, connectivity=6)[:, :3], device=res.device).long()  # x-1, y-1, z-1
    backward = table[:, :n_axes]
    inner = valid & (backward >= 0).all(dim=1)
    inner[inner.clone()] &= valid[backward[inner]].all(dim=1)
    if not bool(inner.any()):
        raise InputError("no mask voxel has its x-1, y-1, z-1 neighbours in the mask; cannot estimate smoothness")
    centre = res[:, inner]
    sigma_sq = np.zeros(3)
    for axis in range(n_axes):
        other = res[:, backward[inner, axis]]
        ss_minus = float((centre * other).sum())
        s2 = float((0.5 * (centre * centre + other * other)).sum())
        if ss_minus >= 0.99999999 * s2:
            warnings.warn(f"extreme smoothness along {'xyz'[axis]}: possibly biased estimate (as smoothest)",
                          RuntimeWarning, stacklevel=2)
            ss_minus = 0.99999 * s2
        rho = ss_minus / s2
        if rho <= 0:
            raise InputError(
                f"residuals have lag-1 correlation {rho:.3g} along {'xyz'[axis]}: no positive smoothness to estimate "
                "(unsmoothed or too few volumes)"
            )
        sigma_sq[axis] = -1.0 / (4.0 * np.log(rho))
    dlh = float(np.prod(sigma_sq[:n_axes]) ** -0.5 * (2.0**n_axes) ** -0.5)
    if n_obs > 1:
        dlh *= dof_correction(n_obs - 1 if dof is None else dof)
    fwhm = np.sqrt(8.0 * np.log(2.0) * sigma_sq)
    return Smoothness(
        dlh=dlh,
        volume=int(valid.sum()),
        resels=float(np.prod(fwhm[:n_axes])),
        fwhm_voxels=fwhm,
        fwhm_mm=fwhm * np.asarray(voxel_size, dtype=np.float64),
    )


def expected_clusters(z_threshold: float, *, dlh: float, volume: float, ndim: int = 3) -> float:
    """Expected number of clusters above ``z_threshold`` (Euler characteristic density × volume)."""
    u = float(z_threshold)
    if ndim == 3:
        density = (u * u - 1.0) * np.exp(-u * u / 2.0)
    elif ndim == 2:
        density = u * np.exp(-u * u / 2.0)
    else:
        raise InputError(f"GRF cluster inference supports 2D or 3D maps, got ndim={ndim}")
    return float(volume * (2.0 * np.pi) ** (-(ndim + 1) / 2.0) * dlh * density)


def cluster_p_values(
    sizes: np.ndarray, *, z_threshold: float, dlh: float, volume: float, ndim: int = 3
) -> np.ndarray:
    """GRF p-value of clusters of the given sizes (voxels), as FSL ``cluster``.

    Parameters
    ----------
    sizes : array of int, shape (n_clusters,)
    z_threshold : float
        Cluster-forming z (e.g. 2.3); must exceed 1 in 3D.
    dlh : float
        Smoothness ``|Lambda|^(1/2)`` per voxel (:class:`Smoothness`).
    volume : float
        Search volume in voxels.
    ndim : {2, 3}

    Returns
    -------
    ndarray of float64, shape (n_clusters,)
    """
    if ndim == 3 and z_threshold <= 1.0:
        raise InputError(f"the cluster-forming z threshold must be above 1 for GRF (got {z_threshold})")
    e_m = expected_clusters(z_threshold, dlh=dlh, volume=volume, ndim=ndim)
    e_n = volume * stats.norm.sf(z_threshold)
    beta = (special.gamma(ndim / 2.0 + 1.0) * e_m / e_n) ** (2.0 / ndim)
    p_size = np.exp(-beta * np.asarray(sizes, dtype=np.float64) ** (2.0 / ndim))
    return -np.expm1(-e_m * p_size)


def grf_cluster_p(
    z_values: np.ndarray, mask: np.ndarray, *, z_threshold: float, smoothness: Smoothness, connectivity: int = 26
) -> tuple[np.ndarray, dict[int, float]]:
    """Label ``z > z_threshold`` clusters and give each its GRF p.

    Parameters
    ----------
    z_values : ndarray, shape (n_voxels,)
        A z map in the mask's voxel order.
    mask : ndarray of bool, shape (x, y, z)
    z_threshold : float
    smoothness : Smoothness
    connectivity : {6, 18, 26}, default 26 (FSL ``cluster``)

    Returns
    -------
    labels : ndarray of int64, shape (n_voxels,)
        Raster-order labels (0 outside clusters).
    p : dict of int to float
        GRF p of each label.
    """
    labels = label_maps(np.asarray(z_values, dtype=np.float32), mask, threshold=z_threshold,
                        connectivity=connectivity).numpy()[0]
    sizes = np.bincount(labels)[1:]
    p = cluster_p_values(sizes, z_threshold=z_threshold, dlh=smoothness.dlh, volume=smoothness.volume)
    return labels, {i + 1: float(v) for i, v in enumerate(p)}


def ols_residuals(data: torch.Tensor, design: np.ndarray) -> torch.Tensor:
    """Full-model OLS residuals ``Y - X pinv(X) Y`` (float64 arithmetic), shape of ``data``."""
    x = torch.as_tensor(design, dtype=DESIGN_DTYPE, device=data.device)
    y = data.to(DESIGN_DTYPE)
    return y - x @ (torch.linalg.pinv(x) @ y)


def write_grf_clusters(z: np.ndarray, mask: np.ndarray, reference: Any, smooth: Smoothness, root: str, index: int,
                       options: GrfOptions) -> pd.DataFrame:
    """easythresh on one z map: GRF cluster p, then the significant clusters written and tabled.

    Writes ``<root>thresh_zstat<index>`` (z inside significant clusters, else
    0), ``<root>cluster_index_zstat<index>`` (FSL ``--oindex`` of those
    clusters) and ``<root>cluster_zstat<index>.tsv``.

    Parameters
    ----------
    z : ndarray, shape (n_voxels,)
        The z map in mask order.
    mask : ndarray of bool, shape (x, y, z)
    reference : nibabel image
        Grid and header of the outputs.
    smooth : Smoothness
        From :func:`estimate_smoothness` of the model's residuals.
    root : str
        Path prefix of the outputs.
    index : int
        The contrast's number in the names.
    options : GrfOptions

    Returns
    -------
    pandas.DataFrame
        The significant clusters (GRF p below ``options.cluster_p``).
    """
    labels, p = grf_cluster_p(z, mask, z_threshold=options.cluster_z, smoothness=smooth)
    significant = [k for k, v in p.items() if v < options.cluster_p]
    z_sig = np.where(np.isin(labels, significant), z, 0.0).astype(np.float32)
    result = cluster_table(unmask(z, mask, fill=np.nan), reference.affine, threshold=options.cluster_z, mask=mask,
                           cluster_p=p, maxima=False)
    table = result.table[result.table["p"] < options.cluster_p].reset_index(drop=True)
    index_image = np.where(np.isin(result.index_image, table["cluster_index"]), result.index_image, 0)
    save_image(unmask(z_sig, mask), reference, f"{root}thresh_zstat{index}.nii.gz", sidecar=False)
    save_image(index_image, reference, f"{root}cluster_index_zstat{index}.nii.gz", sidecar=False, dtype=np.int32)
    write_tsv(table, f"{root}cluster_zstat{index}.tsv")
    return table


def parametric_glm(
    input_path: str | os.PathLike,
    output_root: str | os.PathLike,
    *,
    design_path: str | os.PathLike | None = None,
    contrast_path: str | os.PathLike | None = None,
    mask_path: str | os.PathLike | None = None,
    one_sample: bool = False,
    clusters: GrfOptions = GrfOptions(),
    device: str = "auto",
    params: Mapping[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """File-level parametric GLM with GRF cluster inference (``gpuconn glm``).

    Writes, for each t contrast ``i``: ``<root>_tstat<i>``, ``<root>_zstat<i>``,
    ``<root>_thresh_zstat<i>`` (z inside significant clusters, else 0, as
    easythresh), ``<root>_cluster_index_zstat<i>`` (FSL ``--oindex`` of the
    significant clusters) and ``<root>_cluster_zstat<i>.tsv`` (table with
    GRF p); plus ``<root>_smoothness.json`` (smoothest's DLH, VOLUME,
    RESELS, FWHM).

    Parameters
    ----------
    input_path : path-like
        4D image, one volume per observation.
    output_root : path-like
    design_path, contrast_path : path-like, optional
        FSL VEST ``design.mat`` / ``design.con``.
    mask_path : path-like, optional
        Default: voxels non-zero in some volume.
    one_sample : bool
        Design of ones and contrast ``[1]`` (excludes a design).
    clusters : GrfOptions, default GrfOptions()
        Cluster-forming z (2.3) and the GRF p below which clusters are kept (0.05).
    device : str, default 'auto'
    params : mapping, optional
        Extra values for the JSON sidecar.

    Returns
    -------
    dict of str to pandas.DataFrame
        The cluster table of each contrast (``zstat1``...), significant clusters only.
    """
    img = load_image(input_path, ndim=4, what="input (-i)")
    n_obs = img.shape[3]
    if one_sample:
        if design_path or contrast_path:
            raise OptionError("{one_sample} (one-sample) builds its own design; drop {design_path}/{contrast_path} "
                              "or drop {one_sample}")
        design = Design(np.ones((n_obs, 1)), np.ones((1, 1)))
    else:
        if design_path is None or contrast_path is None:
            raise OptionError("give a design and contrasts ({design_path} design.mat {contrast_path} design.con), "
                              "or {one_sample} for a one-sample test")
        design = load_design(design_path, contrast_path, n_obs=n_obs, data_source=str(input_path))
    mask = analysis_mask(img, input_path, mask_path)
    dof = n_obs - int(np.linalg.matrix_rank(design.matrix))
    if dof < 1:
        raise InputError(f"the design leaves {dof} residual degrees of freedom for {n_obs} volumes; simplify it")
    torch_device = resolve_device(device)
    data = torch.as_tensor(masked_data(img, mask, path=input_path)).to(torch_device)
    smooth = estimate_smoothness(ols_residuals(data, design.matrix), mask, dof=dof,
                                 voxel_size=tuple(img.header.get_zooms()[:3]))
    root = str(output_root)
    tables = {}
    for i, contrast in enumerate(np.atleast_2d(design.contrasts), start=1):
        t = to_numpy(glm_statistic(data, design.matrix, contrast, kind="t", device=torch_device))
        z = t_to_z(t, dof).astype(np.float32)
        save_image(unmask(t, mask), img, f"{root}_tstat{i}.nii.gz", sidecar=False)
        save_image(unmask(z, mask), img, f"{root}_zstat{i}.nii.gz", sidecar=False)
        table = write_grf_clusters(z, mask, img, smooth, f"{root}_", i, clusters)
        tables[f"zstat{i}"] = table
    write_json(f"{root}_smoothness.json", smooth.as_dict() | {"dof": dof})
    record = {"input": str(input_path), "design": design_path, "contrasts": contrast_path, "mask": mask_path,
              "one_sample": one_sample, **asdict(clusters), "dof": dof,
              "smoothness": smooth.as_dict(), "device": str(torch_device), **dict(params or {})}
    write_json(f"{root}.json", provenance(record))
    return tables
