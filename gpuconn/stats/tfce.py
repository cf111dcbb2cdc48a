"""Threshold-free cluster enhancement (TFCE) of batches of statistic maps.

TFCE (Smith & Nichols 2009) scores a voxel ``p`` by

    TFCE(p) = ∫_0^{h_p} e(h)^E h^H dh,

where ``h_p`` is the voxel's statistic and ``e(h)`` the extent (voxels) of
the cluster holding ``p`` when the map is thresholded at ``h`` (voxels
``>= h``). Defaults are randomise's: H=2, E=0.5, 6-connectivity; randomise
``--T2`` (2D/skeleton data) is H=2, E=1, 26-connectivity.

Three methods, one algorithm
----------------------------
``method='stepped'`` (default) is FSL's sum (``fslmaths -tfce`` and
randomise ``-T``, read in FSL 6.0.7's ``newimagefns.h:tfce`` and
``randomise.cc:tfceStatistic``),

    TFCE(p) = Σ_{k : h_k <= h_p} e(h_k)^E h_k^H,     h_k = k·dh, k = 1, 2, ...

on FSL's scale: the sum is *not* multiplied by ``dh``. randomise takes one
``dh`` = (maximum of the unpermuted statistic) / 100 and keeps it for every
rearrangement; :class:`TfceTransform` does the same (the permutation engine
calls :meth:`TfceTransform.bind` with the unpermuted map). With one ``dh``
for every rearrangement the factor would be a constant, so FWER p-values do
not depend on it; only the written ``_tfce_tstat`` values do, and they are
randomise's. ``dh=None`` in :func:`tfce` takes each map's own maximum / 100
(``fslmaths -tfce`` on one image), thresholds
``numpy.linspace(0, max, 101)[1:]``.

``method='palm'`` is PALM's ``palm_tfce``: each map's own ``dh`` = its
maximum / 100 and the sum multiplied by that ``dh`` (≈ the integral). As a
permutation statistic it differs from randomise's (each rearrangement is
discretised on its own grid); it is offered to compare with PALM's outputs.

``method='exact'`` is the integral itself, over every threshold:
``stepped * dh → exact`` as ``dh → 0``.

A voxel counts at threshold ``h_k`` when its value is ``>= h_k`` (PALM's
and nilearn's rule). FSL counts values ``> h_k``; the two differ only for a
value exactly on a step (the unpermuted maximum, whose last step FSL reaches
by adding ``dh`` 100 times in float32, so that it falls on either side).

Both are computed by one sweep per map (no repeated labelling): voxels are
added in decreasing order of their value (a counting sort over the step
bins for ``stepped``, a full sort for ``exact``) into a union–find over the
mask's neighbour table. Every component root carries the extent and the
"measure" ``M`` at which it last changed; when a component grows or merges at
level ``m``, it first receives ``extent^E · (M_last - M(m))`` for the span in
which it stayed the same, added lazily to all its voxels through
union–find offsets (weighted union–find). ``M(h) = h^{H+1}/(H+1)`` for the
exact integral and ``M(h) = Σ_{h_k <= h} h_k^H`` for the stepped sum, so both
methods are the same code. Cost per map: one sort and ``O(V α(V))``.

Only the positive part of a map is enhanced; voxels ``<= 0`` get 0. For a
two-sided test, run the negated contrast as its own contrast (as randomise
users do with ``-1 * contrast``), not ``|stat|``.

See Also
--------
nilearn.mass_univariate._utils.calculate_tfce : the stepped reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.backend import chunk_size, cupy_launch, kernel_problem, load_kernel, map_launch, to_cupy, to_numpy
from ..core.errors import InputError
from .clusters import as_batch, neighbour_table
from .numba_compat import njit, prange, warn_no_numba
from .options import TfceOptions
from .zstat import f_to_z

__all__ = [
    "TfceTransform",
    "tfce",
    "tfce_thresholds",
    "tfce_transform",
]

# randomise -T's settings (the defaults of tfce()'s parameters).
_RANDOMISE = TfceOptions()
_MAX_STEPS = 100_000  # a dh this small is almost surely a unit mistake
# CUDA working memory per voxel and map: order, measure, scratch, result and sort temporaries.
_CUDA_BYTES_PER_VOXEL = 96


@njit
def _find_offset(parent, acc, v):
    """Root of ``v``; path halving that keeps ``acc`` sums along the path."""
    while True:
        p = parent[v]
        if p == v:
            return v
        g = parent[p]
        if g != p:
            acc[v] += acc[p]
            parent[v] = g
        v = g


@njit
def _sweep(order, meas, table, power, out_row):
    """Add voxels in ``order`` (decreasing value) and write their TFCE to ``out_row`` (others untouched).

    ``meas[i]`` is the measure M of voxel ``order[i]``'s value (non-increasing);
    ``power[n]`` is ``n ** E``.
    """
    n_vox = table.shape[0]
    parent = np.full(n_vox, -1, dtype=np.int32)
    size = np.empty(n_vox, dtype=np.int32)  # size, last and acc are set when a voxel is added
    last = np.empty(n_vox, dtype=np.float64)
    acc = np.empty(n_vox, dtype=np.float64)
    for i in range(order.shape[0]):
        v = order[i]
        m = meas[i]
        parent[v] = v
        size[v] = 1
        last[v] = m
        acc[v] = 0.0
        rv = v  # root of v's component, kept up to date through the merges
        for j in range(table.shape[1]):
            u = table[v, j]
            if u < 0 or parent[u] < 0:
                continue
            ru = _find_offset(parent, acc, u)
            if ru == rv:
                continue
            acc[ru] += power[size[ru]] * (last[ru] - m)
            acc[rv] += power[size[rv]] * (last[rv] - m)
            last[ru] = m
            last[rv] = m
            if size[ru] < size[rv]:
                ru, rv = rv, ru
            parent[rv] = ru
            acc[rv] -= acc[ru]
            size[ru] += size[rv]
            rv = ru
    for i in range(order.shape[0]):  # close every component at M(0) = 0
        v = order[i]
        if parent[v] == v:
            acc[v] += power[size[v]] * last[v]
    for i in range(order.shape[0]):  # a voxel's TFCE: its offsets summed up to the root
        v = order[i]
        total = acc[v]
        while parent[v] != v:
            v = parent[v]
            total += acc[v]
        out_row[order[i]] = total


@njit(parallel=True)
def _tfce_stepped_batch(values, table, thresholds, scales, H, power, out):
    """Stepped TFCE; ``thresholds`` (n_maps, n_thr) ascending, padded with +inf; map ``m``'s steps times ``scales[m]``."""
    n_maps, n_vox = values.shape
    n_thr = thresholds.shape[1]
    for m in prange(n_maps):
        thr = thresholds[m]
        cum = np.zeros(n_thr + 1, dtype=np.float64)
        for k in range(n_thr):
            cum[k + 1] = cum[k] + (thr[k] ** H * scales[m] if thr[k] < np.inf else 0.0)
        bins = np.zeros(n_vox, dtype=np.int32)
        counts = np.zeros(n_thr + 2, dtype=np.int64)
        step = thr[0]
        for v in range(n_vox):
            x = np.float64(values[m, v])
            if x >= step:  # bin = number of thresholds <= x; thresholds are ~k * step
                b = min(int(x / step), n_thr)
                while b < n_thr and thr[b] <= x:
                    b += 1
                while b > 0 and thr[b - 1] > x:
                    b -= 1
                bins[v] = b
            counts[n_thr - bins[v] + 1] += 1  # slot 1 = highest bin
        for b in range(1, n_thr + 2):
            counts[b] += counts[b - 1]
        n_sel = counts[n_thr]  # voxels in bins >= 1
        order = np.empty(n_sel, dtype=np.int32)
        meas = np.empty(n_sel, dtype=np.float64)
        for v in range(n_vox):
            b = bins[v]
            if b > 0:
                slot = counts[n_thr - b]
                order[slot] = v
                meas[slot] = cum[b]
                counts[n_thr - b] += 1
        _sweep(order, meas, table, power, out[m])


@njit(parallel=True)
def _tfce_exact_batch(values, orders, n_pos, table, H, power, out):
    """Exact TFCE integral, M(h) = h^(H+1) / (H+1); ``orders[m, :n_pos[m]]`` are the positive voxels, decreasing."""
    for m in prange(values.shape[0]):
        order = orders[m, : n_pos[m]]
        meas = np.empty(order.shape[0], dtype=np.float64)
        for i in range(order.shape[0]):
            meas[i] = np.float64(values[m, order[i]]) ** (H + 1.0) / (H + 1.0)
        _sweep(order, meas, table, power, out[m])


def _positive_descending(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's positive entries by decreasing value (NumPy's SIMD argsort; tie order is irrelevant).

    Returns
    -------
    orders : ndarray of int32, shape (n_maps, n_voxels)
        Row ``m`` starts with its ``n_pos[m]`` positive voxels.
    n_pos : ndarray of int64, shape (n_maps,)
    """
    orders = np.zeros(data.shape, dtype=np.int32)
    n_pos = np.count_nonzero(data > 0, axis=1)
    for m, row in enumerate(data):
        positive = np.flatnonzero(row > 0)
        orders[m, : positive.size] = positive[np.argsort(-row[positive])]
    return orders, n_pos


def tfce_thresholds(maxima: np.ndarray, dh: float | None = None) -> np.ndarray:
    """The stepped method's thresholds for maps with the given maxima.

    Parameters
    ----------
    maxima : ndarray, shape (n_maps,)
        Each map's maximum.
    dh : float, optional
        Fixed step (randomise across permutations). None: 100 steps per map
        up to its maximum, ``numpy.linspace(0, max, 101)[1:]`` (fslmaths'
        default for one image, PALM's rule).

    Returns
    -------
    ndarray of float64, shape (n_maps, n_steps)
        Ascending; rows padded with +inf; maps with maximum <= 0 get none.
    """
    maxima = np.asarray(maxima, dtype=np.float64)
    if dh is None:
        rows = [np.linspace(0.0, mx, 101)[1:] if mx > 0 else np.empty(0) for mx in maxima]
    else:
        if not dh > 0:
            raise InputError(f"TFCE step dh must be positive, got {dh}")
        steps = np.floor(np.maximum(maxima, 0.0) / dh).astype(np.int64)
        if steps.max(initial=0) > _MAX_STEPS:
            raise InputError(
                f"TFCE step dh={dh:g} gives {int(steps.max())} thresholds for a maximum of "
                f"{maxima.max():g}; use a larger step (randomise uses max/100)"
            )
        rows = [dh * np.arange(1, n + 1, dtype=np.float64) for n in steps]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), np.inf)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _step_scales(maxima: np.ndarray, method: str) -> np.ndarray:
    """Factor of each map's steps: its own dh = maximum / 100 for PALM's rule, else 1 (FSL's scale)."""
    if method == "palm":
        return np.maximum(np.asarray(maxima, dtype=np.float64), 0.0) / 100.0
    return np.ones(len(maxima))


def _sweep_inputs(values: torch.Tensor, *, H: float, dh: float | None, method: str):
    """Order and measures of the sweep, in torch on the values' device (the CUDA path's host side).

    Returns
    -------
    order : Tensor of int64, shape (n_maps, n_voxels)
        Voxels by decreasing value (stepped: by decreasing step bin, then
        voxel index); the first ``n_sel[m]`` are swept.
    meas : Tensor of float64, shape (n_maps, n_voxels)
        Measure ``M`` of each ordered voxel.
    n_sel : Tensor of int64, shape (n_maps,)
        Voxels with a non-zero contribution range (positive; stepped: at or
        above the first step).
    """
    v64 = values.to(torch.float64)
    if method == "exact":
        ordered, order = torch.sort(v64, dim=1, descending=True, stable=True)
        meas = ordered.clamp_min(0.0) ** (H + 1.0) / (H + 1.0)
        return order, meas, (v64 > 0).sum(1)
    maxima = to_numpy(values.amax(1)) if values.shape[1] else np.zeros(values.shape[0])
    thresholds = torch.as_tensor(tfce_thresholds(maxima, dh), device=values.device)
    scales = torch.as_tensor(_step_scales(maxima, method), device=values.device)[:, None]
    bins = torch.searchsorted(thresholds, v64.contiguous(), right=True)
    steps = torch.where(torch.isfinite(thresholds), thresholds**H * scales, torch.zeros_like(thresholds))
    cum = torch.cat([torch.zeros_like(steps[:, :1]), torch.cumsum(steps, dim=1)], dim=1)
    order = torch.argsort(bins, dim=1, descending=True, stable=True)
    meas = torch.gather(cum, 1, torch.gather(bins, 1, order))
    return order, meas, (bins > 0).sum(1)


def _tfce_host(values: torch.Tensor, table: np.ndarray, power: np.ndarray, *, H: float, dh: float | None,
               method: str) -> torch.Tensor:
    """The Numba sweep on a host copy of the maps: the CPU path, and the CUDA path's fallback without its kernel.

    As the CUDA fallback the result is the CPU twin's, bit for bit (a torch
    re-implementation would need one labelling per step and sum in another
    order).
    """
    warn_no_numba("TFCE")
    data = np.ascontiguousarray(to_numpy(values), dtype=np.float32)
    out = np.zeros(data.shape, dtype=np.float32)
    if method == "exact":
        orders, n_pos = _positive_descending(data)
        _tfce_exact_batch(data, orders, n_pos, table, float(H), power, out)
    else:
        maxima = data.max(axis=1) if data.shape[1] else np.zeros(len(data))
        thresholds = tfce_thresholds(maxima, dh)
        _tfce_stepped_batch(data, table, thresholds, _step_scales(maxima, method), float(H), power, out)
    return torch.from_numpy(out).to(values.device)


def _tfce_cuda(values: torch.Tensor, table: np.ndarray, power: np.ndarray, *, H: float, dh: float | None,
               method: str) -> torch.Tensor:
    """TFCE of CUDA maps: torch orders the voxels, ``kernels/tfce.cu`` sweeps one map per thread.

    Without the kernel (no CuPy, NVRTC failure) the maps go through
    :func:`_tfce_host`, with a warning.
    """
    device = values.device
    if kernel_problem(device, "TFCE", "the CPU sweep (Numba) on a host copy of the maps") is not None:
        return _tfce_host(values, table, power, H=H, dh=dh, method=method)
    kernel = load_kernel("tfce.cu", "gpuconn_tfce_sweep", device.index or 0)
    table_t = torch.as_tensor(table, device=device).contiguous()
    power_t = torch.as_tensor(power, device=device)
    n_maps, n_vox = values.shape
    out = torch.zeros((n_maps, n_vox), dtype=torch.float32, device=device)
    step = chunk_size(_CUDA_BYTES_PER_VOXEL * max(n_vox, 1), device, n_items=n_maps)
    for start in range(0, n_maps, step):
        block = values[start : start + step]
        order, meas, n_sel = _sweep_inputs(block, H=H, dh=dh, method=method)
        b = block.shape[0]
        scratch_int = torch.full((2, b, n_vox), -1, dtype=torch.int32, device=device)
        scratch_f64 = torch.zeros((2, b, n_vox), dtype=torch.float64, device=device)
        result = out[start : start + b]
        args = [order.to(torch.int32).contiguous(), meas.contiguous(), n_sel.contiguous(), table_t, power_t,
                scratch_int[0], scratch_int[1], scratch_f64[0], scratch_f64[1], result]
        with cupy_launch(device):
            kernel(*map_launch(b, device), tuple(to_cupy(a) for a in args)
                   + (np.int32(b), np.int32(n_vox), np.int32(table.shape[1])))
    return out


def _tfce_table(values: torch.Tensor, table: np.ndarray, *, H: float, E: float, dh: float | None, method: str) -> torch.Tensor:
    power = np.arange(values.shape[1] + 1, dtype=np.float64) ** float(E)  # extent ** E, looked up
    if values.device.type == "cuda":
        return _tfce_cuda(values, table, power, H=H, dh=dh, method=method)
    return _tfce_host(values, table, power, H=H, dh=dh, method=method)


def tfce(
    values,
    mask: np.ndarray,
    *,
    H: float = _RANDOMISE.H,
    E: float = _RANDOMISE.E,
    connectivity: int = _RANDOMISE.connectivity,
    dh: float | None = None,
    method: str = _RANDOMISE.method,
) -> torch.Tensor:
    """TFCE of a batch of masked statistic maps.

    Parameters
    ----------
    values : array or Tensor, shape (n_maps, n_voxels) or (n_voxels,)
        Statistic maps in the mask's voxel order.
    mask : ndarray of bool, shape (x, y, z)
    H, E : float, default 2.0, 0.5
        Height and extent exponents.
    connectivity : {6, 18, 26}, default 6
    dh : float, optional
        Step of the stepped method (``palm`` and ``exact`` take none). None:
        each map's maximum / 100 (``fslmaths -tfce``); a float: fixed step
        (randomise: max of the unpermuted statistic / 100).
    method : {'stepped', 'palm', 'exact'}, default 'stepped'
        See the module notes for the three conventions.

    Returns
    -------
    Tensor of float32, shape (n_maps, n_voxels), on the values' device
        0 where the statistic is <= 0.

    Raises
    ------
    OptionError
        A parameter :class:`~gpuconn.stats.options.TfceOptions` rejects.
    InputError
        ``values`` of the wrong shape, or not finite.

    Notes
    -----
    CPU tensors: Numba sweep, parallel over maps. CUDA tensors: torch sorts
    and bins the voxels on the device and ``kernels/tfce.cu`` (CuPy) runs
    the same sweep, one thread per map.
    """
    tensor = as_batch(values, int(np.count_nonzero(mask)), "values")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError("TFCE input has NaN or Inf values; mask them out first")
    TfceOptions(H=H, E=E, connectivity=connectivity, dh=dh, method=method)  # its checks
    table = neighbour_table(mask, connectivity=connectivity)
    return _tfce_table(tensor, table, H=H, E=E, dh=dh, method=method)


def _f_as_z(stats: torch.Tensor, df: tuple[int, int]) -> torch.Tensor:
    """z of F maps (randomise forms TFCE of an F test on z), on the maps' device."""
    z = f_to_z(to_numpy(stats), *df).astype(np.float32)
    return torch.as_tensor(z, device=stats.device)


@dataclass(frozen=True)
class TfceTransform:
    """The permutation engine's TFCE: ``(n_perm_chunk, n_voxels)`` maps → TFCE maps.

    Built by :func:`tfce_transform`. For randomise's stepped sum the step is
    fixed from the unpermuted map: the engine calls :meth:`bind` with it
    before any rearrangement is evaluated (randomise ``tfceStatistic``:
    ``dh`` = unpermuted maximum / 100, unless ``--tfce-dh`` was given).

    Attributes
    ----------
    table : ndarray of int32, shape (n_voxels, n_neighbours)
    H, E : float
    connectivity : {6, 18, 26}
    dh : float or None
        Step of the stepped sum; None until bound. ``0.0``: the unpermuted
        map has no positive value, and every TFCE map is 0 (randomise writes
        a blank image).
    method : {'stepped', 'palm', 'exact'}
    f_df : tuple of int, optional
        ``(rank, dof)`` of an F contrast: maps are converted to z first.
    """

    table: np.ndarray
    H: float
    E: float
    connectivity: int
    dh: float | None
    method: str
    f_df: tuple[int, int] | None = None

    @property
    def settings(self) -> dict:
        """What defines the statistic, for the sidecar (``dh``: the step used; None for ``palm``/``exact``)."""
        return {"kind": "tfce", "H": self.H, "E": self.E, "connectivity": self.connectivity, "dh": self.dh,
                "method": self.method, "on": "z" if self.f_df is not None else "stat"}

    def bind(self, observed: torch.Tensor, *, kind: str, df: tuple[int, int]) -> "TfceTransform":
        """The transform for one contrast, its step taken from the unpermuted map.

        Parameters
        ----------
        observed : torch.Tensor, shape (n_voxels,)
            The unpermuted statistic map (t, or F for ``kind='f'``).
        kind : {'t', 'f'}
        df : tuple of int
            ``(rank, dof)`` of the contrast.

        Returns
        -------
        TfceTransform
        """
        bound = replace(self, f_df=tuple(df) if kind == "f" else None)
        if self.method != "stepped" or self.dh is not None:
            return bound
        values = bound._as_input(observed[None])
        maximum = float(values.max()) if values.numel() else 0.0
        if maximum <= 0:
            warnings.warn("the unpermuted statistic map has no positive value; its TFCE maps are blank (0) "
                          "and their corrected p are 1, as randomise writes them", RuntimeWarning, stacklevel=2)
        return replace(bound, dh=maximum / 100.0 if maximum > 0 else 0.0)

    def _as_input(self, stats: torch.Tensor) -> torch.Tensor:
        return stats if self.f_df is None else _f_as_z(stats, self.f_df)

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        if self.method == "stepped" and self.dh is None:
            raise ValueError("randomise's TFCE step comes from the unpermuted map: call bind() first")
        if self.dh == 0.0:
            return torch.zeros(stats.shape, dtype=torch.float32, device=stats.device)
        return _tfce_table(self._as_input(stats), self.table, H=self.H, E=self.E, dh=self.dh, method=self.method)


def tfce_transform(mask: np.ndarray, options: TfceOptions | None = None) -> TfceTransform:
    """A spatial transform for the permutation engine: maps → TFCE maps.

    Parameters
    ----------
    mask : ndarray of bool, shape (x, y, z)
    options : TfceOptions, optional
        H, E, connectivity, step and method; default ``TfceOptions()``
        (randomise ``-T``). ``dh`` None (randomise's rule) fixes the step
        from the unpermuted map when the engine binds the transform to a
        contrast (:meth:`TfceTransform.bind`); the neighbour table is built
        once.

    Returns
    -------
    TfceTransform
        ``f(stats)`` with ``stats`` a finite Tensor (n_perm_chunk, n_voxels)
        returns a float32 Tensor of the same shape and device.
    """
    options = options or TfceOptions()
    return TfceTransform(neighbour_table(mask, connectivity=options.connectivity), float(options.H), float(options.E),
                         int(options.connectivity), options.dh, options.method)
