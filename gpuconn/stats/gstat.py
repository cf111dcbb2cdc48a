"""Variance groups: PALM's G statistic (Aspin-Welch v for rank-1 contrasts), batched over rearrangements and voxels.

With observations in variance groups ``b = 1..B`` of unequal variance
(``--vg design.grp``, or ``--vg auto`` from the exchangeability blocks), the
t and F statistics are not pivotal and a permutation test with them loses
its error rate when group sizes differ (the small noisy group dominates the
tail). Winkler et al. 2014 (NeuroImage 92:381, Appendix) replace them with
the generalised statistic G, which PALM computes (``palm_core.m``: ``fastv``
for rank 1, ``fastg`` otherwise), and convert it to z with its own degrees
of freedom, voxel by voxel, before the max statistic, TFCE and clusters
(``palm_gtoz.m``). For a model ``M`` (n_obs, r), a contrast ``C`` of rank
``s`` and, per voxel, the OLS fit ``psi = pinv(M) y`` with residuals ``res``:

- per group, ``d_b = sum_{i in b} R_ii`` (``R = I - M pinv(M)``, the
  residual-forming matrix: the group's share of the residual degrees of
  freedom) and the weight ``W_b = d_b / ||res_b||^2`` (one over the group's
  variance estimate);
- ``V = (sum_b W_b M_b' M_b)^-1``, the weighted least-squares covariance of
  ``psi``;
- ``s = 1``: ``v = C' psi / sqrt(C' V C)``;
  ``s > 1``: ``G = (C' psi)' (C' V C)^-1 (C' psi) / (s Lambda)`` with
  ``Lambda = 1 + 2 (s - 1) / (s (s + 2)) * S``,
  ``S = sum_b (1 - n_b W_b / sum_b' n_b' W_b')^2 / d_b``;
- degrees of freedom ``df1 = s`` and ``df2 = s (s + 2) / (3 S)``, which for
  ``s = 1`` is ``1 / S``: the Welch-Satterthwaite approximation (for two
  groups with one mean each, ``v`` is Welch's t and ``df2`` Welch's df, as
  ``scipy.stats.ttest_ind(equal_var=False)``);
- ``z`` from the upper tail of t(``df2``) for ``v``, of F(``s``, ``df2``) for
  ``G`` (an F test of rank 1 gives ``G = v^2`` and F(1, ``df2``)); on the CPU
  with SciPy, on other devices in torch (:func:`g_to_z`).

Where this differs from PALM
----------------------------
- PALM's ``fastv`` sets ``df2 = 1 / (3 S)`` for ``s = 1``: the ``s > 1``
  formula ``1 / (3 S / (s (s + 2)))`` without the division by
  ``s (s + 2) = 3``. That is a third of the Welch-Satterthwaite df (and of
  the limit of its own ``fastg`` formula at ``s = 1``); here ``df2 = 1 / S``,
  so z of v is the textbook Welch z. The v map itself is PALM's.
- ``--vg auto`` without exchangeability blocks is refused (PALM falls back to
  one group, i.e. plain t/F); a group of one observation is refused (PALM
  warns and offers ``-removevgbysize``); so is a group with no residual
  degrees of freedom (``d_b = 0``, where ``W_b`` is undefined).
- With one group ``v = t`` and ``G = F`` exactly; the engine then keeps its
  t/F path (PALM too switches to ``fastt``/``fastf``), so a one-group
  ``--vg`` file gives today's maps bit for bit.

Batched form
------------
In the engine's coordinates (:mod:`gpuconn.stats.glm`), Freedman-Lane data
for a rearrangement ``P`` are ``P e + Hz y`` with nuisance residuals ``e``;
OLS on ``M`` gives ``proj = Q_m' P e`` on the ``k`` moving orthonormal rows
``Q_m'`` (the first ``s`` span the effect), and per group

``||res_b||^2 = ||(P e)_b||^2 - 2 proj . (Q_m' D_b P e) + proj' (Q_m' D_b Q_m) proj``,

so a chunk needs two batched products (``Q_m' D_b P`` stacked over groups
times ``e``, and the group indicators times ``e * e``) and constant small
matrices. ``C' V C`` does not depend on the basis of the model, so it is
taken on the orthonormal basis ``Q = [Qx, Qz]`` of ``M``: ``V^-1 = sum_b W_b
Q' D_b Q`` (r x r per voxel, a weighted sum of precomputed matrices), and
``(C' V C)^-1`` is its Schur complement on the effect block, by Gaussian
elimination of the nuisance indices vectorised over rearrangements and
voxels (``V^-1`` is symmetric positive definite, so no pivoting). All of it
in float64; the statistics are rounded once to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.backend import DATA_DTYPE, DESIGN_DTYPE, as_design, to_numpy
from ..core.errors import InputError, OptionError
from .glm import ContrastModel, permuted_rows
from .zstat import log_betainc_cf, z_from_log_p, f_to_z, t_to_z

__all__ = [
    "GroupModel",
    "variance_groups",
    "group_model",
    "permuted_g",
    "g_to_z",
    "g_statistics",
    "statistic_name",
]

# A group's residual sum of squares is floored at this share of the voxel's ||e||^2 (a group fitted exactly
# would give an infinite weight); voxels with ||e|| = 0 are constant and get G = 0, as t and F do.
_RSS_FLOOR = 1e-24
# A group whose share of the residual degrees of freedom is below this has none.
_DOF_TOL = 1e-8


def statistic_name(kind: str, n_groups: int) -> str:
    """What a statistic map holds: ``'t'``, ``'F'``, ``'Aspin-Welch v'`` or ``'G'``."""
    if n_groups <= 1:
        return "t" if kind == "t" else "F"
    return "Aspin-Welch v" if kind == "t" else "G"


def _within_block_positions(blocks: np.ndarray, source: str) -> np.ndarray:
    """Variance group = position in the block (whole-block shuffling; blocks of equal size)."""
    labels = np.empty(blocks.shape[0], dtype=np.int64)
    sizes = set()
    for value in np.unique(blocks):
        members = np.flatnonzero(blocks == value)
        labels[members] = np.arange(members.size)
        sizes.add(members.size)
    if len(sizes) != 1:
        raise OptionError(f"{source}: {{variance_groups}} auto with {{permute_blocks}} needs blocks of equal size "
                          f"(one variance group per position in a block), got sizes {sorted(sizes)}")
    return labels


def variance_groups(
    spec: np.ndarray | str | None,
    *,
    n_obs: int,
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
    source: str = "variance groups (--vg)",
    blocks_source: str = "exchangeability blocks (-e)",
) -> np.ndarray | None:
    """Resolve ``--vg`` to one integer label per observation.

    Parameters
    ----------
    spec : ndarray of shape (n_obs,) or (n_obs, 1), ``'auto'`` or None
        The labels of a VEST ``design.grp``; ``'auto'``: PALM's
        ``palm_ptree2vg`` for one level of blocks: within-block shuffling
        gives one group per block (its observations are exchangeable),
        whole-block shuffling (``whole_blocks``) one group per position in a
        block (the blocks are exchangeable, their members are not).
    n_obs : int
    blocks : ndarray of int, shape (n_obs,), optional
        Exchangeability blocks (``-e``); required by ``'auto'``.
    whole_blocks : bool
    source, blocks_source : str
        Names for the error messages.

    Returns
    -------
    ndarray of int64, shape (n_obs,), or None
        The original labels (for the sidecar); None when there is one group
        (plain t and F).

    Raises
    ------
    OptionError
        A string other than ``'auto'``; ``'auto'`` without blocks, or with
        whole blocks of unequal sizes.
    InputError
        Wrong shape or length, labels that are not integers, a group of one
        observation.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise OptionError(f"{{variance_groups}} takes a VEST file (design.grp) or 'auto', got {spec!r}")
        if blocks is None:
            raise OptionError("{variance_groups} auto takes the variance groups from the exchangeability blocks, and "
                              "there are none; give {groups_path} design.grp, or a variance-group file to "
                              "{variance_groups}")
        blocks = np.asarray(blocks).ravel()
        labels = _within_block_positions(blocks, blocks_source) if whole_blocks else blocks.astype(np.int64)
        source = f"variance groups 'auto' (from the {blocks_source})"
    else:
        values = np.asarray(spec, dtype=np.float64)
        if values.ndim == 2 and values.shape[1] != 1:
            raise InputError(f"{source} has {values.shape[1]} columns; give one variance-group label per row")
        values = values.reshape(-1)
        if values.shape[0] != n_obs:
            raise InputError(f"{source} has {values.shape[0]} rows but the design has {n_obs}; "
                             "give one variance-group label per observation")
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise InputError(f"{source} row {bad[0] + 1}: {values[bad[0]]:g} is not an integer variance-group label")
        labels = values.astype(np.int64)
    names, sizes = np.unique(labels, return_counts=True)
    if names.size == 1:
        return None
    if np.any(sizes < 2):
        raise InputError(f"{source}: variance group {names[np.argmax(sizes < 2)]} has 1 observation; a group's "
                         "variance needs at least 2 (merge it with another group)")
    return labels


@dataclass(frozen=True)
class GroupModel:
    """Constants of the G statistic for one contrast, on the device (float64).

    Attributes
    ----------
    rank : int
        ``s``, the rank of the contrast.
    dof : int
        ``n_obs - rank(M)`` (the degrees of freedom of constant voxels).
    labels : ndarray of int64, shape (n_obs,)
        The original group labels (host).
    rows : torch.Tensor, shape (n_groups * k, n_obs)
        The moving rows ``Q_m'`` of the contrast model restricted to each
        group, ``Q_m' D_b``, stacked.
    members : torch.Tensor, shape (n_groups, n_obs)
        Group indicators.
    moving_gram : torch.Tensor, shape (n_groups, k, k)
        ``Q_m' D_b Q_m``.
    gram : torch.Tensor, shape (n_groups, r, r)
        ``Q' D_b Q`` on the orthonormal basis ``Q = [Qx, Qz]`` of the model.
    group_dof : torch.Tensor, shape (n_groups,)
        ``d_b``, the trace of the residual-forming matrix over each group.
    sizes : torch.Tensor, shape (n_groups,)
        Observations per group.
    """

    rank: int
    dof: int
    labels: np.ndarray
    rows: torch.Tensor
    members: torch.Tensor
    moving_gram: torch.Tensor
    gram: torch.Tensor
    group_dof: torch.Tensor
    sizes: torch.Tensor

    @property
    def n_groups(self) -> int:
        return int(self.members.shape[0])

    @property
    def work_rows(self) -> int:
        """float64 voxel-sized temporaries per rearrangement (for chunk planning)."""
        k, r = self.moving_gram.shape[1], self.gram.shape[1]
        return 3 * self.n_groups * (k + 1) + k + r * r + 8

    def to(self, device: torch.device) -> "GroupModel":
        """The same constants on ``device``."""
        moved = {name: getattr(self, name).to(device)
                 for name in ("rows", "members", "moving_gram", "gram", "group_dof", "sizes")}
        return replace(self, **moved)


def group_model(model: ContrastModel, labels: np.ndarray, *, source: str = "variance groups (--vg)") -> GroupModel:
    """Precompute the per-group matrices of one contrast.

    Parameters
    ----------
    model : ContrastModel
        From :func:`gpuconn.stats.glm.contrast_model`.
    labels : ndarray of int, shape (n_obs,)
        From :func:`variance_groups` (two groups or more).
    source : str
        For the error message.

    Returns
    -------
    GroupModel

    Raises
    ------
    InputError
        A group with no residual degrees of freedom under the design.
    """
    device = model.rows.device
    rows = to_numpy(model.rows)
    basis = np.concatenate([rows[: model.rank].T, to_numpy(model.nuisance)], axis=1)  # Q = [Qx, Qz], (n_obs, r)
    names = np.unique(labels)
    members = (np.asarray(labels)[None, :] == names[:, None]).astype(np.float64)
    leverage = np.sum(basis * basis, axis=1)
    group_dof = members @ (1.0 - leverage)
    if np.any(group_dof < _DOF_TOL):
        bad = int(np.argmax(group_dof < _DOF_TOL))
        raise InputError(f"{source}: variance group {names[bad]} has no residual degrees of freedom under the "
                         "design (its observations are fitted exactly); merge it with another group")
    return GroupModel(
        rank=model.rank,
        dof=model.dof,
        labels=np.asarray(labels, dtype=np.int64),
        rows=as_design((rows[None] * members[:, None, :]).reshape(-1, rows.shape[1]), device),
        members=as_design(members, device),
        moving_gram=as_design(np.einsum("in,bn,jn->bij", rows, members, rows), device),
        gram=as_design(np.einsum("ni,bn,nj->bij", basis, members, basis), device),
        group_dof=as_design(group_dof, device),
        sizes=as_design(members.sum(1), device),
    )


def _effect_block(inverse_cov: torch.Tensor, rank: int) -> torch.Tensor:
    """Schur complement of the nuisance block: ``(C' V C)^-1`` from ``V^-1`` of shape (r, r, ...), in place."""
    for p in range(inverse_cov.shape[0] - 1, rank - 1, -1):
        pivot_row = inverse_cov[p : p + 1, :p] / inverse_cov[p, p]
        inverse_cov[:p, :p] -= inverse_cov[:p, p : p + 1] * pivot_row
    return inverse_cov[:rank, :rank]


def permuted_g(
    model: ContrastModel,
    groups: GroupModel,
    residuals: torch.Tensor,
    sum_squares: torch.Tensor,
    orders: torch.Tensor,
    signs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """v or G, and their degrees of freedom, for a chunk of rearrangements.

    Parameters
    ----------
    model : ContrastModel
    groups : GroupModel
        From :func:`group_model` for the same contrast.
    residuals, sum_squares : torch.Tensor, float64
        From :func:`gpuconn.stats.glm.residualise`, shapes (n_obs, n_voxels)
        and (n_voxels,).
    orders : torch.Tensor of int64, shape (n_perm, n_obs)
    signs : torch.Tensor of float64, shape (n_perm, n_obs)

    Returns
    -------
    g : torch.Tensor, shape (n_perm, n_voxels), float64
        v (t contrast) or G (F test; ``v^2`` for a rank-1 F test); 0 for
        constant voxels.
    df2 : torch.Tensor, shape (n_perm, n_voxels), float64
        Denominator degrees of freedom (``dof`` for constant voxels).
    """
    n_perm = orders.shape[0]
    n_groups, k, s = groups.n_groups, model.rows.shape[0], model.rank
    parts = (permuted_rows(groups.rows, orders, signs) @ residuals).view(n_perm, n_groups, k, -1)
    proj = parts.sum(1)
    squares = permuted_rows(groups.members, orders, torch.ones_like(signs)) @ residuals.square()
    fitted = torch.einsum("bij,pjv->pbiv", groups.moving_gram, proj)
    rss = squares.view(n_perm, n_groups, -1) - (proj[:, None] * (2.0 * parts - fitted)).sum(2)
    del parts, fitted, squares
    floor = (sum_squares * _RSS_FLOOR).clamp_min(torch.finfo(DESIGN_DTYPE).tiny)
    weights = groups.group_dof[:, None] / torch.maximum(rss, floor)  # (n_perm, n_groups, n_voxels)
    del rss
    inverse_cov = torch.einsum("bij,pbv->ijpv", groups.gram, weights)
    effect = _effect_block(inverse_cov, s)
    psi = proj[:, :s].transpose(0, 1)  # (s, n_perm, n_voxels)
    if s == 1:
        g = psi[0] * effect[0, 0].sqrt()
        g = g.square_() if model.kind == "f" else g
    else:
        g = (effect * psi[:, None] * psi[None, :]).sum((0, 1)) / s
    del inverse_cov, effect
    share = weights * groups.sizes[:, None]
    share = share / share.sum(1, keepdim=True)
    spread = ((1.0 - share).square() / groups.group_dof[:, None]).sum(1)
    if s == 1:
        df2 = spread.reciprocal()
    else:
        spread = spread / (s * (s + 2))
        g = g / (1.0 + 2.0 * (s - 1) * spread)
        df2 = (3.0 * spread).reciprocal()
    constant = sum_squares == 0
    g = torch.where(constant, torch.zeros_like(g), g)
    df2 = torch.where(constant, torch.full_like(df2, float(groups.dof)), df2)
    return g, df2


def _log_beta_tails(x: torch.Tensor, x_c: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log I_x(a, b)`` and ``log (1 - I_x(a, b))``, given ``x`` and ``x_c = 1 - x`` (both computed directly).

    The continued fraction where it converges fast (``x < (a+1)/(a+b+2)``),
    else its mirror ``I_x(a, b) = 1 - I_{1-x}(b, a)``: each tail accurate in log
    space where it is small.
    """
    log_x, log_xc = torch.log(x), torch.log(x_c)
    lower, upper = torch.empty_like(x), torch.empty_like(x)
    front = x < (a + 1.0) / (a + b + 2.0)
    if bool(front.any()):
        lower[front] = log_betainc_cf(x[front], log_xc[front], a[front], b[front])
    back = ~front
    if bool(back.any()):
        upper[back] = log_betainc_cf(x_c[back], log_x[back], b[back], a[back])
    lower[back] = torch.log1p(-torch.exp(upper[back]))
    upper[front] = torch.log1p(-torch.exp(lower[front]))
    return lower, upper


def _g_to_z_device(g: torch.Tensor, df2: torch.Tensor, kind: str, rank: int) -> torch.Tensor:
    """:func:`g_to_z` in torch on any device: incomplete-beta continued fractions in float64, per-element df."""
    g, df2 = g.to(DESIGN_DTYPE), df2.to(DESIGN_DTYPE)
    if kind == "t":
        square = g * g
        half = torch.full_like(g, 0.5)
        log_p = _log_beta_tails(df2 / (df2 + square), square / (df2 + square), df2 / 2, half)[0] + np.log(0.5)
        return torch.sign(g) * z_from_log_p(log_p) + 0.0  # + 0.0: no -0.0
    scaled = rank * g.clamp_min(0.0)
    log_p, log_q = _log_beta_tails(df2 / (df2 + scaled), scaled / (df2 + scaled), df2 / 2,
                                   torch.full_like(g, rank / 2))
    upper = log_p <= np.log(0.5)
    z = z_from_log_p(torch.where(upper, log_p, np.log(0.5)))
    # P(F > G) near 1: z from the lower tail, floored at p = 1 - 2**-53 as f_to_z.
    low = -z_from_log_p(torch.where(upper, np.log(0.5), log_q.clamp_min(-53 * np.log(2.0))))
    return torch.where(upper, z, low)


def g_to_z(g: torch.Tensor, df2: torch.Tensor, *, kind: str, rank: int) -> torch.Tensor:
    """z of v (``kind='t'``: t with ``df2``) or of G (``'f'``: F with ``(rank, df2)``), element by element.

    The one-sided upper tail, as PALM's ``palm_gtoz``, with real degrees of
    freedom per element, from the log survival function (extreme statistics
    keep finite z). On the CPU with SciPy (:func:`gpuconn.stats.zstat.t_to_z`
    / :func:`~gpuconn.stats.zstat.f_to_z`); on other devices by incomplete-beta
    continued fractions in float64 on the device, held to the CPU path in the
    tests.

    Parameters
    ----------
    g, df2 : torch.Tensor, same shape
    kind : {'t', 'f'}
    rank : int
        Rank of the contrast (numerator df of G).

    Returns
    -------
    torch.Tensor, float64, same shape and device as ``g``
    """
    if g.device.type != "cpu":
        return _g_to_z_device(g, df2, kind, rank)
    values, dof = to_numpy(g).astype(np.float64), to_numpy(df2).astype(np.float64)
    z = t_to_z(values, dof) if kind == "t" else f_to_z(values, rank, dof)
    return torch.from_numpy(np.asarray(z, dtype=np.float64))


def g_statistics(
    model: ContrastModel,
    groups: GroupModel,
    residuals: torch.Tensor,
    sum_squares: torch.Tensor,
    orders: torch.Tensor,
    signs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`permuted_g` and its z, rounded once to float32.

    Returns
    -------
    g, z : torch.Tensor, shape (n_perm, n_voxels), float32
    df2 : torch.Tensor, shape (n_perm, n_voxels), float64
    """
    g, df2 = permuted_g(model, groups, residuals, sum_squares, orders, signs)
    return g.to(DATA_DTYPE), g_to_z(g, df2, kind=model.kind, rank=model.rank).to(DATA_DTYPE), df2
