"""Seed regions and seed-to-voxel connectivity maps.

A seed (or ROI) is a :class:`Region`: one or more spheres at world (MNI mm)
coordinates with a radius, or the non-zero voxels / one label of an image.
:func:`region_masks` places regions on any image grid through its affine,
and :func:`correlate_seeds` turns the mean seed time series into Pearson r,
Fisher z and regression beta maps for every voxel in a mask, as one batched
matrix product ``(n_seeds, n_volumes) @ (n_volumes, n_voxels)`` on the
device. :func:`compute_seed_maps` streams subjects from disk through it and
writes one 4D file per subject (a volume per seed) or per seed (a volume per
subject, ready for ``gpuconn randomise``).

Sphere voxel-inclusion rule
---------------------------
The same voxel set as nilearn's ``NiftiSpheresMasker``
(``nilearn.maskers.nifti_spheres_masker.apply_mask_and_get_affinity``),
among the voxels allowed by the brain mask (all grid voxels without one):

1. every voxel whose centre lies within ``radius`` of the seed in world
   coordinates: ``sum((affine @ ijk - seed) ** 2) <= radius ** 2`` (float64);
2. plus the voxel nearest to the seed, ``round(inv(affine) @ seed)`` with
   NumPy's half-to-even rounding, when it is inside the grid and the mask;
3. plus, as nilearn does, the first voxel in C order whose world
   coordinates truncated toward zero equal the seed's truncated
   coordinates (on 1-2 mm MNI grids with integer voxel centres this is a
   voxel within 1.8 mm of the seed, already included by rule 1 for radii
   of 2 mm and more).

This is the rule as ``NiftiSpheresMasker.transform`` applies it to images;
nilearn's image-less branch of the same function (used by ``fit`` for
reports) skips rule 2, because it compares tuples with lists.

A mirrored sphere is the same sphere at ``(-x, y, z)``; a bilateral seed is
the union of the two voxel sets.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .backend import as_data, resolve_device, to_numpy
from .bids import DEFAULT_SPACE, find_runs
from .errors import InputError
from .io import (
    check_same_grid,
    load_header,
    load_image,
    load_mask,
    masked_data,
    read_tsv,
    save_image,
    split_ext,
    unmask,
    write_tsv,
)
from .progress import progress_bar

__all__ = [
    "Region",
    "BoldInput",
    "SeedMaps",
    "MIRROR_CHOICES",
    "LAYOUTS",
    "STATS",
    "FISHER_CLIP",
    "mirror_coord",
    "parse_coord",
    "sphere_mask",
    "sphere_regions",
    "image_region",
    "read_regions",
    "regions_from_options",
    "region_masks",
    "region_weights",
    "region_means",
    "correlate_seeds",
    "fisher_z",
    "bold_inputs",
    "label_entities",
    "PreparedInput",
    "prepare_inputs",
    "stream_inputs",
    "compute_seed_maps",
]

#: ``mirror`` values: none, ``add`` (a second seed at -x) or ``union`` (one bilateral seed).
MIRROR_CHOICES = ("none", "add", "union")
#: ``--layout`` values.
LAYOUTS = ("subject", "seed")
#: Statistics a seed map can hold.
STATS = ("r", "z", "beta")
#: Fisher z is computed as ``arctanh(clip(r, -FISHER_CLIP, FISHER_CLIP))`` in float64 (|z| <= 8.4).
FISHER_CLIP = 1.0 - 1e-7

_NAME = re.compile(r"^[A-Za-z0-9]+$")
_MIRROR_WORDS = {
    "": "none", "none": "none", "no": "none", "false": "none", "0": "none",
    "add": "add", "yes": "add", "true": "add", "1": "add",
    "union": "union", "bilateral": "union",
}  # fmt: skip
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")


@dataclass(frozen=True)
class Region:
    """A named seed or ROI: spheres at world coordinates, or (a label of) an image.

    Attributes
    ----------
    name : str
        Letters and digits only (it becomes part of file names).
    centers : tuple of (x, y, z)
        Sphere centres in world (MNI) mm; several centres give their union.
    radius : float or None
        Sphere radius in mm (spheres only).
    image : Path or None
        A 3D image on the data's grid: voxels ``> 0``, or ``== label``.
    label : int or None
        The atlas label to take from ``image``.
    """

    name: str
    centers: tuple[tuple[float, float, float], ...] = ()
    radius: float | None = None
    image: Path | None = None
    label: int | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (not self.centers) or (self.centers and self.radius is None):
            raise ValueError(f"region {self.name!r} needs either centers and a radius, or an image")

    def describe(self) -> dict:
        """A JSON-ready definition for sidecars."""
        if self.image is not None:
            return {"name": self.name, "image": str(self.image), "label": self.label}
        return {"name": self.name, "centers_mm": [list(c) for c in self.centers], "radius_mm": self.radius}


@dataclass(frozen=True)
class BoldInput:
    """One 4D series to analyse: its output label, BOLD file and brain mask."""

    label: str
    bold: Path
    mask: Path

    @property
    def entities(self) -> dict[str, str | None]:
        """``subject`` and ``session`` parsed from the label (None when absent)."""
        return label_entities(self.label)


def label_entities(text: str) -> dict[str, str | None]:
    """``subject`` and ``session`` from the ``sub-``/``ses-`` entities of a label or file stem (None when absent)."""
    found = dict(_ENTITY.findall(text))
    return {"subject": found.get("sub"), "session": found.get("ses")}


class SeedMaps(NamedTuple):
    """Seed-to-voxel maps; leading batch dimensions of the data are kept.

    Attributes
    ----------
    r, z, beta : torch.Tensor, shape (..., n_seeds, n_voxels)
        Pearson r, Fisher z, and the slope of voxel on seed (float32).
    timeseries : torch.Tensor, shape (..., n_seeds, n_volumes)
        Mean seed time series (not centred).
    """

    r: torch.Tensor
    z: torch.Tensor
    beta: torch.Tensor
    timeseries: torch.Tensor


# --------------------------------------------------------------------------- spheres


def mirror_coord(center: Sequence[float]) -> tuple[float, float, float]:
    """Reflect a world coordinate across the midline: ``(x, y, z) -> (-x, y, z)``."""
    x, y, z = (float(v) for v in center)
    return (-x if x != 0 else 0.0, y, z)


def parse_coord(text: str, *, option: str = "--seed-coord") -> tuple[float, float, float]:
    """Parse ``'-18,-38,72'`` into three floats (mm).

    Raises
    ------
    InputError
        Naming ``option`` when the text is not three comma-separated numbers.
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise InputError(f"{option} {text!r} is not x,y,z in mm; write it as e.g. {option} -18,-38,72")
    return values  # type: ignore[return-value]


def _allowed_voxels(shape: tuple[int, int, int], mask: np.ndarray | None) -> np.ndarray:
    """Indices ``(n, 3)`` of the voxels a sphere may use, in C order (as nilearn lists them)."""
    if mask is None:
        return np.indices(shape).reshape(3, -1).T
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from grid shape {shape}")
    return np.argwhere(mask)


def _world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(n, 3)`` of voxel indices, computed as nilearn's ``coord_transform``."""
    homogeneous = np.c_[ijk, np.ones(len(ijk))].T.astype(np.float64)
    return np.dot(affine, homogeneous)[:3].T


def _sphere_rows(center: np.ndarray, radius: float, affine: np.ndarray, ijk: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Boolean ``(n,)`` over the allowed voxels: the nilearn inclusion rule (module docstring)."""
    inside = ((world - center) ** 2).sum(axis=1) <= float(radius) ** 2
    nearest = np.round(np.dot(np.linalg.inv(affine), np.r_[center, 1.0])[:3]).astype(int)
    hit = np.flatnonzero((ijk == nearest).all(axis=1))
    inside[hit[:1]] = True
    same_int = np.flatnonzero((world.astype(int) == np.array([int(v) for v in center])).all(axis=1))
    inside[same_int[:1]] = True
    return inside


def sphere_mask(
    center: Sequence[float],
    radius: float,
    affine: np.ndarray,
    shape: Sequence[int],
    *,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Voxels of a sphere on a grid, with nilearn ``NiftiSpheresMasker``'s inclusion rule.

    Parameters
    ----------
    center : (x, y, z)
        World (MNI) coordinate in mm.
    radius : float
        Radius in mm (``>= 0``).
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform of the grid.
    shape : sequence of int
        Grid shape (only the first three entries are used).
    mask : ndarray of bool, shape (x, y, z), optional
        Voxels the sphere may use (a brain mask).

    Returns
    -------
    ndarray of bool, shape (x, y, z)
        Possibly empty (a seed outside the grid or the mask).

    See Also
    --------
    nilearn.maskers.NiftiSpheresMasker : the reference rule.
    """
    shape = tuple(int(s) for s in shape[:3])
    if radius < 0 or not math.isfinite(radius):
        raise InputError(f"sphere radius must be a finite number >= 0 mm, got {radius}")
    affine = np.asarray(affine, dtype=np.float64)
    ijk = _allowed_voxels(shape, mask)
    out = np.zeros(shape, dtype=bool)
    if len(ijk):
        rows = _sphere_rows(np.asarray(center, dtype=np.float64), radius, affine, ijk, _world(ijk, affine))
        out[tuple(ijk[rows].T)] = True
    return out


# --------------------------------------------------------------------------- regions


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(str(name)):
        raise InputError(f"{what} name {name!r} must be letters and digits only (it is used in file names), e.g. S1back")
    return str(name)


def _mirror_mode(value: object, what: str) -> str:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip().lower()
    if text.endswith(".0"):
        text = text[:-2]
    if text not in _MIRROR_WORDS:
        raise InputError(
            f"{what} mirror value {value!r} is not understood; use none, add (a second seed at -x) "
            "or union (one bilateral seed)"
        )
    return _MIRROR_WORDS[text]


def sphere_regions(
    name: str,
    center: Sequence[float],
    radius: float,
    *,
    mirror: str = "none",
    what: str = "seed",
) -> list[Region]:
    """One sphere region, plus its mirror image as asked.

    Parameters
    ----------
    name : str
        Region name (letters and digits).
    center : (x, y, z)
        World mm.
    radius : float
        mm, ``>= 0``.
    mirror : {'none', 'add', 'union'}
        ``add`` also returns ``<name>Mirror`` at ``(-x, y, z)``; ``union``
        returns one bilateral region holding both spheres.
    what : str
        ``'seed'`` or ``'ROI'``, for error messages.

    Returns
    -------
    list of Region
    """
    name = _check_name(name, what)
    mode = _mirror_mode(mirror, f"{what} {name}")
    if not (math.isfinite(float(radius)) and float(radius) >= 0):
        raise InputError(f"{what} {name}: radius {radius} mm must be a number >= 0")
    center = tuple(float(v) for v in center)
    mirrored = mirror_coord(center)
    if mode == "union":
        return [Region(name, (center, mirrored), float(radius))]
    regions = [Region(name, (center,), float(radius))]
    if mode == "add":
        regions.append(Region(f"{name}Mirror", (mirrored,), float(radius)))
    return regions


def image_region(path: str | os.PathLike, *, label: int | None = None, name: str | None = None, what: str = "seed") -> Region:
    """A region from a mask image (voxels > 0) or one label of an atlas image.

    The name defaults to the file stem (letters and digits kept) plus
    ``label<N>``.
    """
    path = Path(path)
    if name is None:
        stem = re.sub(r"[^A-Za-z0-9]", "", Path(split_ext(path.name)[0]).name) or "mask"
        name = stem + (f"label{label}" if label is not None else "")
    return Region(_check_name(name, what), image=path, label=None if label is None else int(label))


def read_regions(path: str | os.PathLike, *, what: str = "seed") -> list[Region]:
    """Read regions from a TSV.

    Columns: ``name`` and either ``x``, ``y``, ``z``, ``radius`` (mm) with an
    optional ``mirror`` (none/add/union, or no/yes/bilateral), or ``image``
    (a path, relative to the TSV's folder) with an optional ``label``.

    Returns
    -------
    list of Region
        In row order, mirrored regions right after their source.
    """
    path = Path(path)
    table = read_tsv(path, what=f"{what} table")
    if "name" not in table.columns:
        raise InputError(f"{what} table {path} has no 'name' column (columns: {list(table.columns)})")
    has_sphere = {"x", "y", "z", "radius"} <= set(table.columns)
    if not has_sphere and "image" not in table.columns:
        raise InputError(f"{what} table {path} needs columns x, y, z, radius (spheres) or image (masks)")
    regions: list[Region] = []
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        where = f"{what} table {path} line {row_number}"
        image = row.get("image")
        if isinstance(image, str) and image.strip():
            image_path = Path(image.strip())
            label = row.get("label")
            has_label = label is not None and not (isinstance(label, float) and math.isnan(label))
            regions.append(image_region(image_path if image_path.is_absolute() else path.parent / image_path,
                                        label=int(label) if has_label else None, name=str(row["name"]), what=what))
            continue
        try:
            center = tuple(float(row[k]) for k in ("x", "y", "z"))
            radius = float(row["radius"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: x, y, z and radius must be numbers (got {row})") from None
        if not all(math.isfinite(v) for v in (*center, radius)):
            raise InputError(f"{where}: x, y, z and radius must be numbers (got {row})")
        regions.extend(sphere_regions(str(row["name"]), center, radius, mirror=row.get("mirror", "none"), what=what))
    return _check_unique(regions, what)


def _check_unique(regions: list[Region], what: str) -> list[Region]:
    names = [r.name for r in regions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{what} names must be unique; repeated: {', '.join(duplicates)}")
    if not regions:
        raise InputError(f"no {what} given; use --{what.lower()}-coord, --{what.lower()}-table or --{what.lower()}-mask")
    return regions


def regions_from_options(
    *,
    coords: Sequence[str] = (),
    radii: Sequence[float] = (),
    names: Sequence[str] = (),
    mirror: str = "none",
    table: str | os.PathLike | None = None,
    masks: Sequence[str | os.PathLike] = (),
    labels: Sequence[str] = (),
    what: str = "seed",
) -> list[Region]:
    """Build regions from command-line options (shared by ``gpuconn seed`` and ``gpuconn roi``).

    Parameters
    ----------
    coords : sequence of str
        ``'x,y,z'`` per sphere (``--<what>-coord``, repeatable).
    radii : sequence of float
        One radius for all spheres, or one per coordinate (``--radius``).
    names : sequence of str
        One name per coordinate (``--name``); default ``<what>1``, ``<what>2``...
    mirror : {'none', 'add', 'union'}
        Applied to every coordinate sphere.
    table : path, optional
        A TSV read by :func:`read_regions`.
    masks : sequence of path
        Mask images (``--<what>-mask``), one region each.
    labels : sequence of str
        ``'atlas.nii.gz:LABEL'`` (``--<what>-label``), one region each.
    what : {'seed', 'roi'}

    Returns
    -------
    list of Region
        Coordinates first, then the table, masks and labels; names unique.
    """
    flag = f"--{what.lower()}"
    if coords and not radii:
        raise InputError(f"{flag}-coord needs --radius (mm), e.g. --radius 6")
    if len(radii) not in (0, 1, len(coords)):
        raise InputError(f"--radius was given {len(radii)} times for {len(coords)} {flag}-coord; give it once or once per coordinate")
    if names and len(names) != len(coords):
        raise InputError(f"--name was given {len(names)} times for {len(coords)} {flag}-coord; give one name per coordinate")
    regions: list[Region] = []
    for index, text in enumerate(coords):
        radius = radii[0] if len(radii) == 1 else radii[index]
        name = names[index] if names else f"{what.lower()}{index + 1}"
        regions.extend(sphere_regions(name, parse_coord(text, option=f"{flag}-coord"), radius, mirror=mirror, what=what))
    if table is not None:
        regions.extend(read_regions(table, what=what))
    regions.extend(image_region(path, what=what) for path in masks)
    for text in labels:
        path, _, label = str(text).rpartition(":")
        if not path or not label.strip().lstrip("-").isdigit():
            raise InputError(f"{flag}-label {text!r} must be ATLAS:LABEL, e.g. {flag}-label atlas.nii.gz:7")
        regions.append(image_region(path, label=int(label), what=what))
    return _check_unique(regions, what)


def region_masks(
    regions: Sequence[Region],
    reference: nib.Nifti1Image,
    *,
    mask: np.ndarray | None = None,
    reference_path: str | os.PathLike = "image",
    mask_path: str | os.PathLike | None = None,
    what: str = "seed",
) -> np.ndarray:
    """Place regions on a grid (restricted to a brain mask).

    Parameters
    ----------
    regions : sequence of Region
    reference : nibabel image
        Defines the grid (shape and affine).
    mask : ndarray of bool, shape (x, y, z), optional
        Voxels regions may use.
    reference_path, mask_path : path-like
        Named in errors.
    what : str
        ``'seed'`` or ``'ROI'``, for errors.

    Returns
    -------
    ndarray of bool, shape (n_regions, x, y, z)

    Raises
    ------
    InputError
        A region with no voxel (in the mask), naming it; an image region on
        another grid.
    """
    shape = tuple(reference.shape[:3])
    affine = np.asarray(reference.affine, dtype=np.float64)
    ijk = _allowed_voxels(shape, mask)
    world = _world(ijk, affine)
    out = np.zeros((len(regions),) + shape, dtype=bool)
    for index, region in enumerate(regions):
        if region.image is not None:
            img = load_image(region.image, ndim=3, what=f"{what} {region.name} image")
            check_same_grid(reference, reference_path, img, region.image)
            data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float64))
            voxels = data > 0 if region.label is None else data == region.label
            out[index] = voxels if mask is None else voxels & mask
        else:
            rows = np.zeros(len(ijk), dtype=bool)
            for center in region.centers:
                rows |= _sphere_rows(np.asarray(center, dtype=np.float64), region.radius, affine, ijk, world)
            out[index][tuple(ijk[rows].T)] = True
        if not out[index].any():
            inside = f" inside the brain mask {mask_path}" if mask is not None else f" on the grid of {reference_path}"
            definition = (
                f"image {region.image}" + (f" label {region.label}" if region.label is not None else "")
                if region.image is not None
                else f"sphere(s) at {[list(c) for c in region.centers]} mm, radius {region.radius} mm"
            )
            raise InputError(
                f"{what} '{region.name}' ({definition}) has no voxel{inside}; check that the coordinates are "
                "world (MNI) mm on this image's space, or use a larger radius"
            )
    return out


def region_weights(masks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Averaging weights of regions over the in-mask voxels.

    Parameters
    ----------
    masks : ndarray of bool, shape (n_regions, x, y, z)
        Each region non-empty and inside ``mask``.
    mask : ndarray of bool, shape (x, y, z)

    Returns
    -------
    ndarray of float32, shape (n_regions, n_voxels)
        Row ``i`` is ``1 / n_i`` on region ``i``'s voxels, so ``weights @ data.T``
        is the mean time series.
    """
    rows = masks[:, mask].astype(np.float64)
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- seed maps


def region_means(data: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of each region per volume: ``weights @ data.T``.

    Parameters
    ----------
    data : torch.Tensor, shape (..., n_volumes, n_voxels)
    weights : torch.Tensor, shape (n_regions, n_voxels)
        From :func:`region_weights`.

    Returns
    -------
    torch.Tensor, shape (..., n_regions, n_volumes)
    """
    return torch.matmul(weights.to(data.dtype), data.transpose(-1, -2))


def fisher_z(r: torch.Tensor) -> torch.Tensor:
    """``arctanh(r)`` computed in float64 after clipping ``|r|`` to :data:`FISHER_CLIP`; same dtype as ``r``."""
    return torch.atanh(r.to(torch.float64).clamp(-FISHER_CLIP, FISHER_CLIP)).to(r.dtype)


class _Columns(NamedTuple):
    mean: torch.Tensor  # (..., 1, n)
    centred: torch.Tensor  # (..., T, n)
    norm: torch.Tensor  # (..., 1, n)
    inverse: torch.Tensor  # (..., 1, n): 1 / norm, or 0 for constant columns
    constant: torch.Tensor  # (..., 1, n) bool


def _centre(x: torch.Tensor) -> _Columns:
    """Centre columns over volumes; their norms and inverse norms.

    A column is constant when its centred values are within a few float32
    rounding steps of its mean (``norm <= 4 sqrt(n_volumes) eps |mean|``);
    its inverse norm is 0. The mean is a float32 cascade sum: an error
    ``d`` in it shifts a centred column by a constant, which changes r by
    ``d * sum(centred seed) ~ 0``, so float64 would buy nothing here.
    """
    mean = x.mean(dim=-2, keepdim=True)
    centred = x - mean
    norm = torch.linalg.vector_norm(centred, dim=-2, keepdim=True)
    constant = norm <= 4 * math.sqrt(x.shape[-2]) * torch.finfo(x.dtype).eps * mean.abs()
    inverse = torch.where(constant, torch.zeros_like(norm), 1.0 / torch.where(constant, torch.ones_like(norm), norm))
    return _Columns(mean, centred, norm, inverse, constant)


def correlate_seeds(data: torch.Tensor, weights: torch.Tensor, *, source: str = "data") -> SeedMaps:
    """Pearson correlation of mean seed time series with every voxel, batched.

    Parameters
    ----------
    data : torch.Tensor, shape (..., n_volumes, n_voxels)
        Time series inside the mask (float32); leading dimensions (subjects)
        are batched.
    weights : torch.Tensor, shape (n_seeds, n_voxels)
        Seed averaging weights (:func:`region_weights`), same device.
    source : str
        Named in warnings (a file or subject label).

    Returns
    -------
    SeedMaps
        ``r`` clipped to [-1, 1]; ``z = arctanh(r)`` (:func:`fisher_z`);
        ``beta = r * |x_c| / |s_c|``, the least-squares slope of voxel on seed
        (with intercept). Constant voxels and constant seeds get r = z =
        beta = 0 with a warning, never NaN.

    Notes
    -----
    Centring and normalisation happen once per voxel and seed; all maps come
    from one product ``(n_seeds, n_volumes) @ (n_volumes, n_voxels)`` per
    subject. Same values as ``numpy.corrcoef`` of the seed mean with each voxel.

    See Also
    --------
    nilearn.maskers.NiftiSpheresMasker, numpy.corrcoef : the references in the tests.
    """
    if data.shape[-2] < 3:
        raise InputError(f"{source} has {data.shape[-2]} volume(s); seed correlation needs at least 3")
    voxels = _centre(data)
    # Seed means of the centred data keep float32 sums away from the large baseline.
    seed_centred = region_means(voxels.centred, weights)  # (..., S, T)
    timeseries = seed_centred + region_means(voxels.mean, weights)
    seeds = _centre(seed_centred.transpose(-1, -2))  # (..., T, S)
    if bool(voxels.constant.any()):
        count = int(voxels.constant.sum())
        warnings.warn(
            f"{source}: {count} voxel(s) have a constant time series; their r, z and beta are set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    if bool(seeds.constant.any()):
        warnings.warn(
            f"{source}: {int(seeds.constant.sum())} seed time series are constant; their maps are set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    # Scale the small factors, not the (n_volumes, n_voxels) data: one pass less over it.
    seed_unit = (seeds.centred * seeds.inverse).transpose(-1, -2)  # (..., S, T)
    r = (torch.matmul(seed_unit, voxels.centred) * voxels.inverse).clamp_(-1.0, 1.0)  # (..., S, V)
    beta = r * voxels.norm * seeds.inverse.transpose(-1, -2)
    return SeedMaps(r=r, z=fisher_z(r), beta=beta, timeseries=timeseries)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class PreparedInput:
    """A validated run with its regions placed (see :func:`prepare_inputs`).

    Attributes
    ----------
    source : BoldInput
    mask : ndarray of bool, shape (x, y, z)
        The run's brain mask.
    weights : ndarray of float32, shape (n_regions, n_voxels)
        Region averaging weights over the mask's voxels (:func:`region_weights`).
    """

    source: BoldInput
    mask: np.ndarray
    weights: np.ndarray


def prepare_inputs(
    inputs: Sequence[BoldInput], regions: Sequence[Region], *, what: str
) -> tuple[list[PreparedInput], nib.Nifti1Image]:
    """Validate every input and place the regions on each run's mask, reading headers only (before any output).

    Parameters
    ----------
    inputs : sequence of BoldInput
    regions : sequence of Region
    what : {'seed', 'ROI'}
        For error messages.

    Returns
    -------
    prepared : list of PreparedInput
        In input order; runs sharing a mask file share its weights.
    reference : nibabel.Nifti1Image
        The first run's header (all runs are checked to be on its grid).

    Raises
    ------
    InputError
        No input, repeated labels, a missing/unreadable/non-4D BOLD or one
        with fewer than 3 volumes, grids that differ, a bad mask, or a region
        with no voxel in a mask.
    """
    if not inputs:
        raise InputError("no BOLD input given; use --bold or --derivatives")
    labels = [item.label for item in inputs]
    repeated = sorted({lab for lab in labels if labels.count(lab) > 1})
    if repeated:
        raise InputError(f"two inputs share the output label(s) {', '.join(repeated)}; give each run its own file name")
    prepared: list[PreparedInput] = []
    masks: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    first_img, first_path = None, None
    for item in inputs:
        header = load_header(item.bold, ndim=4, what="BOLD")
        if header.shape[3] < 3:
            raise InputError(f"BOLD {item.bold} has shape {header.shape}; expected a 4D series with at least 3 volumes")
        if first_img is None:
            first_img, first_path = header, item.bold
        check_same_grid(first_img, first_path, header, item.bold)
        if item.mask not in masks:
            mask, _ = load_mask(item.mask, reference=header, reference_path=item.bold, what="brain mask")
            found = region_masks(regions, header, mask=mask, reference_path=item.bold, mask_path=item.mask, what=what)
            masks[item.mask] = (mask, region_weights(found, mask))
        mask, weights = masks[item.mask]
        prepared.append(PreparedInput(item, mask, weights))
    return prepared, first_img


def _load_series(item: PreparedInput) -> np.ndarray:
    img = load_image(item.source.bold, ndim=4, what="BOLD")
    return masked_data(img, item.mask, path=item.source.bold)


def stream_inputs(prepared: Sequence[PreparedInput]) -> Iterator[tuple[PreparedInput, np.ndarray]]:
    """Yield each run with its ``(n_volumes, n_voxels)`` float32 data, reading the next one in a thread meanwhile.

    Raises
    ------
    InputError
        A BOLD file that does not decode or has NaN/Inf inside its mask
        (found on reading, after the runs before it were yielded).
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_series, prepared[0]) if prepared else None
        for index, item in enumerate(prepared):
            data = pending.result()
            pending = pool.submit(_load_series, prepared[index + 1]) if index + 1 < len(prepared) else None
            yield item, data


def _run_label(path: Path) -> str:
    """Output prefix of a BOLD file: its name up to ``_space-`` (or without extension and ``_bold``)."""
    stem = Path(split_ext(path.name)[0]).name
    return stem.split("_space-")[0].removesuffix("_bold")


def bold_inputs(
    *,
    bold: Sequence[str | os.PathLike] = (),
    mask: str | os.PathLike | None = None,
    derivatives: str | os.PathLike | None = None,
    participant_label: Sequence[str] | None = None,
    desc: str = "preproc",
    space: str = DEFAULT_SPACE,
) -> list[BoldInput]:
    """The runs to analyse, from BOLD files or a derivatives folder.

    Parameters
    ----------
    bold : sequence of path
        4D files (``--bold``); they need ``mask``.
    mask : path, optional
        Brain mask for every run; with ``derivatives`` it replaces each run's
        own ``*_desc-brain_mask`` (required where a run has none).
    derivatives : path, optional
        A fMRIPrep-style folder searched with :func:`gpuconn.bids.find_runs`.
    participant_label : sequence of str, optional
    desc : str, default 'preproc'
        ``desc-`` entity of the BOLD files there (e.g. ``denoised``).
    space : str
        ``space-`` entity.

    Returns
    -------
    list of BoldInput
        Labelled by the file name up to ``_space-`` (e.g.
        ``sub-01_ses-pre_task-rest``).
    """
    if bool(bold) == (derivatives is not None):
        raise InputError("give either --bold files (with --mask) or --derivatives, not both or neither")
    if derivatives is None:
        if mask is None:
            raise InputError("--bold needs --mask (a brain mask on the BOLD grid)")
        return [BoldInput(_run_label(Path(path)), Path(path), Path(mask)) for path in bold]
    inputs = []
    for run in find_runs(derivatives, participant_label=participant_label, space=space, desc=desc):
        run_mask = Path(mask) if mask is not None else run.mask
        if run_mask is None:
            raise InputError(f"no brain mask (*_desc-brain_mask.nii.gz) beside {run.bold}; give one with --mask")
        inputs.append(BoldInput(run.prefix, run.bold, run_mask))
    return inputs


def _volume_label(item: BoldInput, map_name: str) -> dict:
    return {**item.entities, "label": item.label, "map": map_name}


def compute_seed_maps(
    inputs: Sequence[BoldInput],
    regions: Sequence[Region],
    out_dir: str | os.PathLike,
    *,
    layout: str = "subject",
    stats: Sequence[str] = ("r", "z"),
    device: str | torch.device = "auto",
    progress: bool = False,
    params: dict | None = None,
) -> list[Path]:
    """Seed-to-voxel maps for every run and seed, written as 4D NIfTI with JSON sidecars.

    Parameters
    ----------
    inputs : sequence of BoldInput
        Runs (4D BOLD on one grid) and their brain masks.
    regions : sequence of Region
        The seeds.
    out_dir : path-like
    layout : {'subject', 'seed'}
        ``subject``: ``<label>_stat-<stat>_seedmap.nii.gz`` per run, a volume
        per seed. ``seed``: ``seed-<name>_stat-<stat>_seedmap.nii.gz`` per seed,
        a volume per run in input order (the sidecar lists them), ready for
        ``gpuconn randomise``; holds ``n_runs * n_seeds * n_voxels`` float32
        per statistic in host memory until written.
    stats : sequence of {'r', 'z', 'beta'}
    device : str or torch.device
    progress : bool
        Show a Rich progress bar.
    params : dict, optional
        Extra parameters recorded in sidecars (e.g. the command line).

    Returns
    -------
    list of Path
        The NIfTI outputs, plus ``<label>_seeds_timeseries.tsv`` per run.

    Notes
    -----
    All headers, masks and seeds are checked before anything is written.
    Subjects are read one at a time (the next one in a background thread
    while the current one is on the device). In the subject layout each
    run's files are written as soon as it is done; a data error found on
    reading (NaN inside the mask) stops the run after the runs before it.
    Voxels outside a run's mask are 0.
    """
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    bad = [s for s in stats if s not in STATS]
    if bad or not stats:
        raise InputError(f"statistics {bad or '(none)'} not available; choose from {', '.join(STATS)}")
    stats = list(dict.fromkeys(stats))
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    prepared, reference = prepare_inputs(inputs, regions, what="seed")
    names = [region.name for region in regions]
    record = {**(params or {}), "seeds": [region.describe() for region in regions], "layout": layout, "device": str(torch_device)}
    stacks: dict[str, np.ndarray] = {}
    if layout == "seed":  # every run's maps, on the union of the run masks, until written per seed
        union = np.any([p.mask for p in prepared], axis=0)
        stacks = {stat: np.zeros((len(prepared), len(regions), int(union.sum())), dtype=np.float32) for stat in stats}
    written: list[Path] = []
    with progress_bar("seed maps", len(prepared), enabled=progress) as advance:
        for index, (item, data) in enumerate(stream_inputs(prepared)):
            maps = correlate_seeds(as_data(data, torch_device), as_data(item.weights, torch_device), source=str(item.source.bold))
            series = pd.DataFrame(to_numpy(maps.timeseries).T, columns=names)
            written.append(write_tsv(series, out_dir / f"{item.source.label}_seeds_timeseries.tsv"))
            for stat in stats:
                values = to_numpy(getattr(maps, stat))  # (S, V_run)
                if layout == "seed":
                    stacks[stat][index] = unmask(values, item.mask)[union].T
                    continue
                path = out_dir / f"{item.source.label}_stat-{stat}_seedmap.nii.gz"
                volumes = [_volume_label(item.source, f"seed-{name}_stat-{stat}") for name in names]
                written.append(
                    save_image(unmask(values, item.mask).astype(np.float32, copy=False), reference, path,
                               params={**record, "stat": stat, "bold": str(item.source.bold),
                                       "mask": str(item.source.mask), "volumes": volumes})
                )
            advance()
    for stat, stack in stacks.items():
        for seed_index, name in enumerate(names):
            path = out_dir / f"seed-{name}_stat-{stat}_seedmap.nii.gz"
            volumes = [_volume_label(p.source, f"seed-{name}_stat-{stat}") for p in prepared]
            written.append(
                save_image(unmask(stack[:, seed_index], union), reference, path,
                           params={**record, "stat": stat, "seed": regions[seed_index].describe(),
                                   "bolds": [str(p.source.bold) for p in prepared], "volumes": volumes})
            )
    return written
