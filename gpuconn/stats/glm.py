"""Batched OLS t and F statistics and contrast partitioning (t/F to z: :mod:`gpuconn.stats.zstat`).

For a design ``M`` (n_obs, n_regressors) and a contrast ``C`` (rank s, one
row per contrast vector), the design is partitioned into an effect of
interest and nuisance as randomise and PALM do (Beckmann/Smith
partitioning; Winkler et al. 2014, NeuroImage 92:381, appendix A): the
effect of interest spans ``X = M pinv(M'M) C'`` and the nuisance ``Z``
spans the rest of the column space of ``M``, ``{M w : C w = 0}``, which is
orthogonal to ``X``. Every valid partitioning gives the same spaces.

With orthonormal bases ``Qx`` (n_obs, s) of ``X`` and ``Qz`` of ``Z``,
``Q = [Qx, Qz]`` spans the full model and for any data vector ``y``

- t (s = 1): ``t = (qx' y) / sqrt(RSS / dof)``, oriented like ``c' beta``,
- F: ``F = (||Qx' y||^2 / s) / (RSS / dof)``,
- ``RSS = ||y||^2 - ||Q' y||^2`` and ``dof = n_obs - rank(M)``.

Freedman-Lane permutes the nuisance residuals ``e = y - Qz Qz' y`` with an
orthogonal ``P`` (permutation and/or sign flips), so ``||P e|| = ||e||`` and
each rearrangement needs only the ``k`` rows of ``Q' P``: a whole chunk of
rearrangements is one matrix product of shape (n_perm * k, n_obs) by
(n_obs, n_voxels). Rows of ``Qz`` that every rearrangement leaves
unchanged (the intercept under plain permutation, block means under
within-block permutation) give ``0`` on ``P e`` and are dropped.

Precision
---------
Everything after the data are read is float64: the nuisance residuals, the
stacked rows of ``Q' P`` and their product with the residuals, and ``RSS``.
``RSS = ||e||^2 - ||Q' P e||^2`` cancels when the model explains almost all
of a voxel's variance (the observed map of a strong effect): with a float32
product the relative error of t grows like ``eps32 * sqrt(n_obs) / (1 - R^2)``
(1.9e-4 on a 13-observation design), and a float32 GEMM sums in an order
that changes with the chunk shape and the thread count, so the same
rearrangement gave different t from run to run. In float64 the error is
``~1e-16 / (1 - R^2)``; each statistic is then rounded once to float32 (the
dtype of the maps and of every comparison), so every run, chunk size and
device gives the same float32 value except in the rare case where the
float64 value lies within ~1e-16 of a float32 rounding boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.backend import DATA_DTYPE, DESIGN_DTYPE, as_design

__all__ = [
    "ContrastModel",
    "partition",
    "contrast_model",
    "residualise",
    "permuted_rows",
    "permuted_statistics",
    "glm_statistic",
]

_RANK_TOL = 1e-10
# Voxels whose nuisance residuals are below this share of their norm are
# constant up to round-off; their statistics are set to 0 (as randomise).
_CONSTANT_TOL = 1e-10


def _orth(matrix: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column space (SVD, relative rank tolerance)."""
    if matrix.shape[1] == 0:
        return matrix
    u, sing, _ = np.linalg.svd(matrix, full_matrices=False)
    if sing.size == 0 or sing[0] == 0:
        return u[:, :0]
    return u[:, sing > _RANK_TOL * sing[0]]


def partition(design: np.ndarray, contrast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a design into effect of interest and nuisance for one contrast.

    Parameters
    ----------
    design : ndarray, shape (n_obs, n_regressors)
    contrast : ndarray, shape (n_regressors,) or (s, n_regressors)
        A t contrast (one row) or the rows of an F contrast.

    Returns
    -------
    interest : ndarray, shape (n_obs, s)
        ``M pinv(M'M) C'``.
    nuisance : ndarray, shape (n_obs, n_regressors - s)
        ``M`` times a basis of the null space of ``C``; orthogonal to
        ``interest``.

    See Also
    --------
    PALM ``palm_partition.m`` (method 'beckmann'), FSL randomise.
    """
    design = np.asarray(design, dtype=np.float64)
    contrast = np.atleast_2d(np.asarray(contrast, dtype=np.float64))
    interest = design @ np.linalg.pinv(design.T @ design) @ contrast.T
    _, sing, vt = np.linalg.svd(contrast)
    rank = int(np.sum(sing > _RANK_TOL * max(sing.max(initial=0.0), 1e-300)))
    return interest, design @ vt[rank:].T


@dataclass(frozen=True)
class ContrastModel:
    """Everything the permutation loop needs for one contrast, on the device.

    Attributes
    ----------
    kind : {'t', 'f'}
    rank : int
        Rank ``s`` of the contrast (1 for t).
    dof : int
        Residual degrees of freedom, ``n_obs - rank(design)``.
    nuisance : torch.Tensor, shape (n_obs, n_nuisance), float64
        Orthonormal basis of the nuisance space ``Qz``.
    rows : torch.Tensor, shape (k, n_obs), float64
        Orthonormal rows of ``Q'`` that rearrangements can change; the first
        ``rank`` rows span the effect of interest.
    """

    kind: str
    rank: int
    dof: int
    nuisance: torch.Tensor
    rows: torch.Tensor

    @property
    def df(self) -> tuple[int, int]:
        """``(rank, dof)``: numerator and denominator degrees of freedom."""
        return self.rank, self.dof


def contrast_model(
    design: np.ndarray,
    contrast: np.ndarray,
    *,
    kind: str,
    device: torch.device,
    invariant: np.ndarray | None = None,
) -> ContrastModel:
    """Bases and degrees of freedom for one t or F contrast.

    Parameters
    ----------
    design : ndarray, shape (n_obs, n_regressors)
        Validated design (full column rank is not required; dof uses its rank).
    contrast : ndarray, shape (n_regressors,) or (s, n_regressors)
    kind : {'t', 'f'}
    device : torch.device
    invariant : ndarray, shape (n_obs, b), optional
        Vectors every rearrangement leaves unchanged (e.g. the intercept
        under plain permutation); nuisance directions inside their span are
        dropped from ``rows``.

    Returns
    -------
    ContrastModel
    """
    if kind not in ("t", "f"):
        raise ValueError(f"kind must be 't' or 'f', got {kind!r}")
    design = np.asarray(design, dtype=np.float64)
    contrast = np.atleast_2d(np.asarray(contrast, dtype=np.float64))
    interest, nuisance = partition(design, contrast)
    if kind == "t":
        if contrast.shape[0] != 1:
            raise ValueError("a t contrast has one row")
        q_x = interest / np.linalg.norm(interest)
    else:
        q_x = _orth(interest)
    q_z = _orth(nuisance)
    rank_design = np.linalg.matrix_rank(design)
    moving = q_z
    if invariant is not None and q_z.shape[1]:
        u, sing, _ = np.linalg.svd(q_z.T @ _orth(np.asarray(invariant, dtype=np.float64)), full_matrices=True)
        n_fixed = int(np.sum(sing > 1 - 1e-8))
        moving = q_z @ u[:, n_fixed:]
    rows = np.concatenate([q_x, moving], axis=1).T
    return ContrastModel(
        kind=kind,
        rank=q_x.shape[1],
        dof=int(design.shape[0] - rank_design),
        nuisance=as_design(q_z, device),
        rows=as_design(rows, device),
    )


def residualise(
    data: torch.Tensor, model: ContrastModel, *, voxel_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nuisance residuals ``e = Y - Qz Qz' Y``, in float64.

    Parameters
    ----------
    data : torch.Tensor, shape (n_obs, n_voxels)
        On the model's device, any float dtype.
    model : ContrastModel
    voxel_chunk : int
        Voxels processed at once in float64 (bounds the peak memory).

    Returns
    -------
    residuals : torch.Tensor, shape (n_obs, n_voxels), float64
        Zero for voxels that are constant up to the nuisance (their
        statistics are 0).
    sum_squares : torch.Tensor, shape (n_voxels,), float64
        ``||e||^2`` per voxel.
    """
    n_obs, n_vox = data.shape
    residuals = torch.empty((n_obs, n_vox), dtype=DESIGN_DTYPE, device=data.device)
    sum_squares = torch.empty(n_vox, dtype=DESIGN_DTYPE, device=data.device)
    q_z = model.nuisance
    for start in range(0, n_vox, voxel_chunk):
        block = data[:, start : start + voxel_chunk].to(DESIGN_DTYPE)
        resid = block - q_z @ (q_z.T @ block) if q_z.shape[1] else block
        ss = (resid * resid).sum(0)
        constant = ss <= (_CONSTANT_TOL**2) * (block * block).sum(0)
        resid[:, constant] = 0.0
        ss[constant] = 0.0
        residuals[:, start : start + voxel_chunk] = resid
        sum_squares[start : start + voxel_chunk] = ss
    return residuals, sum_squares


def permuted_rows(rows: torch.Tensor, orders: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Stack ``Q' P`` for a chunk of rearrangements, shape (n_perm * k, n_obs), float64.

    ``(P e)[j] = signs[j] * e[orders[j]]``, so column ``i`` of ``Q' P`` is
    ``signs[inv[i]] * Q'[:, inv[i]]`` with ``inv`` the inverse order.
    """
    inverse = torch.argsort(orders, dim=1)
    signs_inv = torch.gather(signs, 1, inverse)
    stacked = rows.T[inverse] * signs_inv[..., None]  # (n_perm, n_obs, k)
    n_perm, n_obs, k = stacked.shape
    return stacked.transpose(1, 2).reshape(n_perm * k, n_obs)


def permuted_statistics(
    model: ContrastModel,
    residuals: torch.Tensor,
    sum_squares: torch.Tensor,
    orders: torch.Tensor,
    signs: torch.Tensor,
) -> torch.Tensor:
    """t or F statistics of a chunk of rearranged residuals, in one matrix product.

    Parameters
    ----------
    model : ContrastModel
    residuals, sum_squares : torch.Tensor, float64
        From :func:`residualise`, shapes (n_obs, n_voxels) and (n_voxels,).
    orders : torch.Tensor of int64, shape (n_perm, n_obs)
    signs : torch.Tensor of float64, shape (n_perm, n_obs)
        A chunk from :meth:`PermutationScheme.chunk`, on the device.

    Returns
    -------
    torch.Tensor, shape (n_perm, n_voxels), float32
        Computed in float64 and rounded once (see the module notes).

    Notes
    -----
    The product is not split over voxel blocks: on a shared 2-core CPU,
    blocks of 4096-16384 voxels were 1.3-3x slower than one product (more
    thread synchronisation), and on CUDA one product is the fast path.
    """
    n_perm = orders.shape[0]
    k = model.rows.shape[0]
    proj = (permuted_rows(model.rows, orders, signs) @ residuals).view(n_perm, k, -1)
    explained = proj[:, 0] * proj[:, 0]
    for j in range(1, model.rank):
        explained.addcmul_(proj[:, j], proj[:, j])
    total = explained.clone()
    for j in range(model.rank, k):
        total.addcmul_(proj[:, j], proj[:, j])
    # RSS = ||P e||^2 - ||Q' P e||^2 in float64; the clamp keeps 0/0 at 0 for constant voxels.
    rss = (sum_squares - total).clamp_min_(torch.finfo(DESIGN_DTYPE).tiny).div_(model.dof)
    if model.kind == "t":
        return (proj[:, 0] / rss.sqrt_()).to(DATA_DTYPE)
    return explained.div_(model.rank).div_(rss).to(DATA_DTYPE)


def glm_statistic(
    data: torch.Tensor | np.ndarray,
    design: np.ndarray,
    contrast: np.ndarray,
    *,
    kind: str = "t",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Observed t or F map of one contrast (the unpermuted statistic).

    Parameters
    ----------
    data : array or torch.Tensor, shape (n_obs, n_voxels)
    design : ndarray, shape (n_obs, n_regressors)
    contrast : ndarray, shape (n_regressors,) or (s, n_regressors)
    kind : {'t', 'f'}
    device : torch.device, optional
        Defaults to the data's device (cpu for NumPy input).

    Returns
    -------
    torch.Tensor, shape (n_voxels,), float32
    """
    data = torch.as_tensor(data)
    device = data.device if device is None else device
    model = contrast_model(design, contrast, kind=kind, device=device)
    residuals, sum_squares = residualise(data.to(device), model)
    n_obs = residuals.shape[0]
    identity = torch.arange(n_obs, device=device)[None]
    ones = torch.ones((1, n_obs), dtype=DESIGN_DTYPE, device=device)
    return permuted_statistics(model, residuals, sum_squares, identity, ones)[0]


