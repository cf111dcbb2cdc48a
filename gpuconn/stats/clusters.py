"""Connected components of suprathreshold voxels, cluster extent and mass.

Clusters are the connected components of the voxels whose statistic is
strictly above a cluster-forming threshold (as FSL ``cluster``/randomise
``-c`` and nilearn ``permuted_ols(threshold=)`` define them), with 6-, 18- or
26-connectivity (faces; faces + edges; faces + edges + corners). Voxels
outside the analysis mask never belong to a cluster. Only positive
excursions form clusters; for negative effects test the negated contrast
as its own contrast, as randomise users do (not ``|stat|``).

Maps are handled as a batch ``(n_maps, n_voxels)`` of masked statistic maps
(a chunk of permutations), in the mask's voxel order (C order, as
``img.get_fdata()[mask]``). A cluster's mass is the sum of the statistic
over its voxels, as FSL randomise ``-C`` defines it
(``randomise.cc:clusterMassStatistic`` adds the unthresholded statistic of
every voxel with a label); PALM's ``-C`` mass is the same sum.

Two implementations give identical labels:

* CPU: union–find over a neighbour table (Numba-compiled; with a visible
  warning it runs as plain Python when Numba is missing).
* CUDA: the same union-find in ``kernels/labels.cu`` (CuPy), one map per
  thread.
* any torch device (and CUDA without CuPy, with a warning): minimum-label
  propagation over the neighbour table with pointer jumping, iterated to
  convergence, written once in torch.

Labels are canonical: cluster ``k`` (1-based) is the ``k``-th cluster met in
C (raster) order over the grid, which is also what :func:`scipy.ndimage.label`
returns, so tests can compare label volumes directly.

See Also
--------
scipy.ndimage.label : the reference labelling.
nilearn.mass_univariate._utils.calculate_cluster_measures : max extent/mass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..core.backend import chunk_size, cupy_launch, kernel_problem, load_kernel, map_launch, to_cupy
from ..core.errors import InputError
from .numba_compat import njit, prange, warn_no_numba
from .options import CONNECTIVITIES, check_connectivity

__all__ = [
    "CONNECTIVITIES",
    "connectivity_offsets",
    "neighbour_table",
    "label_maps",
    "cluster_maps",
    "cluster_transform",
    "as_batch",
]

_KINDS = ("extent", "mass")


def connectivity_offsets(connectivity: int = 6) -> np.ndarray:
    """Neighbour offsets of a voxel for a connectivity.

    Parameters
    ----------
    connectivity : {6, 18, 26}
        Faces; faces and edges; faces, edges and corners.

    Returns
    -------
    ndarray of int, shape (connectivity, 3)
        Offsets in lexicographic order; the first half precede the voxel
        in C order (negative), the second half follow it.
    """
    check_connectivity(connectivity)
    grid = np.stack(np.meshgrid(*([np.arange(-1, 2)] * 3), indexing="ij"), axis=-1).reshape(-1, 3)
    order = np.abs(grid).sum(axis=1)
    max_order = {6: 1, 18: 2, 26: 3}[connectivity]
    return grid[(order > 0) & (order <= max_order)]


def neighbour_table(mask: np.ndarray, *, connectivity: int = 6) -> np.ndarray:
    """In-mask neighbours of every in-mask voxel, as masked-voxel indices.

    Parameters
    ----------
    mask : ndarray of bool, shape (x, y, z)
    connectivity : {6, 18, 26}, default 6

    Returns
    -------
    ndarray of int32, shape (n_voxels, connectivity)
        ``table[i, j]`` is the index (in the mask's C order) of voxel ``i``'s
        ``j``-th neighbour (:func:`connectivity_offsets` order), or -1 when
        that neighbour is outside the mask or the volume. Columns
        ``0 .. connectivity/2 - 1`` are the neighbours that precede the
        voxel in C order.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise InputError(f"mask must be 3D, got shape {mask.shape}")
    index = np.full(np.array(mask.shape) + 2, -1, dtype=np.int32)
    index[1:-1, 1:-1, 1:-1][mask] = np.arange(int(mask.sum()), dtype=np.int32)
    coords = np.argwhere(mask) + 1
    offsets = connectivity_offsets(connectivity)
    table = np.empty((coords.shape[0], offsets.shape[0]), dtype=np.int32)
    for j, off in enumerate(offsets):
        shifted = coords + off
        table[:, j] = index[shifted[:, 0], shifted[:, 1], shifted[:, 2]]
    return table


# --------------------------------------------------------------------------- CPU core (Numba)


@njit
def _find(parent, v):
    """Root of ``v`` with path halving."""
    while parent[v] != v:
        parent[v] = parent[parent[v]]
        v = parent[v]
    return v


@njit(parallel=True)
def _label_batch(values, table, threshold, labels, n_labels):
    """Union-find labelling of ``values > threshold`` for each map (in place).

    The root of each component is its smallest voxel index, so numbering
    roots in index order gives raster-order (canonical) labels.
    """
    n_maps, n_vox = values.shape
    half = table.shape[1] // 2
    for m in prange(n_maps):
        parent = np.empty(n_vox, dtype=np.int32)
        for v in range(n_vox):
            parent[v] = v if values[m, v] > threshold else -1
        for v in range(n_vox):
            if parent[v] < 0:
                continue
            for j in range(half):
                u = table[v, j]
                if u < 0 or parent[u] < 0:
                    continue
                ru = _find(parent, u)
                rv = _find(parent, v)
                if ru < rv:
                    parent[rv] = ru
                elif rv < ru:
                    parent[ru] = rv
        count = 0
        for v in range(n_vox):
            if parent[v] < 0:
                labels[m, v] = 0
            elif parent[v] == v:
                count += 1
                labels[m, v] = count
            else:  # the root has a smaller index, so it is already numbered
                labels[m, v] = labels[m, _find(parent, v)]
        n_labels[m] = count


@njit(parallel=True)
def _cluster_stat_batch(values, labels, n_labels, mass, out):
    """Each voxel's cluster extent (``mass=False``) or mass, from labels (in place)."""
    n_maps, n_vox = values.shape
    for m in prange(n_maps):
        totals = np.zeros(n_labels[m] + 1, dtype=np.float64)
        for v in range(n_vox):
            lab = labels[m, v]
            if lab > 0:
                totals[lab] += np.float64(values[m, v]) if mass else 1.0
        for v in range(n_vox):
            out[m, v] = totals[labels[m, v]] if labels[m, v] > 0 else 0.0


# --------------------------------------------------------------------------- torch core (any device)


def _label_torch(values: torch.Tensor, table: torch.Tensor, threshold: float) -> torch.Tensor:
    """Minimum-index propagation with pointer jumping; labels as in :func:`_label_batch`.

    Parameters
    ----------
    values : Tensor, shape (n_maps, n_voxels)
    table : Tensor of int64, shape (n_voxels, connectivity), -1 for no neighbour
    threshold : float

    Returns
    -------
    Tensor of int64, shape (n_maps, n_voxels)
        0 for background, canonical 1-based labels elsewhere.
    """
    n_maps, n_vox = values.shape
    fg = values > threshold
    big = n_vox  # background sentinel: larger than any voxel index
    ids = torch.arange(n_vox, device=values.device).expand(n_maps, n_vox)
    root = torch.where(fg, ids, torch.full_like(ids, big))
    nbr = torch.where(table < 0, torch.full_like(table, big), table)  # (n_vox, k)
    while True:
        padded = torch.cat([root, torch.full((n_maps, 1), big, dtype=root.dtype, device=root.device)], dim=1)
        new = root
        for j in range(nbr.shape[1]):
            new = torch.minimum(new, padded[:, nbr[:, j]])
        new = torch.where(fg, new, root)
        # pointer jumping: adopt the root of my current root until stable
        while True:
            padded = torch.cat([new, torch.full((n_maps, 1), big, dtype=new.dtype, device=new.device)], dim=1)
            jumped = torch.gather(padded, 1, new)
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, root):
            break
        root = new
    is_root = fg & (root == ids)
    rank = torch.cumsum(is_root.to(torch.int64), dim=1)
    padded_rank = torch.cat([rank, torch.zeros((n_maps, 1), dtype=rank.dtype, device=rank.device)], dim=1)
    return torch.where(fg, torch.gather(padded_rank, 1, root), torch.zeros_like(root))


# --------------------------------------------------------------------------- public API


def as_batch(values, n_vox: int, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[1] != n_vox:
        raise InputError(f"{what} must have shape (n_maps, {n_vox}) to match the mask, got {tuple(tensor.shape)}")
    return tensor


def _label_numpy(data: np.ndarray, table: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Union-find labels (n_maps, n_voxels) int32 and cluster counts (n_maps,) of float32 maps."""
    warn_no_numba("cluster labelling")
    labels = np.empty(data.shape, dtype=np.int32)
    n_labels = np.empty(data.shape[0], dtype=np.int32)
    _label_batch(data, table, np.float32(threshold), labels, n_labels)
    return labels, n_labels


# CUDA working memory per voxel and map of the cluster kernels: parent and labels (int32), the
# cluster totals (float64) and a float32 copy of the values; the float64 result (8 more) is
# allocated once for the whole batch.
_CUDA_CLUSTER_BYTES_PER_VOXEL = 4 + 4 + 8 + 4


def _cuda_label_chunks(values: torch.Tensor, table: np.ndarray, threshold: float, launch: Callable) -> None:
    """Label ``values`` with ``kernels/labels.cu`` in sub-chunks sized from free memory.

    ``launch(start, b, data, labels, n_labels)`` runs after each labelling
    launch, in the same stream and CuPy device context, with the chunk's
    float32 values and int32 labels and cluster counts.
    """
    device = values.device
    kernel = load_kernel("labels.cu", "gpuconn_label_batch", device.index or 0)
    n_maps, n_vox = values.shape
    table_t = torch.as_tensor(table, device=device).to(torch.int32).contiguous()
    step = chunk_size(_CUDA_CLUSTER_BYTES_PER_VOXEL * max(n_vox, 1), device, n_items=n_maps)
    for start in range(0, n_maps, step):
        data = values[start : start + step].to(torch.float32).contiguous()
        b = data.shape[0]
        parent = torch.empty((b, n_vox), dtype=torch.int32, device=device)
        labels = torch.empty((b, n_vox), dtype=torch.int32, device=device)
        n_labels = torch.empty(b, dtype=torch.int32, device=device)
        with cupy_launch(device):
            kernel(*map_launch(b, device), (to_cupy(data), to_cupy(table_t), np.float32(threshold), to_cupy(parent),
                   to_cupy(labels), to_cupy(n_labels), np.int32(b), np.int32(n_vox), np.int32(table.shape[1])))
            launch(start, b, data, labels, n_labels)


def _label_cuda(values: torch.Tensor, table: np.ndarray, threshold: float) -> torch.Tensor:
    """``kernels/labels.cu`` (one map per thread); torch propagation, with a warning, without the kernels."""
    if kernel_problem(values.device, "cluster labelling", "the slower torch label propagation") is not None:
        return _label_torch(values, torch.as_tensor(table, device=values.device).to(torch.int64), threshold)
    out = torch.empty(values.shape, dtype=torch.int64, device=values.device)

    def keep(start, b, data, labels, n_labels):
        out[start : start + b] = labels

    _cuda_label_chunks(values, table, threshold, keep)
    return out


def _cluster_cuda(values: torch.Tensor, table: np.ndarray, threshold: float, kind: str) -> torch.Tensor:
    """Per-voxel cluster extent/mass of CUDA maps with ``kernels/labels.cu``.

    Both kernels run one thread per map and sum each cluster in voxel order,
    as the Numba twin does, so the float64 totals are bit-identical to the
    CPU's (no atomics). Without the kernels: torch labels and an exact
    integer scatter sum (:func:`_per_voxel_cluster_stats`, bit-identical
    from run to run), with a warning.
    """
    device = values.device
    if kernel_problem(device, "cluster inference", "torch label propagation and a scatter sum") is not None:
        labels = _label_torch(values, torch.as_tensor(table, device=device).to(torch.int64), threshold)
        return _per_voxel_cluster_stats(values, labels, kind)
    stat_kernel = load_kernel("labels.cu", "gpuconn_cluster_stat_batch", device.index or 0)
    n_vox = values.shape[1]
    out = torch.zeros(values.shape, dtype=torch.float64, device=device)

    def stats(start, b, data, labels, n_labels):
        totals = torch.empty((b, n_vox + 1), dtype=torch.float64, device=device)
        result = out[start : start + b]
        stat_kernel(*map_launch(b, device), (to_cupy(data), to_cupy(labels), to_cupy(n_labels),
                    np.int32(kind == "mass"), to_cupy(totals), to_cupy(result),
                    np.int32(b), np.int32(n_vox)))

    _cuda_label_chunks(values, table, threshold, stats)
    return out


def _label_tensor(values: torch.Tensor, table: np.ndarray, threshold: float) -> torch.Tensor:
    """Dispatch: Numba union-find for CPU tensors, the CUDA kernel for CUDA tensors, torch propagation elsewhere."""
    if values.device.type == "cpu":
        data = np.ascontiguousarray(values.detach().numpy(), dtype=np.float32)
        return torch.from_numpy(_label_numpy(data, table, threshold)[0]).to(torch.int64)
    if values.device.type == "cuda":
        return _label_cuda(values, table, float(threshold))
    return _label_torch(values, torch.as_tensor(table, device=values.device).to(torch.int64), float(threshold))


def label_maps(
    values,
    mask: np.ndarray,
    *,
    threshold: float = 0.0,
    connectivity: int = 6,
    table: np.ndarray | None = None,
) -> torch.Tensor:
    """Label the clusters (``value > threshold``) of a batch of masked maps.

    Parameters
    ----------
    values : array or Tensor, shape (n_maps, n_voxels) or (n_voxels,)
        Statistic maps in the mask's voxel order; a CPU tensor or array is
        labelled by the union-find core, a CUDA tensor on its device.
    mask : ndarray of bool, shape (x, y, z)
    threshold : float, default 0.0
        Cluster-forming threshold; voxels strictly above it are clustered.
    connectivity : {6, 18, 26}, default 6
    table : ndarray, optional
        A precomputed :func:`neighbour_table` for ``mask`` and ``connectivity``.

    Returns
    -------
    Tensor of int64, shape (n_maps, n_voxels)
        0 outside clusters; clusters numbered 1.. in raster order, as
        :func:`scipy.ndimage.label` numbers them.
    """
    table = neighbour_table(mask, connectivity=connectivity) if table is None else table
    return _label_tensor(as_batch(values, table.shape[0], "values"), table, threshold)


def _per_voxel_cluster_stats(values: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Each voxel's cluster extent (voxels) or mass (sum of the statistic); 0 outside clusters.

    The sums are exact integer sums, so the scatter's order (atomics on
    CUDA) cannot change a bit: extent counts voxels; mass adds each value
    in fixed point, ``round(v * 2**e)`` as int64 with one exponent ``e``
    per map, the largest for which the map's total ``sum |v|`` cannot
    overflow (every float32 value above about ``2**-e * 2**24`` is exact;
    smaller ones are rounded by less than ``2**-e``). Within summation-
    order rounding of the voxel-order float64 sums of the Numba twin.
    """
    n_maps, n_vox = values.shape
    n_bins = n_vox + 1  # labels are at most n_vox
    flat = (labels + torch.arange(n_maps, device=labels.device)[:, None] * n_bins).reshape(-1)
    if kind == "extent":
        weights = torch.ones(flat.shape, dtype=torch.int64, device=values.device)
        scale = torch.ones((n_maps, 1), dtype=torch.float64, device=values.device)
    else:
        wide = values.to(torch.float64)
        bound = torch.where(labels > 0, wide.abs(), torch.zeros_like(wide)).sum(1, keepdim=True) + 1.0
        scale = torch.exp2(61.0 - torch.ceil(torch.log2(bound)))  # |total| * scale <= 2**61
        weights = torch.round(wide * scale).to(torch.int64).reshape(-1)
    totals = torch.zeros(n_maps * n_bins, dtype=torch.int64, device=values.device).index_add_(0, flat, weights)
    per_voxel = totals[flat].reshape(n_maps, n_vox).to(torch.float64) / scale
    return torch.where(labels > 0, per_voxel, torch.zeros_like(per_voxel))


def cluster_maps(
    values,
    mask: np.ndarray,
    *,
    threshold: float,
    kind: str = "extent",
    connectivity: int = 6,
    table: np.ndarray | None = None,
) -> torch.Tensor:
    """Each voxel's cluster extent or mass, for a batch of masked maps.

    Parameters
    ----------
    values : array or Tensor, shape (n_maps, n_voxels)
    mask : ndarray of bool, shape (x, y, z)
    threshold : float
        Cluster-forming threshold (voxels strictly above it).
    kind : {'extent', 'mass'}
        ``extent``: number of voxels in the cluster; ``mass``: sum of the
        statistic over the cluster (FSL randomise ``-C``).
    connectivity : {6, 18, 26}, default 6
    table : ndarray, optional
        Precomputed :func:`neighbour_table`.

    Returns
    -------
    Tensor of float64, shape (n_maps, n_voxels), on the values' device
        0 outside clusters. Its row maxima are the per-map maximum cluster
        extent/mass used for FWER correction.
    """
    if kind not in _KINDS:
        raise InputError(f"cluster kind must be 'extent' or 'mass' (got {kind!r})")
    table = neighbour_table(mask, connectivity=connectivity) if table is None else table
    batch = as_batch(values, table.shape[0], "values")
    if batch.device.type == "cpu":
        data = np.ascontiguousarray(batch.detach().numpy(), dtype=np.float32)
        labels, n_labels = _label_numpy(data, table, threshold)
        out = np.empty(data.shape, dtype=np.float64)
        _cluster_stat_batch(data, labels, n_labels, kind == "mass", out)
        return torch.from_numpy(out)
    if batch.device.type == "cuda":
        return _cluster_cuda(batch, table, float(threshold), kind)
    labels = _label_tensor(batch, table, float(threshold))
    return _per_voxel_cluster_stats(batch, labels, kind)


def cluster_transform(
    mask: np.ndarray,
    threshold: float,
    *,
    kind: str = "extent",
    connectivity: int = 6,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A spatial transform for the permutation engine: maps → per-voxel cluster extent/mass.

    Parameters
    ----------
    mask : ndarray of bool, shape (x, y, z)
    threshold : float
        Cluster-forming threshold (randomise ``-c``/``-C``).
    kind : {'extent', 'mass'}
    connectivity : {6, 18, 26}, default 6

    Returns
    -------
    callable
        ``f(stats)`` with ``stats`` a Tensor (n_perm_chunk, n_voxels) returns
        a float32 Tensor of the same shape and device; its ``settings``
        attribute (kind, threshold, connectivity) goes to the sidecar.
    """
    if kind not in _KINDS:
        raise InputError(f"cluster kind must be 'extent' or 'mass' (got {kind!r})")
    table = neighbour_table(mask, connectivity=connectivity)

    def transform(stats: torch.Tensor) -> torch.Tensor:
        out = cluster_maps(stats, mask, threshold=threshold, kind=kind, table=table)
        return out.to(device=stats.device, dtype=torch.float32)

    transform.settings = {"kind": f"cluster {kind}", "threshold": float(threshold), "connectivity": int(connectivity)}
    return transform
