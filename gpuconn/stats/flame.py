"""Mixed-effects group analysis as FSL ``flameo``: OLS, fixed effects, FLAME1 and FLAME1+2, batched over voxels.

Model (Woolrich et al. 2004, NeuroImage 21:1732; Beckmann et al. 2003)
-------------------------------------------------------------------------
At each voxel the first-level estimates ``y`` (one cope per subject) and
their variances ``s`` (varcopes) follow

    y = X beta + e,   e_i ~ N(0, s_i + b_g(i)),

with ``b_g`` the random-effects (between-subject) variance of the
variance group ``g`` of subject ``i`` (``design.grp``; one group by
default). With ``W = diag(1 / (s + b))``:

- ``fe`` (fixed effects): ``b = 0``; GLS ``beta = (X'WX)^-1 X'W y``,
  ``cov = (X'WX)^-1``; t dof 1000, as flameo without a dof file.
- ``ols``: ``beta = pinv(X) y``, ``cov = (X'X)^-1 RSS / (N - P)``, dof ``N - P``
  (varcopes ignored).
- ``flame1``: each ``b_g`` is the mode of its marginal posterior (flameo's
  ``solveforbeta``), using the rows of group ``g`` only, then GLS with all
  groups; t dof: the smallest ``n_g - P_g`` over the groups the contrast
  involves (flameo's lower bound, which it reports; ``N - P`` with one group).
- ``flame12``: FLAME1, then flameo's stage 2 on the voxels whose z lies near
  threshold (MCMC, t fit; :func:`_flame2`).

The marginal posterior energy of ``b`` (flameo ``marg_posterior_energy``;
its prior ``1/b`` and the Jacobian of the log-variance parameterisation
cancel) is the restricted (REML) negative log-likelihood

    E(b) = 1/2 [ sum_i log(s_i + b) + log|Z'WZ| + r'Wr ],   r = y - Z (Z'WZ)^-1 Z'W y,

where ``Z`` is the group's design rows. Here ``Z`` is replaced by an
orthonormal basis of its column space (rank-revealing SVD), which changes
``E`` by a constant only and keeps ``Z'WZ`` invertible when a group's rows
leave a design column all zero (the other group's mean in a two-group
design).

Search
------
flameo runs Brent's method per voxel on ``x = log b`` in
``[log 1e-10, log 1e10]``. Here every voxel is searched at once, in float64:
``y`` and ``s`` are first scaled by ``scale = var(y) + mean(s)`` of the
voxel's group (``E`` is equivariant, so the mode scales back exactly), then

1. ``E`` on a grid of ``x`` (``b / scale`` = 1e-10, 1e-5, 1e-3 ... 10,
   1e3) picks the lowest grid point (the smallest ``b`` among points within
   round-off of the minimum: ``E`` is flat where ``b << s``);
2. safeguarded Newton on ``x`` with the analytic first and second
   derivatives of ``E`` (``dE/db = (tr P - y'PPy) / 2``,
   ``d2E/db2 = (2 y'PPPy - tr PP) / 2``, ``P = W - WZ(Z'WZ)^-1 Z'W``),
   kept inside the bracket of the neighbouring grid points and falling back
   to bisection on the sign of ``dE/dx``; each voxel stops when its step or
   bracket is below 1e-10 or ``|dE/dx| < 1e-11`` (a per-voxel convergence
   mask). Every ``Z'W^m Z`` is one GEMM of the weights with the products
   of the basis columns.

A mode below ``1e-10 scale`` is reported as the lower end of the range (as
flameo reports ``max(1e-10, b)``); voxels whose copes and varcopes are all
zero (``scale = 0``) get zeros in every output.

See Also
--------
FSL ``flameo`` (``gsmanager.cc``: ``strap_on``, ``solveforbeta``,
``em_contrasts``, ``t_ols_contrast``), HALFpipe's Python port of FLAME1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.backend import DESIGN_DTYPE, chunk_size, resolve_device, run_chunked, to_numpy
from ..core.errors import InputError, OptionError
from ..core.io import check_same_grid, load_image, masked_data, provenance, save_image, unmask, write_json
from .design import load_design, read_vest
from .options import GrfOptions, McmcOptions
from .zstat import f_to_z, t_to_z

__all__ = [
    "RUN_MODES",
    "FE_DOF",
    "FlameResult",
    "McmcOptions",
    "check_flame_inputs",
    "estimate_re_variance",
    "flame",
    "run_flame",
]

#: flameo's ``--runmode`` values.
RUN_MODES = ("fe", "ols", "flame1", "flame12")
#: t / F denominator dof flameo uses in fixed-effects mode without ``--dvc``.
FE_DOF = 1000.0
# Search range of b / scale.
_LOG_LOW, _LOG_HIGH = float(np.log(1e-10)), float(np.log(1e3))
# Denser where the mode usually lies (b / scale ~ 0.01-10); E is flat below.
_GRID = torch.tensor([-10.0, -5.0, -3.0, -2.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64) * float(np.log(10.0))
_X_TOL = 1e-10
# |dE/dx| below which x is a stationary point to ~1e-10 (d2E/dx2 is O(1) or more near a mode).
_G_TOL = 1e-11
_MAX_NEWTON = 100
_RANK_TOL = 1e-10


@dataclass(frozen=True)
class FlameResult:
    """flameo's outputs for the voxels of a mask (``stats/`` maps before unmasking).

    Attributes
    ----------
    pe : ndarray, shape (n_regressors, n_voxels)
        Parameter estimates (``pe<i>``).
    cope, varcope, tstat, zstat, tdof : ndarray, shape (n_contrasts, n_voxels)
        Per t contrast (``cope<i>``, ``varcope<i>``, ``tstat<i>``,
        ``zstat<i>``, ``tdof_t<i>``).
    fstat, zfstat, fdof2 : ndarray, shape (n_ftests, n_voxels)
        Per F test (``fstat<j>``, ``zfstat<j>``, ``fdof2_f<j>``).
    fdof1 : ndarray, shape (n_ftests,)
        Numerator dof (contrasts combined) of each F test.
    re_variance : ndarray, shape (n_groups, n_voxels)
        Random-effects variance of each variance group
        (``mean_random_effects_var<g>``; 0 for ``fe`` and ``ols``).
    run_mode : str
    mcmc_mask : ndarray of bool, shape (n_voxels,)
        Voxels that went through FLAME stage 2 (``flame12`` only).
    """

    pe: np.ndarray
    cope: np.ndarray
    varcope: np.ndarray
    tstat: np.ndarray
    zstat: np.ndarray
    tdof: np.ndarray
    re_variance: np.ndarray
    run_mode: str
    fstat: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    zfstat: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    fdof1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fdof2: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    mcmc_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def _group_labels(groups: np.ndarray | None, n_obs: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Map ``design.grp`` values to 0..n_groups-1 (in sorted order of the labels)."""
    if groups is None:
        return np.zeros(n_obs, dtype=np.int64), np.array([1])
    groups = np.asarray(groups).ravel()
    if groups.shape[0] != n_obs:
        raise InputError(
            f"{source} has {groups.shape[0]} rows but there are {n_obs} subjects (volumes of the copes); "
            "give one variance group per subject"
        )
    if not np.all(np.isfinite(groups)) or not np.all(groups == np.round(groups)) or np.any(groups < 1):
        raise InputError(f"{source} must hold positive integer variance-group labels (1, 2, ...)")
    values, index = np.unique(groups.astype(np.int64), return_inverse=True)
    return index.astype(np.int64), values


def check_flame_inputs(
    copes: np.ndarray,
    varcopes: np.ndarray,
    design: np.ndarray,
    *,
    run_mode: str = "flame1",
    groups: np.ndarray | None = None,
    cope_source: str = "copes",
    varcope_source: str = "varcopes",
    design_source: str = "design",
    groups_source: str = "groups",
) -> None:
    """Raise an :class:`InputError` for inputs flameo cannot fit.

    Parameters
    ----------
    copes, varcopes : ndarray, shape (n_subjects, n_voxels)
    design : ndarray, shape (n_subjects, n_regressors)
    run_mode : {'fe', 'ols', 'flame1'}
    groups : ndarray, shape (n_subjects,), optional
    cope_source, varcope_source, design_source, groups_source : str
        File names for the messages.

    Raises
    ------
    InputError
        Unknown run mode; shapes that disagree; NaN/Inf copes; negative or
        NaN varcopes; zero varcopes in ``fe`` mode; as many regressors as
        subjects (no residual dof); a group file of the wrong length or a
        group with fewer subjects than its design rank plus one.
    """
    if run_mode not in RUN_MODES:
        raise OptionError(f"{{run_mode}} {run_mode!r} is not one of {', '.join(RUN_MODES)}")
    copes, varcopes, design = np.asarray(copes), np.asarray(varcopes), np.asarray(design)
    if copes.ndim == 2 and copes.shape[1] == 0:
        raise InputError(f"{cope_source}: no voxel to analyse (empty mask)")
    if copes.ndim != 2 or copes.shape != varcopes.shape:
        raise InputError(
            f"{cope_source} has shape {copes.shape} but {varcope_source} has {varcopes.shape}; "
            "give one varcope volume per cope volume on the same grid"
        )
    n_obs = copes.shape[0]
    if design.ndim != 2 or design.shape[0] != n_obs:
        raise InputError(
            f"{design_source} has {design.shape[0]} rows but {cope_source} has {n_obs} volumes; "
            "give one design row per subject, in the same order"
        )
    if design.shape[1] >= n_obs:
        raise InputError(
            f"{design_source} has {design.shape[1]} columns for {n_obs} subjects: no residual degrees of freedom; "
            "use more subjects or fewer regressors"
        )
    if not np.all(np.isfinite(copes)):
        raise InputError(f"{cope_source} has NaN or Inf inside the mask; fix the image or tighten the mask")
    bad = ~np.isfinite(varcopes) | (varcopes < 0)
    if bad.any():
        raise InputError(
            f"{varcope_source} has {int(bad.any(axis=0).sum())} voxel(s) with negative, NaN or Inf variances "
            "inside the mask; varcopes must be finite and >= 0 (check the first-level outputs or the mask)"
        )
    if run_mode == "fe" and np.any(varcopes <= 0):
        raise OptionError(
            f"{varcope_source} has zero variances inside the mask; fixed effects ({{run_mode}} fe) needs varcopes > 0 "
            "(use flame1 or ols, or tighten the mask)"
        )
    labels, values = _group_labels(groups, n_obs, groups_source)
    if run_mode in ("flame1", "flame12"):
        for g, value in enumerate(values):
            rows = design[labels == g]
            rank = int(np.linalg.matrix_rank(rows)) if rows.size else 0
            if rows.shape[0] <= rank:
                raise InputError(
                    f"{groups_source}: variance group {value} has {rows.shape[0]} subject(s) for a design of rank "
                    f"{rank} within it; FLAME1 needs more subjects than that in every group (merge groups)"
                )


def _basis(rows: np.ndarray) -> np.ndarray:
    """Orthonormal basis (n_rows, rank) of the column space of ``rows`` (float64)."""
    u, sv, _ = np.linalg.svd(np.asarray(rows, dtype=np.float64), full_matrices=False)
    keep = sv > _RANK_TOL * max(sv.max(initial=0.0), 1.0) * max(rows.shape)
    return u[:, keep]


def _outer_rows(q: torch.Tensor) -> torch.Tensor:
    """``q[n, i] q[n, j]`` as (n, k*k): ``Z'WZ`` of every voxel is then one GEMM ``w @ qq``."""
    return (q[:, :, None] * q[:, None, :]).reshape(q.shape[0], -1)


def _reml(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, q: torch.Tensor, *, derivatives: bool,
          qq: torch.Tensor | None = None):
    """REML energy ``E(exp(x))`` (and ``dE/dx``, ``d2E/dx2``) for each voxel.

    ``x`` (V,), ``y`` and ``s`` (V, n), ``q`` (n, k); all float64 on one device.
    The k x k matrices ``Z'W^m Z`` come from GEMMs ``w^m @ qq`` (no (V, n, k) tensor).
    """
    k = q.shape[1]
    qq = _outer_rows(q) if qq is None else qq
    b = torch.exp(x)
    w = 1.0 / (s + b[:, None])  # (V, n)
    a = (w @ qq).view(-1, k, k)  # Z'WZ
    chol = torch.linalg.cholesky(a)
    gam = torch.cholesky_solve(((w * y) @ q)[:, :, None], chol)[:, :, 0]  # (V, k)
    r = y - gam @ q.T
    wr = w * r
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(dim=1)
    energy = 0.5 * (logdet + (wr * r).sum(dim=1) - torch.log(w).sum(dim=1))
    if not derivatives:
        return energy
    w2 = w * w
    ainv_b = torch.cholesky_solve((w2 @ qq).view(-1, k, k), chol)  # A^-1 Z'W^2Z
    ainv_c = torch.cholesky_solve(((w2 * w) @ qq).view(-1, k, k), chol)  # A^-1 Z'W^3Z
    tr_p = w.sum(dim=1) - torch.diagonal(ainv_b, dim1=1, dim2=2).sum(dim=1)
    ypp_y = (wr * wr).sum(dim=1)
    tr_pp = w2.sum(dim=1) - 2.0 * torch.diagonal(ainv_c, dim1=1, dim2=2).sum(dim=1) \
        + (ainv_b * ainv_b.transpose(1, 2)).sum(dim=(1, 2))
    u = ((w * wr) @ q)[:, :, None]  # Z'W (P y)
    yppp_y = (w * wr * wr).sum(dim=1) - (u * torch.cholesky_solve(u, chol)).sum(dim=(1, 2))
    d1 = 0.5 * (tr_p - ypp_y)
    d2 = 0.5 * (2.0 * yppp_y - tr_pp)
    return energy, b * d1, b * d1 + b * b * d2


def _search(y: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Log of the mode of ``E`` (in scaled units) for each voxel: grid, then safeguarded Newton."""
    n_vox = y.shape[0]
    qq = _outer_rows(q)
    grid = _GRID.to(y.device)
    energies = torch.stack([_reml(grid[i].expand(n_vox), y, s, q, derivatives=False, qq=qq)
                            for i in range(len(grid))], 1)
    energies = torch.nan_to_num(energies, nan=torch.inf)
    # The lowest grid point, taking the smallest b among those within round-off of the minimum
    # (E is flat in b where b << s, and noise there must not pick an interior point).
    e_min = energies.min(dim=1, keepdim=True).values
    best = torch.argmax((energies <= e_min + 1e-12 * (1.0 + e_min.abs())).to(torch.int8), dim=1)
    x = grid[best]
    lo = grid[(best - 1).clamp(min=0)]
    hi = grid[(best + 1).clamp(max=len(grid) - 1)]
    active = torch.ones(n_vox, dtype=torch.bool, device=y.device)
    for iteration in range(_MAX_NEWTON):
        idx = torch.nonzero(active).squeeze(1)
        if idx.numel() == 0:
            break
        xa, la, ha, ba = x[idx], lo[idx], hi[idx], best[idx]
        _, g, h = _reml(xa, y[idx], s[idx], q, derivatives=True, qq=qq)
        if iteration == 0:
            # A minimum at an end of the range where E still rises inwards is the answer.
            at_end = ((ba == 0) & (g >= 0)) | ((ba == len(grid) - 1) & (g <= 0))
        else:
            at_end = torch.zeros_like(g, dtype=torch.bool)
        la = torch.where(g < 0, xa, la)
        ha = torch.where(g > 0, xa, ha)
        newton = xa - g / h
        ok = (h > 0) & (newton > la) & (newton < ha) & torch.isfinite(newton)
        x_new = torch.where(ok, newton, 0.5 * (la + ha))
        x_new = torch.where(at_end, xa, x_new)
        done = at_end | ((x_new - xa).abs() < _X_TOL) | ((ha - la) < _X_TOL) | (g.abs() < _G_TOL)
        x[idx], lo[idx], hi[idx] = x_new, la, ha
        active[idx[done]] = False
    return x


def estimate_re_variance(
    copes: torch.Tensor, varcopes: torch.Tensor, design: np.ndarray
) -> torch.Tensor:
    """FLAME1 random-effects variance (marginal-posterior mode) of one variance group.

    Parameters
    ----------
    copes, varcopes : Tensor, shape (n_subjects, n_voxels)
        The group's subjects only; any device (computed in float64 there).
    design : ndarray, shape (n_subjects, n_regressors)
        The group's design rows.

    Returns
    -------
    Tensor of float64, shape (n_voxels,)
        0 where the copes and varcopes are all zero.
    """
    y = copes.to(DESIGN_DTYPE).T.contiguous()
    s = varcopes.to(DESIGN_DTYPE).T.contiguous()
    q = torch.as_tensor(_basis(design), dtype=DESIGN_DTYPE, device=y.device)
    scale = y.var(dim=1, unbiased=False) + s.mean(dim=1)
    valid = scale > 0
    safe = torch.where(valid, scale, torch.ones_like(scale))
    x = _search(y / safe.sqrt()[:, None], s / safe[:, None], q)
    return torch.where(valid, torch.exp(x) * safe, torch.zeros_like(scale))


def _fit_chunk(y, s, x, contrasts, ftests, labels, n_groups, run_mode, design_np):
    """GLS/OLS fit of a chunk (V voxels): returns dict of float64 tensors."""
    n_obs, n_reg = x.shape
    n_vox = y.shape[1]
    if run_mode == "ols":
        xtx_inv = torch.linalg.inv(x.T @ x)
        beta = xtx_inv @ x.T @ y  # (p, V)
        r = y - x @ beta
        sigma2 = (r * r).sum(dim=0) / (n_obs - n_reg)
        cov = xtx_inv[None] * sigma2[:, None, None]  # (V, p, p)
        re_var = torch.zeros((n_groups, n_vox), dtype=DESIGN_DTYPE, device=y.device)
        valid = torch.ones(n_vox, dtype=torch.bool, device=y.device)
    else:
        re_var = torch.zeros((n_groups, n_vox), dtype=DESIGN_DTYPE, device=y.device)
        if run_mode in ("flame1", "flame12"):
            for g in range(n_groups):
                rows = torch.as_tensor(np.flatnonzero(labels == g), device=y.device)
                re_var[g] = estimate_re_variance(y[rows], s[rows], design_np[labels == g])
        lab = torch.as_tensor(labels, device=y.device)
        total = s + re_var[lab]  # (n, V)
        valid = (total > 0).all(dim=0)
        w = 1.0 / torch.where(valid[None], total, torch.ones_like(total))
        xw = w.T[:, :, None] * x[None]  # (V, n, p)
        a = xw.transpose(1, 2) @ x  # (V, p, p)
        cov = torch.linalg.inv(a)
        beta = (cov @ (xw.transpose(1, 2) @ y.T[:, :, None]))[:, :, 0].T  # (p, V)
    cope = contrasts @ beta  # (c, V)
    varcope = torch.einsum("cp,vpq,cq->cv", contrasts, cov, contrasts)
    tstat = cope / varcope.clamp(min=torch.finfo(DESIGN_DTYPE).tiny).sqrt()
    out = {"pe": beta, "cope": cope, "varcope": varcope, "tstat": tstat, "re_variance": re_var, "valid": valid}
    fstats = []
    for row in ftests:
        c = contrasts[torch.as_tensor(np.flatnonzero(row), device=y.device)]  # (r, p)
        cb = (c @ beta).T[:, :, None]  # (V, r, 1)
        ccc = c[None] @ cov @ c.T[None]  # (V, r, r)
        fstats.append((cb * torch.linalg.solve(ccc, cb)).sum(dim=(1, 2)) / c.shape[0])
    out["fstat"] = torch.stack(fstats) if fstats else torch.zeros((0, n_vox), dtype=DESIGN_DTYPE, device=y.device)
    return out


def flame(
    copes: np.ndarray | torch.Tensor,
    varcopes: np.ndarray | torch.Tensor,
    design: np.ndarray,
    contrasts: np.ndarray,
    *,
    ftests: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    run_mode: str = "flame1",
    device: str | torch.device = "auto",
    chunk: int | None = None,
    mcmc: McmcOptions | None = None,
) -> FlameResult:
    """Group mixed-effects GLM as FSL ``flameo`` (``fe``, ``ols``, ``flame1``), all voxels at once.

    Parameters
    ----------
    copes, varcopes : ndarray or Tensor, shape (n_subjects, n_voxels)
        First-level estimates and their variances (``--cope``, ``--varcope``).
    design : ndarray, shape (n_subjects, n_regressors)
        ``design.mat`` (``--dm``).
    contrasts : ndarray, shape (n_contrasts, n_regressors)
        t contrasts (``--tc``).
    ftests : ndarray of {0, 1}, shape (n_ftests, n_contrasts), optional
        F tests (``--fc``).
    groups : ndarray of int, shape (n_subjects,), optional
        Variance groups (``--cs``, ``design.grp``); one group by default.
    run_mode : {'flame1', 'flame12', 'fe', 'ols'}, default 'flame1'
    device : str or torch.device, default 'auto'
    chunk : int, optional
        Voxels per batch (default: from free memory). Results do not depend
        on it beyond float64 round-off.
    mcmc : McmcOptions, optional
        Stage-2 settings for ``flame12``.

    Returns
    -------
    FlameResult

    Raises
    ------
    InputError
        See :func:`check_flame_inputs`.

    Notes
    -----
    z statistics use flameo's dof: ``N - P`` for ``ols``, the FLAME lower
    bound for ``flame1`` (:func:`_contrast_dof`), :data:`FE_DOF` for ``fe``.
    ``flame12`` runs FLAME1, then stage 2 (:func:`_flame2`) on the voxels
    flameo would pass to it; F tests keep their FLAME1 values there.
    """
    copes_np = to_numpy(copes) if torch.is_tensor(copes) else np.asarray(copes)
    varcopes_np = to_numpy(varcopes) if torch.is_tensor(varcopes) else np.asarray(varcopes)
    design = np.atleast_2d(np.asarray(design, dtype=np.float64))
    contrasts = np.atleast_2d(np.asarray(contrasts, dtype=np.float64))
    check_flame_inputs(copes_np, varcopes_np, design, run_mode=run_mode, groups=groups)
    labels, values = _group_labels(groups, design.shape[0], "groups")
    ftests = np.zeros((0, contrasts.shape[0]), dtype=int) if ftests is None else np.atleast_2d(ftests).astype(int)
    torch_device = resolve_device(device)
    n_obs, n_reg = design.shape
    n_vox = copes_np.shape[1]
    mcmc = mcmc or McmcOptions()
    z_lower, z_upper = mcmc.z_lower, mcmc.z_upper
    if chunk is None:
        k = n_reg
        # On a CPU, batches whose (voxels, subjects) float64 arrays fit in cache run fastest
        # (N = 181: 1024 voxels per batch beat 4096 and 20000 on the 2-core dev VM).
        chunk = chunk_size(8 * n_obs * (6 * k + 12) + 8 * 64, torch_device, n_items=n_vox, fraction=0.25,
                           maximum=65536 if torch_device.type == "cuda" else 1024)
    x = torch.as_tensor(design, dtype=DESIGN_DTYPE, device=torch_device)
    c = torch.as_tensor(contrasts, dtype=DESIGN_DTYPE, device=torch_device)

    def work(start: int, stop: int) -> dict[str, np.ndarray]:
        y = torch.as_tensor(copes_np[:, start:stop], device=torch_device).to(DESIGN_DTYPE)
        s = torch.as_tensor(varcopes_np[:, start:stop], device=torch_device).to(DESIGN_DTYPE)
        out = _fit_chunk(y, s, x, c, ftests, labels, len(values), run_mode, design)
        return {key: to_numpy(v) for key, v in out.items()}

    parts = [result for _, _, result in run_chunked(work, n_vox, chunk)]
    merged = {key: np.concatenate([p[key] for p in parts], axis=-1) for key in parts[0]} if parts else {}
    valid = merged["valid"]
    for key in ("pe", "cope", "varcope", "tstat", "fstat", "re_variance"):
        merged[key] = np.where(valid, merged[key], 0.0)
    fdof1 = ftests.sum(axis=1).astype(np.float64)
    tdof = np.array([_contrast_dof(design, row[None], labels, run_mode) for row in contrasts])
    fdof2 = np.array([_contrast_dof(design, contrasts[row == 1], labels, run_mode) for row in ftests])
    tdof = np.repeat(tdof[:, None], n_vox, axis=1)
    fdof2 = np.repeat(fdof2.reshape(-1, 1), n_vox, axis=1)
    mcmc_mask = np.zeros(n_vox, dtype=bool)
    if run_mode == "flame12" and n_vox:
        upper = t_to_z(merged["tstat"], FE_DOF)
        lower = t_to_z(merged["tstat"], tdof)
        mcmc_mask = valid & _pass_to_mcmc(upper, lower, z_lower, z_upper)
        if ftests.size:
            f_upper = np.stack([f_to_z(f, d1, FE_DOF) for f, d1 in zip(merged["fstat"], fdof1)])
            f_lower = np.stack([f_to_z(f, d1, d2) for f, d1, d2 in zip(merged["fstat"], fdof1, fdof2)])
            mcmc_mask |= valid & _pass_to_mcmc(f_upper, f_lower, z_lower, z_upper)
        if mcmc_mask.any():
            _flame2(merged, tdof, fdof2, mcmc_mask, copes_np, varcopes_np, design, contrasts, ftests, labels,
                    len(values), torch_device, mcmc)
    zstat = np.where(valid, t_to_z(merged["tstat"], np.floor(tdof)), 0.0)
    zfstat = np.stack([np.where(valid, f_to_z(f, d1, np.floor(d2)), 0.0)
                       for f, d1, d2 in zip(merged["fstat"], fdof1, fdof2)]) if len(ftests) else np.zeros((0, n_vox))
    return FlameResult(
        pe=merged["pe"], cope=merged["cope"], varcope=merged["varcope"], tstat=merged["tstat"], zstat=zstat,
        tdof=tdof, re_variance=merged["re_variance"], run_mode=run_mode,
        fstat=merged["fstat"], zfstat=zfstat, fdof1=fdof1, fdof2=fdof2, mcmc_mask=mcmc_mask,
    )


def _contrast_dof(design: np.ndarray, rows: np.ndarray, labels: np.ndarray, run_mode: str) -> float:
    """flameo's t (or F denominator) dof of a contrast.

    ``fe``: 1000; ``ols``: ``N - P``; FLAME: the smallest ``n_g - P_g`` over
    the variance groups the contrast involves (``P_g``: rank of the design
    within group ``g``; a group is involved when a regressor with non-zero
    weight is non-zero in its rows), as flameo's ``flame1_contrasts``; with
    one group this is ``N - P``.
    """
    if run_mode == "fe":
        return FE_DOF
    if run_mode == "ols":
        return float(design.shape[0] - design.shape[1])
    used = np.any(rows != 0, axis=0)
    dofs = []
    for g in range(labels.max() + 1):
        group_rows = design[labels == g]
        if np.any(group_rows[:, used] != 0):
            dofs.append(group_rows.shape[0] - int(np.linalg.matrix_rank(group_rows)))
    return float(min(dofs)) if dofs else float(design.shape[0] - design.shape[1])


def _pass_to_mcmc(upper: np.ndarray, lower: np.ndarray, z_lower: float, z_upper: float) -> np.ndarray:
    """flameo's ``pass_through_to_mcmc``: unless both z bounds are above ``z_upper`` or both below ``z_lower``."""
    clear = ((upper > z_upper) & (lower > z_upper)) | ((upper < z_lower) & (lower < z_lower))
    return ~clear.all(axis=0) if clear.ndim > 1 else ~clear


def _t_fit(samples: torch.Tensor, mean: torch.Tensor, n_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and dof of a Student t with fixed ``mean`` fitted to samples, as flameo's ``multitfit`` (1-D).

    ``samples`` (n_samples, V), ``mean`` (V,). Starting from the sample
    variance ``phi`` and ``nu = 10``, 50 fixed-point steps of
    ``phi = mean_j(tau_j d_j)`` with ``tau_j = phi (nu + 1) / (nu phi + d_j)``,
    ``d_j = (x_j - mean)^2``, and ``nu = 2 / (1 - phi / c)``, ``c = sum_j d_j / (n - 1)``.
    Returns ``(phi, nu)``, each (V,).
    """
    n = samples.shape[0]
    d = (samples - mean) ** 2
    phi = samples.var(dim=0, unbiased=True)
    cosi = d.sum(dim=0) / (n - 1)
    nu = torch.full_like(phi, 10.0)
    for _ in range(n_iter):
        tau = phi * (nu + 1.0) / (nu * phi + d)
        phi = (tau * d).sum(dim=0) / n
        nu = 2.0 / (1.0 - phi / cosi)
    return phi, nu


def _flame2(merged, tdof, fdof2, mask, copes, varcopes, design, contrasts, ftests, labels, n_groups, device,
            opts: McmcOptions) -> None:
    """FLAME stage 2 on the voxels of ``mask``: batched Metropolis-Hastings chains, then t fits (in place).

    The chain of each voxel is flameo's ``Mcmc_Mh``: state ``(gamma, b)``,
    energy ``sum_i [log(s_i + b_g(i)) + r_i^2 / (s_i + b_g(i))] / 2 + sum_g log b_g``
    (prior ``1/b``), one random-walk proposal per variance group then per
    regressor in each sweep, started at FLAME1's estimates; proposal sds
    ``8 sqrt(cov_ee)`` for the regressors and, for ``b``, ``4 (b + mean s)
    sqrt(2 / n_g)`` (flameo uses 4 in the data's units; this scales with
    them); every 41 sweeps each sd is multiplied by
    ``0.65 (1 + accepted + rejected) / (1 + rejected)``. All chains advance
    together; the normal and uniform numbers of every sweep come from one
    NumPy generator seeded with ``opts.seed``, in blocks, so CPU and GPU
    runs draw the same numbers. The contrast samples ``c gamma`` get a t fit
    (:func:`_t_fit`) around ``c pe``: cope, varcope (the fitted scale), t and
    the fitted dof (in [1, 1000]) replace FLAME1's; ``pe`` (unless
    ``fix_mean``) and the RE variances become sample means.
    """
    idx = np.flatnonzero(mask)
    f64 = dict(dtype=DESIGN_DTYPE, device=device)
    y = torch.as_tensor(copes[:, idx].T, **f64)  # (V, N)
    s = torch.as_tensor(varcopes[:, idx].T, **f64)
    x = torch.as_tensor(design, **f64)
    c = torch.as_tensor(contrasts, **f64)
    lab = torch.as_tensor(labels, device=device)
    n_vox, n_obs = y.shape
    n_reg = x.shape[1]
    gamma = torch.as_tensor(merged["pe"][:, idx].T, **f64).clone()  # (V, P)
    tiny = 1e-10 * (y.var(dim=1) + s.mean(dim=1)).clamp(min=1e-300)
    beta = torch.as_tensor(merged["re_variance"][:, idx].T, **f64).clone()  # (V, G)
    beta = torch.maximum(beta, tiny[:, None])
    w = 1.0 / (s + beta[:, lab])
    cov = torch.linalg.inv((w[:, :, None] * x[None]).transpose(1, 2) @ x)
    gamma_sd = 8.0 * torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    n_g = torch.as_tensor(np.bincount(labels, minlength=n_groups), **f64)
    mean_s = torch.stack([s[:, lab == g].mean(dim=1) for g in range(n_groups)], dim=1)
    beta_sd = 4.0 * (beta + mean_s) * torch.sqrt(2.0 / n_g)
    r = y - gamma @ x.T  # (V, N)
    members = [lab == g for g in range(n_groups)]
    accepted = torch.zeros((n_vox, n_groups + n_reg), **f64)
    rejected = torch.zeros_like(accepted)
    n_samples = max((opts.n_jumps - opts.burnin) // opts.sample_every, 1)
    samples = torch.zeros((n_samples, n_vox, c.shape[0]), **f64)
    gamma_sum = torch.zeros_like(gamma)
    beta_sum = torch.zeros_like(beta)
    rng = np.random.default_rng(opts.seed)
    block, since_adapt, taken = 100, 0, 0
    n_par = n_groups + n_reg
    for start in range(0, opts.n_jumps, block):
        size = min(block, opts.n_jumps - start)
        normals = torch.as_tensor(rng.standard_normal((size, n_vox, n_par)), **f64)
        logu = torch.log(torch.as_tensor(rng.random((size, n_vox, n_par)), **f64))
        for j in range(size):
            for g in range(n_groups):
                old = beta[:, g]
                new = old + normals[j, :, g] * beta_sd[:, g]
                ok = new > 0
                new_safe = torch.where(ok, new, old)
                rg, sg = r[:, members[g]], s[:, members[g]]
                e_old = 0.5 * (torch.log(sg + old[:, None]) + rg * rg / (sg + old[:, None])).sum(1) + torch.log(old)
                e_new = 0.5 * (torch.log(sg + new_safe[:, None]) + rg * rg / (sg + new_safe[:, None])).sum(1) \
                    + torch.log(new_safe)
                accept = ok & (e_old - e_new > logu[j, :, g])
                beta[:, g] = torch.where(accept, new_safe, old)
                accepted[:, g] += accept
                rejected[:, g] += ~accept
            var = s + beta[:, lab]
            for e in range(n_reg):
                step = normals[j, :, n_groups + e] * gamma_sd[:, e]
                r_new = r - step[:, None] * x[:, e][None]
                delta = 0.5 * ((r_new * r_new - r * r) / var).sum(1)
                accept = -delta > logu[j, :, n_groups + e]
                gamma[:, e] += torch.where(accept, step, torch.zeros_like(step))
                r = torch.where(accept[:, None], r_new, r)
                accepted[:, n_groups + e] += accept
                rejected[:, n_groups + e] += ~accept
            if since_adapt > 40:
                factor = 0.65 * (1.0 + accepted + rejected) / (1.0 + rejected)
                beta_sd = beta_sd * factor[:, :n_groups]
                gamma_sd = gamma_sd * factor[:, n_groups:]
                accepted.zero_()
                rejected.zero_()
                since_adapt = 0
            else:
                since_adapt += 1
            jump = start + j
            if jump >= opts.burnin and (jump - opts.burnin) % opts.sample_every == 0 and taken < n_samples:
                samples[taken] = gamma @ c.T
                gamma_sum += gamma
                beta_sum += beta
                taken += 1
    if not opts.fix_mean:
        merged["pe"][:, idx] = to_numpy(gamma_sum / taken).T
    merged["re_variance"][:, idx] = to_numpy(beta_sum / taken).T
    pe = torch.as_tensor(merged["pe"][:, idx].T, **f64)
    cope = pe @ c.T  # (V, C)
    for k in range(c.shape[0]):
        phi, nu = _t_fit(samples[:taken, :, k], cope[:, k])
        merged["cope"][k, idx] = to_numpy(cope[:, k])
        merged["varcope"][k, idx] = to_numpy(phi)
        merged["tstat"][k, idx] = to_numpy(cope[:, k] / phi.sqrt())
        # nu <= 0 (phi >= c: tails no heavier than a Gaussian's) where flameo would stop: dof 1000.
        nu = torch.where((nu <= 0) | (nu > FE_DOF) | ~torch.isfinite(nu), torch.full_like(nu, FE_DOF), nu)
        tdof[k, idx] = np.maximum(to_numpy(nu), 1.0)


def _smooth_stage2_dof(result: FlameResult, mask: np.ndarray, zooms, sigma_mm: float) -> None:
    """flameo's ``regularise_flame2_contrasts``: Gaussian-smooth the dof maps in the mask, redo z (in place).

    Only the stage-2 voxels take the smoothed dof and new z (flameo writes
    the smoothed dof map everywhere but recomputes z only there).
    """
    from scipy import ndimage

    sigma = [sigma_mm / float(z) for z in zooms]
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant", truncate=4.0)[mask]
    sel = result.mcmc_mask
    for k in range(result.tdof.shape[0]):
        dof = unmask(result.tdof[k], mask)
        smooth = ndimage.gaussian_filter(dof, sigma, mode="constant", truncate=4.0)[mask] / weight
        result.tdof[k, sel] = smooth[sel]
        result.zstat[k, sel] = t_to_z(result.tstat[k, sel], np.floor(result.tdof[k, sel]))


def run_flame(
    cope_path: str | os.PathLike,
    varcope_path: str | os.PathLike,
    design_path: str | os.PathLike,
    contrast_path: str | os.PathLike,
    output_dir: str | os.PathLike = "stats",
    *,
    prefix: str = "",
    ftest_path: str | os.PathLike | None = None,
    groups_path: str | os.PathLike | None = None,
    mask_path: str | os.PathLike | None = None,
    run_mode: str = "flame1",
    clusters: GrfOptions | None = GrfOptions(),
    device: str = "auto",
    mcmc: McmcOptions | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """File-level flameo (``gpuconn flame``): read the inputs, fit, write ``stats/``, GRF clusters.

    Writes into ``output_dir`` flameo's names: ``pe<k>``, ``cope<i>``,
    ``varcope<i>``, ``tstat<i>``, ``zstat<i>``, ``tdof_t<i>``, ``fstat<j>``,
    ``zfstat<j>``, ``mean_random_effects_var<g>``, ``res4d`` and ``mask``
    (``.nii.gz``); with a cluster threshold also, per t contrast,
    ``thresh_zstat<i>``, ``cluster_index_zstat<i>`` and
    ``cluster_zstat<i>.tsv`` (GRF cluster p from the smoothness of
    ``res4d``, as FEAT runs smoothest and cluster) and ``smoothness.json``;
    and ``flame.json`` with the parameters and versions.

    Parameters
    ----------
    cope_path, varcope_path : path-like
        4D images, one volume per subject (``--cope``, ``--varcope``).
    design_path, contrast_path : path-like
        ``design.mat`` and ``design.con`` (``--dm``, ``--tc``).
    output_dir : path-like, default 'stats'
        flameo's ``--ld``.
    prefix : str, default ''
        Put before every output name (the study runner writes
        ``<root>_zstat1.nii.gz``... beside its other results).
    ftest_path, groups_path : path-like, optional
        ``design.fts`` (``--fc``) and variance groups ``design.grp`` (``--cs``).
    mask_path : path-like, optional
        Default: voxels finite in every cope volume and non-zero in some.
    run_mode : {'flame1', 'flame12', 'fe', 'ols'}
    clusters : GrfOptions or None, default GrfOptions()
        GRF cluster inference (z > 2.3, p < 0.05); None skips it.
    device : str, default 'auto'
    mcmc : McmcOptions, optional
        FLAME stage 2 settings (``flame12``); the stage-2 dof are smoothed
        with a Gaussian of ``sigma_dof_mm`` inside the mask (flameo
        ``--sdof``) and the z of the stage-2 voxels recomputed from them.
    params : mapping, optional
        Extra values for ``flame.json``.

    Returns
    -------
    dict of str to pandas.DataFrame
        Significant clusters of each t contrast (``zstat1``...); empty without a threshold.

    Raises
    ------
    InputError
        Unreadable or mismatched inputs (one line naming the file); nothing is written.
    """
    from .grf import estimate_smoothness, write_grf_clusters
    from .randomise import analysis_mask

    if run_mode not in RUN_MODES:
        check_flame_inputs(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), run_mode=run_mode)
    cope_img = load_image(cope_path, ndim=4, what="cope image (--cope)")
    varcope_img = load_image(varcope_path, ndim=4, what="varcope image (--varcope)")
    check_same_grid(cope_img, cope_path, varcope_img, varcope_path)
    n_obs = cope_img.shape[3]
    if varcope_img.shape[3] != n_obs:
        raise InputError(
            f"{varcope_path} has {varcope_img.shape[3]} volumes but {cope_path} has {n_obs}; "
            "give one varcope volume per cope volume, in the same order"
        )
    design = load_design(design_path, contrast_path, ftest_path, n_obs=n_obs, data_source=str(cope_path))
    groups = None
    if groups_path is not None:
        grp, _ = read_vest(groups_path, what="variance-group file (--cs)")
        if grp.shape[1] != 1:
            raise InputError(f"{groups_path} has {grp.shape[1]} columns; give one variance-group label per row")
        groups = grp[:, 0]
    mask = analysis_mask(cope_img, cope_path, mask_path)
    copes = masked_data(cope_img, mask, path=cope_path)
    varcopes = masked_data(varcope_img, mask, path=varcope_path)
    check_flame_inputs(copes, varcopes, design.matrix, run_mode=run_mode, groups=groups,
                       cope_source=str(cope_path), varcope_source=str(varcope_path),
                       design_source=str(design_path), groups_source=str(groups_path))
    torch_device = resolve_device(device)
    mcmc = mcmc or McmcOptions()
    result = flame(copes, varcopes, design.matrix, design.contrasts, ftests=design.ftests if design.ftests.size else None,
                   groups=groups, run_mode=run_mode, device=torch_device, mcmc=mcmc)
    if run_mode == "flame12" and mcmc.sigma_dof_mm > 0 and result.mcmc_mask.any():
        _smooth_stage2_dof(result, mask, cope_img.header.get_zooms()[:3], mcmc.sigma_dof_mm)
    residuals = copes.astype(np.float64) - design.matrix @ result.pe
    dof = n_obs - design.matrix.shape[1]
    smooth = None
    if clusters is not None:
        smooth = estimate_smoothness(residuals, mask, dof=dof, voxel_size=tuple(cope_img.header.get_zooms()[:3]))
    out = Path(output_dir)
    ref = cope_img.slicer[..., 0]

    def save(values: np.ndarray, name: str) -> None:
        save_image(unmask(np.asarray(values, dtype=np.float32), mask), ref, out / f"{prefix}{name}.nii.gz", sidecar=False)

    for k, pe in enumerate(result.pe, start=1):
        save(pe, f"pe{k}")
    for g, var in enumerate(result.re_variance, start=1):
        save(var, f"mean_random_effects_var{g}")
    tables = {}
    for i in range(result.cope.shape[0]):
        for name in ("cope", "varcope", "tstat", "zstat"):
            save(getattr(result, name)[i], f"{name}{i + 1}")
        save(result.tdof[i], f"tdof_t{i + 1}")
        if smooth is not None:
            tables[f"zstat{i + 1}"] = write_grf_clusters(result.zstat[i].astype(np.float32), mask, ref, smooth,
                                                         os.path.join(out, prefix), i + 1, clusters)
    for j in range(result.fstat.shape[0]):
        save(result.fstat[j], f"fstat{j + 1}")
        save(result.zfstat[j], f"zfstat{j + 1}")
    save_image(unmask(residuals.astype(np.float32), mask), cope_img, out / f"{prefix}res4d.nii.gz", sidecar=False)
    save_image(mask.astype(np.uint8), ref, out / f"{prefix}mask.nii.gz", sidecar=False, dtype=np.uint8)
    if smooth is not None:
        write_json(out / f"{prefix}smoothness.json", smooth.as_dict() | {"dof": dof})
    record = {"cope": cope_path, "varcope": varcope_path, "design": design_path, "contrasts": contrast_path,
              "ftests": ftest_path, "groups": groups_path, "mask": mask_path, "run_mode": run_mode, "dof": dof,
              "clusters": asdict(clusters) if clusters else None, "device": str(torch_device),
              "mcmc": asdict(mcmc) if run_mode == "flame12" else None,
              "n_stage2_voxels": int(result.mcmc_mask.sum()),
              "smoothness": smooth.as_dict() if smooth else None,
              "n_clusters": {k: len(v) for k, v in tables.items()}, **dict(params or {})}
    write_json(out / f"{prefix}flame.json", provenance(record))
    return tables
