"""Cluster tables and cluster index images, as FSL ``cluster`` writes them.

For a 3D statistic map and a cluster-forming threshold (voxels strictly
above it, 26-connectivity by default as FSL ``cluster``), each cluster gets a
row: its index, size in voxels and mm³, peak value with voxel and MNI (mm,
from the image affine) coordinates, and centre of gravity (mm, weighted by
the statistic as FSL weights it). Optional columns: the smallest corrected
p in the cluster (from a randomise ``*_corrp_*`` map, which holds 1 - p), a
per-cluster p (e.g. GRF, :mod:`gpuconn.stats.grf`), and the atlas label at
the peak. Local maxima (FSL ``--olmax``) come as a second table.

Cluster indices follow FSL ``--oindex``: 1 is the smallest cluster and the
largest has the highest index; tables list the largest first. Negative
effects: threshold the negated map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from ..core.atlas import read_atlas_labels
from ..core.errors import InputError, OptionError
from ..core.io import check_same_grid, load_image, load_mask, save_image, write_tsv
from .clusters import label_maps

__all__ = ["ClusterTable", "cluster_table", "local_maxima", "read_atlas_labels", "write_cluster_table"]


@dataclass(frozen=True)
class ClusterTable:
    """Clusters of one map.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per cluster, largest first (columns in :func:`cluster_table`).
    index_image : ndarray of int32, shape (x, y, z)
        0 outside clusters, FSL ``--oindex`` numbering inside.
    maxima : pandas.DataFrame or None
        Local maxima (``cluster_index, value, i, j, k, x, y, z``), when asked for.
    """

    table: pd.DataFrame
    index_image: np.ndarray
    maxima: pd.DataFrame | None = None


_AROUND = np.ones((3, 3, 3), dtype=bool)
_AROUND[1, 1, 1] = False  # the 26 neighbours, not the voxel itself


def _mm(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel coordinates (n, 3) → mm (n, 3)."""
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _index_by_size(labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Renumber labels so that 1 is the smallest cluster (ties: later raster label first)."""
    order = np.lexsort((-np.arange(sizes.size), sizes))  # ascending size
    new = np.zeros(sizes.size + 1, dtype=np.int32)
    new[order + 1] = np.arange(1, sizes.size + 1, dtype=np.int32)
    return new[labels]


def local_maxima(
    stat: np.ndarray,
    index_image: np.ndarray,
    affine: np.ndarray,
    *,
    n_per_cluster: int = 3,
    min_distance_mm: float = 8.0,
) -> pd.DataFrame:
    """Local maxima inside clusters (FSL ``--olmax``-like).

    A voxel is a local maximum when no voxel of its 26-neighbourhood within
    the same cluster is larger and at least one is smaller (plateaus are
    skipped). Per cluster, maxima are taken from the
    largest down, skipping any within ``min_distance_mm`` of one already
    kept, up to ``n_per_cluster``.

    Parameters
    ----------
    stat : ndarray, shape (x, y, z)
    index_image : ndarray of int, shape (x, y, z)
    affine : ndarray, shape (4, 4)
    n_per_cluster : int, default 3
    min_distance_mm : float, default 8.0

    Returns
    -------
    pandas.DataFrame
        Columns ``cluster_index, value, i, j, k, x, y, z``; clusters as in
        the cluster table (largest first), maxima by decreasing value.
    """
    rows = []
    inside = index_image > 0
    masked = np.where(inside, stat, -np.inf)
    for index in sorted(np.unique(index_image[inside]), reverse=True):
        member = index_image == index
        in_cluster = np.where(member, masked, -np.inf)
        peaks = member & (in_cluster == ndimage.maximum_filter(in_cluster, size=3, mode="constant", cval=-np.inf))
        # a voxel whose in-cluster neighbours all equal it sits on a plateau: not a maximum
        lowest = ndimage.minimum_filter(np.where(member, stat, np.inf), footprint=_AROUND, mode="constant", cval=np.inf)
        peaks &= lowest != in_cluster
        coords = np.argwhere(peaks)
        coords = coords[np.argsort(-stat[tuple(coords.T)], kind="stable")]
        kept: list[np.ndarray] = []
        for ijk in coords:
            mm = _mm(affine, ijk)[0]
            if all(np.linalg.norm(mm - other) >= min_distance_mm for other in kept):
                kept.append(mm)
                rows.append((int(index), float(stat[tuple(ijk)]), *map(int, ijk), *mm))
            if len(kept) == n_per_cluster:
                break
    return pd.DataFrame(rows, columns=["cluster_index", "value", "i", "j", "k", "x", "y", "z"])


def cluster_table(
    stat: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float,
    mask: np.ndarray | None = None,
    connectivity: int = 26,
    min_voxels: int = 1,
    corrp: np.ndarray | None = None,
    cluster_p: dict[int, float] | None = None,
    atlas: np.ndarray | None = None,
    atlas_labels: dict[int, str] | None = None,
    maxima: bool = False,
    n_maxima: int = 3,
    min_distance_mm: float = 8.0,
) -> ClusterTable:
    """Clusters of a 3D statistic map above a threshold, as a table and an index image.

    Parameters
    ----------
    stat : ndarray, shape (x, y, z)
        Statistic map (NaN counts as outside the mask).
    affine : ndarray, shape (4, 4)
        Voxel → mm (MNI for MNI-space images).
    threshold : float
        Cluster-forming threshold (voxels ``> threshold``).
    mask : ndarray of bool, shape (x, y, z), optional
        Default: finite voxels.
    connectivity : {6, 18, 26}, default 26
    min_voxels : int, default 1
        Smaller clusters are dropped (FSL ``--minextent``).
    corrp : ndarray, shape (x, y, z), optional
        A ``1 - p`` map (randomise ``*_corrp_*``): adds ``p_corrected_min``.
    cluster_p : dict, optional
        ``{raster label: p}`` for the clusters as :func:`label_maps` numbers
        them (e.g. GRF p): adds ``p`` and ``log10_p`` (FSL's ``-log10(P)``).
    atlas : ndarray of int, shape (x, y, z), optional
        Atlas image on the same grid: adds ``peak_label`` (``atlas_labels``
        name, else the integer) and ``atlas_overlap``, the labels the
        cluster's voxels fall in with their share, largest first
        (``"insula 62%; n/a 38%"``; ``n/a``: outside every label).
    maxima : bool, default False
        Also return local maxima (:func:`local_maxima`).
    n_maxima, min_distance_mm
        Passed to :func:`local_maxima`.

    Returns
    -------
    ClusterTable
        Columns: ``cluster_index, voxels, volume_mm3, peak_value, peak_i,
        peak_j, peak_k, peak_x, peak_y, peak_z, cog_x, cog_y, cog_z`` and
        the optional ones.
    """
    stat = np.asarray(stat, dtype=np.float64)
    if stat.ndim != 3:
        raise InputError(f"the statistic map must be 3D, got shape {stat.shape}")
    for name, other in (("mask", mask), ("corrp", corrp), ("atlas", atlas)):
        if other is not None and np.shape(other) != stat.shape:
            raise InputError(f"{name} has shape {np.shape(other)} but the statistic map has {stat.shape}")
    mask = np.isfinite(stat) if mask is None else (np.asarray(mask, dtype=bool) & np.isfinite(stat))
    values = stat[mask]
    raster = np.zeros(stat.shape, dtype=np.int64)
    raster[mask] = label_maps(values.astype(np.float32), mask, threshold=threshold,
                              connectivity=connectivity).numpy()[0]
    sizes = np.bincount(raster.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_voxels) + 1
    relabel = np.zeros(sizes.size + 1, dtype=np.int64)
    relabel[keep] = np.arange(1, keep.size + 1)
    kept = relabel[raster]
    index_image = _index_by_size(kept, sizes[keep - 1]) if keep.size else np.zeros(stat.shape, np.int32)
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for raster_label in keep:
        voxels = np.argwhere(raster == raster_label)
        vals = stat[tuple(voxels.T)]
        peak = voxels[np.argmax(vals)]
        weights = vals / vals.sum() if vals.sum() > 0 else np.full(vals.size, 1 / vals.size)
        row = {
            "cluster_index": int(index_image[tuple(peak)]),
            "voxels": int(voxels.shape[0]),
            "volume_mm3": voxels.shape[0] * voxel_volume,
            "peak_value": float(vals.max()),
            "peak_i": int(peak[0]), "peak_j": int(peak[1]), "peak_k": int(peak[2]),
        }
        row.update(zip(("peak_x", "peak_y", "peak_z"), _mm(affine, peak)[0]))
        row.update(zip(("cog_x", "cog_y", "cog_z"), _mm(affine, weights @ voxels)[0]))
        if corrp is not None:
            row["p_corrected_min"] = float(1.0 - np.asarray(corrp)[tuple(voxels.T)].max())
        if cluster_p is not None:
            p = float(cluster_p[int(raster_label)])
            row["p"] = p
            row["log10_p"] = float(-np.log10(max(p, 1e-300)))
        if atlas is not None:
            codes = np.asarray(atlas)[tuple(voxels.T)].astype(np.int64)
            name = lambda c: (atlas_labels or {}).get(int(c), str(int(c))) if c else "n/a"  # noqa: E731
            row["peak_label"] = name(np.asarray(atlas)[tuple(peak)])
            found, counts = np.unique(codes, return_counts=True)
            order = np.argsort(-counts, kind="stable")
            row["atlas_overlap"] = "; ".join(f"{name(found[i])} {100 * counts[i] / codes.size:.0f}%" for i in order)
        rows.append(row)
    columns = ["cluster_index", "voxels", "volume_mm3", "peak_value", "peak_i", "peak_j", "peak_k",
               "peak_x", "peak_y", "peak_z", "cog_x", "cog_y", "cog_z"]
    optional = (["p_corrected_min"] * (corrp is not None) + ["p", "log10_p"] * (cluster_p is not None)
                + ["peak_label", "atlas_overlap"] * (atlas is not None))  # present even with no cluster
    table = pd.DataFrame(rows, columns=columns + optional)
    table = table.sort_values("cluster_index", ascending=False, ignore_index=True)
    lmax = local_maxima(stat, index_image, affine, n_per_cluster=n_maxima,
                        min_distance_mm=min_distance_mm) if maxima else None
    return ClusterTable(table, index_image.astype(np.int32), lmax)


def write_cluster_table(
    stat_path: str | os.PathLike,
    output_root: str | os.PathLike,
    *,
    threshold: float,
    mask_path: str | os.PathLike | None = None,
    corrp_path: str | os.PathLike | None = None,
    atlas_path: str | os.PathLike | None = None,
    atlas_labels_path: str | os.PathLike | None = None,
    connectivity: int = 26,
    min_voxels: int = 1,
    maxima: bool = False,
    min_distance_mm: float = 8.0,
) -> ClusterTable:
    """File-level :func:`cluster_table` (``gpuconn clusters``).

    Reads and checks every input first, then writes ``<root>_clusters.tsv``,
    ``<root>_cluster_index.nii.gz`` (FSL ``--oindex``) and, with
    ``maxima``, ``<root>_maxima.tsv``.

    Returns
    -------
    ClusterTable
    """
    img = load_image(stat_path, ndim=3, what="statistic image (-i)")
    stat = np.asarray(img.dataobj, dtype=np.float64)
    mask = None
    if mask_path is not None:
        mask, _ = load_mask(mask_path, reference=img, reference_path=stat_path, what="mask (-m)")
    extra = {}
    for key, path, what in (("corrp", corrp_path, "corrected-p image (--corrp)"), ("atlas", atlas_path, "atlas image")):
        if path is not None:
            other = load_image(path, ndim=3, what=what)
            check_same_grid(img, stat_path, other, path)
            extra[key] = np.asarray(other.dataobj)
    if "corrp" in extra and not (np.nanmin(extra["corrp"]) >= 0 and np.nanmax(extra["corrp"]) <= 1):
        raise InputError(f"{corrp_path} has values outside [0, 1]; pass a randomise *_corrp_* map (1 - p)")
    if atlas_labels_path is not None and atlas_path is None:
        raise OptionError("{atlas_labels_path} needs {atlas_path} (the atlas image the labels belong to)")
    labels = read_atlas_labels(atlas_labels_path) if atlas_labels_path is not None else None
    result = cluster_table(stat, img.affine, threshold=threshold, mask=mask, connectivity=connectivity,
                           min_voxels=min_voxels, corrp=extra.get("corrp"), atlas=extra.get("atlas"),
                           atlas_labels=labels, maxima=maxima, min_distance_mm=min_distance_mm)
    root = str(output_root)
    params = {"stat": str(stat_path), "threshold": threshold, "connectivity": connectivity, "min_voxels": min_voxels}
    write_tsv(result.table, f"{root}_clusters.tsv", params=params, sidecar=True)
    save_image(result.index_image, img, f"{root}_cluster_index.nii.gz", params=params, dtype=np.int32)
    if result.maxima is not None:
        write_tsv(result.maxima, f"{root}_maxima.tsv")
    return result
