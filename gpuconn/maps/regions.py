"""Seed and ROI regions: spheres at MNI coordinates, masks and atlas labels.

A seed (or ROI) is a :class:`Region`: one or more spheres at world (MNI mm)
coordinates with a radius, or the non-zero voxels / one label of an image.
An atlas (an image of whole-number labels) given as a mask is one region
per label (:func:`atlas_regions`), never one region for all its labels.
:func:`region_masks` places regions on any image grid through its affine;
:func:`region_weights` and :func:`region_means` average a series over them.
:func:`regions_from_options` builds the regions a :class:`~gpuconn.maps.options.RegionOptions`
specifies (``gpuconn seed`` and ``gpuconn roi``).

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

import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..core import afni
from ..core.atlas import read_atlas_labels, sibling_label_table
from ..core.errors import InputError, OptionError
from ..core.io import check_same_grid, load_image, read_tsv, split_ext
from .options import RegionOptions

__all__ = [
    "Region",
    "MIRROR_CHOICES",
    "mirror_coord",
    "sphere_mask",
    "sphere_regions",
    "image_region",
    "atlas_label",
    "atlas_values",
    "atlas_regions",
    "read_regions",
    "regions_from_options",
    "region_masks",
    "region_weights",
    "region_means",
]


#: ``mirror`` values: none, ``add`` (a second seed at -x) or ``union`` (one bilateral seed).
MIRROR_CHOICES = ("none", "add", "union")



_NAME = re.compile(r"^[A-Za-z0-9]+$")



_MIRROR_WORDS = {
    "": "none", "none": "none", "no": "none", "false": "none", "0": "none",
    "add": "add", "yes": "add", "true": "add", "1": "add",
    "union": "union", "bilateral": "union",
}  # fmt: skip



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
    label_name : str or None
        The atlas's own name for ``label`` (from its label table), as spelled there.
    """

    name: str
    centers: tuple[tuple[float, float, float], ...] = ()
    radius: float | None = None
    image: Path | None = None
    label: int | None = None
    label_name: str | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (not self.centers) or (self.centers and self.radius is None):
            raise ValueError(f"region {self.name!r} needs either centers and a radius, or an image")

    def describe(self) -> dict:
        """A JSON-ready definition for sidecars."""
        if self.image is not None:
            described = {"name": self.name, "image": str(self.image), "label": self.label}
            return described | ({"label_name": self.label_name} if self.label_name is not None else {})
        return {"name": self.name, "centers_mm": [list(c) for c in self.centers], "radius_mm": self.radius}



def mirror_coord(center: Sequence[float]) -> tuple[float, float, float]:
    """Reflect a world coordinate across the midline: ``(x, y, z) -> (-x, y, z)``."""
    x, y, z = (float(v) for v in center)
    return (-x if x != 0 else 0.0, y, z)



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



def image_region(
    path: str | os.PathLike,
    *,
    label: int | None = None,
    name: str | None = None,
    label_name: str | None = None,
    what: str = "seed",
) -> Region:
    """A region from a mask image (voxels > 0) or one label of an atlas image.

    Parameters
    ----------
    path : path-like
        The image (read when the region is placed: :func:`region_masks`).
    label : int, optional
        The atlas label to take; default: every voxel > 0.
    name : str, optional
        Letters and digits; default the file stem (letters and digits kept)
        plus ``label<N>``.
    label_name : str, optional
        The atlas's own spelling of ``label`` (:func:`atlas_label`).
    what : str
        ``'seed'`` or ``'ROI'``, for error messages.

    Returns
    -------
    Region
    """
    path = Path(path)
    if name is None:
        name = _stem(path, "mask") + (f"label{label}" if label is not None else "")
    return Region(_check_name(name, what), image=path, label=None if label is None else int(label), label_name=label_name)



def _stem(path: str | os.PathLike, default: str) -> str:
    """A file's stem with only letters and digits kept (region names become parts of file names)."""
    return re.sub(r"[^A-Za-z0-9]", "", Path(split_ext(Path(path).name)[0]).name) or default


def atlas_values(data: np.ndarray) -> np.ndarray:
    """The labels of an atlas image: its distinct values > 0 when they are whole numbers and more than one; else empty.

    A binary mask (one value) or a probability map (fractions) is not an
    atlas: it is one region, its voxels > 0.
    """
    data = np.asarray(data)
    values = np.unique(data[np.isfinite(data) & (data > 0)])
    if len(values) > 1 and np.array_equal(values, np.round(values)):
        return values.astype(np.int64)
    return np.empty(0, dtype=np.int64)


def atlas_regions(
    path: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    what: str = "seed",
) -> list[Region]:
    """Regions from a mask image: one per label of an atlas, else one region (voxels > 0).

    Parameters
    ----------
    path : path-like
        A 3D image (``--<what>-mask``). Whole-number values with more than
        one distinct value > 0 make it an atlas (:func:`atlas_values`).
    labels : path-like, optional
        The atlas's label table (:func:`gpuconn.core.atlas.read_atlas_labels`);
        default: the BIDS table beside the image (``x_dseg.nii.gz`` ->
        ``x_dseg.tsv``) when there is one.
    what : {'seed', 'roi'}

    Returns
    -------
    list of Region
        For an atlas, one region per label in increasing label order, named
        after the table's name with only letters and digits kept (its
        spelling in :attr:`Region.label_name`), else ``<stem>label<N>``; a
        label missing from the table is named so with a warning. For a mask,
        one region named after the file stem.
    """
    path = Path(path)
    values = atlas_values(load_image(path, ndim=3, what=f"{what} mask").dataobj)
    if not len(values):
        return [image_region(path, what=what)]
    table_path = labels if labels is not None else sibling_label_table(path)
    names = read_atlas_labels(table_path) if table_path is not None else {}
    stem = _stem(path, "atlas")
    unnamed = [int(v) for v in values if int(v) not in names]
    if names and unnamed:
        warnings.warn(f"atlas {path}: label(s) {', '.join(map(str, unnamed[:10]))} are not in its label table "
                      f"{table_path}; named {stem}label<N>", UserWarning, stacklevel=2)
    regions = []
    for value in (int(v) for v in values):
        spelled = names.get(value)
        name = (re.sub(r"[^A-Za-z0-9]", "", spelled) if spelled else "") or f"{stem}label{value}"
        regions.append(Region(_check_name(name, what), image=path, label=value, label_name=spelled))
    return regions


def read_regions(path: str | os.PathLike, *, what: str = "seed") -> list[Region]:
    """Read regions from a TSV.

    Columns: ``name`` and either ``x``, ``y``, ``z``, ``radius`` (mm) with an
    optional ``mirror`` (none/add/union, or no/yes/bilateral), or ``image``
    (a path, relative to the TSV's folder) with an optional ``label`` (a
    number, or a name from an AFNI atlas's label table).

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
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            if has_label and isinstance(label, str) and not label.strip().lstrip("-").isdigit():
                label = atlas_label(image_path, label.strip(), where=where)[0]  # a name in an AFNI atlas
            regions.append(image_region(image_path, label=int(label) if has_label else None, name=str(row["name"]),
                                        what=what))
            continue
        try:
            center = tuple(float(row[k]) for k in ("x", "y", "z"))
            radius = float(row["radius"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: x, y, z and radius must be numbers (got {row})") from None
        if not all(math.isfinite(v) for v in (*center, radius)):
            raise InputError(f"{where}: x, y, z and radius must be numbers (got {row})")
        regions.extend(sphere_regions(str(row["name"]), center, radius, mirror=row.get("mirror", "none"), what=what))
    if not regions:
        raise InputError(f"{what} table {path} has no rows; add one per {what}")
    return _check_unique(regions, what)



def _check_unique(regions: list[Region], what: str) -> list[Region]:
    names = [r.name for r in regions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{what} names must be unique; repeated: {', '.join(duplicates)}")
    return regions



def atlas_label(
    path: str | os.PathLike,
    name: str,
    *,
    labels: str | os.PathLike | None = None,
    where: str,
) -> tuple[int, str]:
    """The value and spelling of a label named in an atlas's label table.

    Parameters
    ----------
    path : path-like
        The atlas image.
    name : str
        The label's name: the table's spelling, else its one
        case-insensitive match.
    labels : path-like, optional
        The label table (:func:`gpuconn.core.atlas.read_atlas_labels`);
        default an AFNI atlas's ``.HEAD`` table
        (:func:`gpuconn.core.afni.label_table`), else the BIDS table beside
        the image (:func:`gpuconn.core.atlas.sibling_label_table`).
    where : str
        What asked for the label (a flag and its value, a table line, a
        study file key), put first in errors.

    Returns
    -------
    value : int
    spelling : str
        As the table spells it.

    Raises
    ------
    OptionError
        The atlas has no label table (naming ``{atlas_labels}``, which
        gives one).
    InputError
        The table has no such label (listing its labels).
    """
    path = str(path)
    if labels is None and not afni.is_dataset(path):
        labels = sibling_label_table(path)
    if labels is not None:
        table = {spelled: value for value, spelled in read_atlas_labels(labels).items()}
    else:
        table = afni.label_table(path) if afni.is_dataset(path) else {}
    if not table:
        raise OptionError(f"{where}: {path} has no label table to find {name!r} in; give one with {{atlas_labels}} "
                          "(index and name columns; or an AFNI .HEAD with VALUE_LABEL_DTABLE or ATLAS_LABEL_TABLE), "
                          "or give the label's number")
    if name in table:
        return table[name], name
    folded = [key for key in table if key.lower() == name.lower()]
    if len(folded) == 1:
        return table[folded[0]], folded[0]
    listed = ", ".join(list(table)[:12]) + (", ..." if len(table) > 12 else "")
    raise InputError(f"{where}: atlas {path} has no label {name!r}; its labels are {listed} (or give a number)")


def regions_from_options(options: RegionOptions) -> list[Region]:
    """The seeds or ROIs of ``gpuconn seed`` and ``gpuconn roi`` (their options, checked by :class:`RegionOptions`).

    Parameters
    ----------
    options : RegionOptions
        Coordinate spheres (each with its radius, name and mirroring), a
        table read by :func:`read_regions`, mask images (one region each, or
        one per label of an atlas: :func:`atlas_regions`) and atlas labels
        (``'atlas.nii.gz:LABEL'``: the voxel value, or a name from the
        atlas's label table: ``options.atlas_labels``, an AFNI atlas's
        ``.HEAD`` table (:func:`gpuconn.core.afni.label_table`), or the BIDS
        table beside the image; the region is then named after the file stem
        and the label).

    Returns
    -------
    list of Region
        Coordinates first, then the table, masks and labels; names unique.
    """
    what = options.what
    regions: list[Region] = []
    for name, center, radius in zip(options.sphere_names, options.coords, options.sphere_radii):
        regions.extend(sphere_regions(name, center, radius, mirror=options.mirror_mode, what=what))
    if options.table is not None:
        regions.extend(read_regions(options.table, what=what))
    for path in options.masks:
        regions.extend(atlas_regions(path, labels=options.atlas_labels, what=what))
    for text in options.labels:
        path, _, label = text.rpartition(":")
        if label.strip().lstrip("-").isdigit():
            regions.append(image_region(path, label=int(label), what=what))
            continue
        number, name = atlas_label(path, label.strip(), labels=options.atlas_labels, where=f"--{what}-label {text}")
        regions.append(image_region(path, label=number, name=_stem(path, "atlas") + re.sub(r"[^A-Za-z0-9]", "", name),
                                    label_name=name, what=what))
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
    images: dict[Path, np.ndarray] = {}  # an atlas is read once for all its labels
    for index, region in enumerate(regions):
        if region.image is not None:
            if region.image not in images:
                img = load_image(region.image, ndim=3, what=f"{what} {region.name} image")
                check_same_grid(reference, reference_path, img, region.image)
                images[region.image] = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float64))
            data = images[region.image]
            if region.label is None and len(found := atlas_values(data)) > 1:  # never collapse an atlas into one region
                raise InputError(
                    f"{what} '{region.name}': image {region.image} holds {len(found)} labels (an atlas); give one "
                    f"label (ATLAS:LABEL, or a label column in the table), or pass it with --{what.lower()}-mask for "
                    f"one {what} per label"
                )
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
