"""Resampling onto a standard grid with FSL registrations: FLIRT matrices and FNIRT/convertwarp fields.

Coordinate systems (as FSL and fslpy define them):

* **voxel**: array indices ``(i, j, k)``.
* **FSL coordinates** (FLIRT's "scaled voxels"): voxel indices times the
  header's voxel sizes, with x mirrored, ``x = (n_x - 1 - i) d_x``, when the
  image's voxel-to-world affine has a positive determinant (neurological
  storage). :func:`fsl_coordinates_matrix` builds this map.

A FLIRT matrix ``M`` (``example_func2standard.mat``) takes source FSL
coordinates to reference FSL coordinates, so a reference voxel ``v`` samples
the source at voxel ``S_src^-1 M^-1 S_ref v`` (:func:`flirt_source_voxels`).

A displacement field (``example_func2standard_warp``, written by
``convertwarp``; FSL intent code 2006) lies on the reference grid; a
*relative* field holds ``d(v)`` with source FSL coordinate
``S_ref v + d(v)``, an *absolute* one holds the source FSL coordinate
itself (:func:`warp_source_voxels`). FEAT's field includes the
``example_func2highres`` premat, so it is applied alone, as
``applywarp --ref=standard --in=... --warp=example_func2standard_warp``
does.

Values are interpolated trilinearly by :func:`resample_volumes`, batched
over volumes with ``torch.nn.functional.grid_sample`` on the device; a
point outside the source's voxel box ``[0, n - 1]`` on any axis gives 0, as
FSL's zero padding does.

See Also
--------
fsl.transform.flirt.fromFlirt, fsl.transform.nonlinear.DeformationField :
    fslpy's implementations of the same conventions (the tests' reference).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .backend import resolve_device
from .errors import InputError

__all__ = [
    "FSL_DISPLACEMENT_FIELD",
    "fsl_coordinates_matrix",
    "read_flirt_matrix",
    "flirt_source_voxels",
    "read_warp",
    "warp_source_voxels",
    "resample_volumes",
    "resample_mask",
]

#: NIfTI intent code of an FSL displacement field (fnirt --fout, convertwarp).
FSL_DISPLACEMENT_FIELD = 2006
_COEFFICIENT_CODES = {2007: "cubic spline", 2008: "DCT", 2009: "quadratic spline"}
_EDGE_TOL = 1e-4  # voxels: points this close outside the box still count as on its edge


def fsl_coordinates_matrix(shape: Sequence[int], affine: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
    """Voxel -> FSL coordinates (scaled voxels, x mirrored for a positive-determinant affine).

    Parameters
    ----------
    shape : sequence of int
        Spatial shape ``(n_x, n_y, n_z)`` (more entries are ignored).
    affine : ndarray, shape (4, 4)
        Voxel-to-world (sform/qform) of the image.
    zooms : sequence of float
        Voxel sizes in mm from the header (pixdim 1-3).

    Returns
    -------
    ndarray, shape (4, 4)
    """
    dx, dy, dz = (abs(float(z)) for z in zooms[:3])
    out = np.diag([dx, dy, dz, 1.0])
    if np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]) > 0:
        out[0, 0], out[0, 3] = -dx, (int(shape[0]) - 1) * dx
    return out


def _fsl_matrix(img: nib.Nifti1Image) -> np.ndarray:
    return fsl_coordinates_matrix(img.shape[:3], img.affine, img.header.get_zooms()[:3])


def read_flirt_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read a FLIRT ``.mat`` (4 rows of 4 numbers).

    Returns
    -------
    ndarray, shape (4, 4)

    Raises
    ------
    InputError
        Missing file, not 4x4, non-numeric, a last row other than
        ``0 0 0 1``, or a singular matrix.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"FLIRT matrix file not found: {path}")
    try:
        matrix = np.loadtxt(path, dtype=float, ndmin=2)
    except ValueError as exc:
        raise InputError(f"FLIRT matrix {path} is not numeric ({exc}); expected 4 rows of 4 numbers") from exc
    if matrix.shape != (4, 4):
        raise InputError(f"FLIRT matrix {path} has shape {matrix.shape}; expected 4 rows of 4 numbers")
    if not np.allclose(matrix[3], [0, 0, 0, 1]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise InputError(f"FLIRT matrix {path} is not an invertible affine (last row must be 0 0 0 1)")
    return matrix


def flirt_source_voxels(matrix: np.ndarray, source: nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """Reference voxel -> source voxel for a FLIRT matrix from ``source`` to ``reference``.

    Parameters
    ----------
    matrix : ndarray, shape (4, 4)
        FLIRT matrix (source FSL coordinates -> reference FSL coordinates).
    source, reference : nibabel.Nifti1Image
        Only their shapes, affines and voxel sizes are used.

    Returns
    -------
    ndarray, shape (4, 4)
        ``S_src^-1 M^-1 S_ref``.
    """
    return np.linalg.inv(_fsl_matrix(source)) @ np.linalg.inv(np.asarray(matrix, dtype=float)) @ _fsl_matrix(reference)


def read_warp(path: str | os.PathLike, reference: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """Open an FSL displacement field, checking it is one (not spline coefficients) and on the reference grid.

    Parameters
    ----------
    path : path-like
        ``example_func2standard_warp.nii.gz`` (convertwarp / fnirt ``--fout``).
    reference : nibabel.Nifti1Image, optional
        The standard image; the field must share its grid.

    Returns
    -------
    nibabel.Nifti1Image
        Shape ``(x, y, z, 3)``.

    Raises
    ------
    InputError
        Missing file, a coefficient file, a wrong shape or a grid other than
        the reference's.
    """
    from .nifti import nifti_header

    img = nifti_header(path, ndim=4, what="warp field")
    code = int(img.header["intent_code"])
    if code in _COEFFICIENT_CODES:
        raise InputError(
            f"warp {path} holds {_COEFFICIENT_CODES[code]} coefficients, not a displacement field; "
            "turn it into one with: convertwarp --ref=STANDARD --warp1=FILE --relout --out=FIELD"
        )
    if img.shape[3] != 3:
        raise InputError(f"warp {path} has shape {img.shape}; expected a displacement field (x, y, z, 3)")
    if reference is not None and (img.shape[:3] != reference.shape[:3]
                                  or not np.allclose(img.affine, reference.affine, atol=1e-3)):
        raise InputError(f"warp {path} is not on the standard image's grid {reference.shape[:3]}; "
                         "write it with convertwarp --ref=STANDARD")
    return img


def _reference_fsl_coordinates(reference: nib.Nifti1Image) -> np.ndarray:
    """FSL coordinates of every reference voxel, shape (x, y, z, 3), float64."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in reference.shape[:3]), indexing="ij"), axis=-1)
    m = _fsl_matrix(reference)
    return grid @ m[:3, :3].T + m[:3, 3]


def warp_source_voxels(
    field: np.ndarray,
    source: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    *,
    relative: bool | None = None,
) -> np.ndarray:
    """Source voxel coordinates of every reference voxel under an FSL displacement field.

    Parameters
    ----------
    field : ndarray, shape (x, y, z, 3)
        On the reference grid, in mm (FSL coordinates).
    source, reference : nibabel.Nifti1Image
    relative : bool, optional
        Relative displacements (``convertwarp --relout``, FEAT's) or absolute
        source coordinates; None guesses as fslpy's
        ``detectDeformationType`` does (the reading with the smaller spread
        is the relative one).

    Returns
    -------
    ndarray, shape (x, y, z, 3), float64
    """
    field = np.asarray(field, dtype=float)
    ref_fsl = _reference_fsl_coordinates(reference)
    if relative is None:
        relative = field.std() <= (field - ref_fsl).std()
    src_fsl = field + ref_fsl if relative else field
    inv = np.linalg.inv(_fsl_matrix(source))
    return src_fsl @ inv[:3, :3].T + inv[:3, 3]


def _grid(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Source voxel coords (..., 3) -> grid_sample's normalised (z, y, x) order, align_corners=True."""
    sizes = torch.tensor([max(int(n) - 1, 1) for n in shape[:3]], dtype=coords.dtype, device=coords.device)
    normalised = 2.0 * coords / sizes - 1.0
    return normalised.flip(-1)


def resample_volumes(
    volumes: np.ndarray | torch.Tensor,
    source_voxels: np.ndarray,
    *,
    out_shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    batch: int = 64,
) -> torch.Tensor:
    """Trilinear resampling of a stack of volumes at given source voxel coordinates.

    Parameters
    ----------
    volumes : ndarray or Tensor, shape (n_volumes, x, y, z)
        Source data (float32 on the device).
    source_voxels : ndarray, shape (4, 4) or (X, Y, Z, 3)
        A reference-voxel -> source-voxel affine (with ``out_shape``), or
        the source voxel coordinate of every output voxel.
    out_shape : sequence of int, optional
        ``(X, Y, Z)``; required with an affine.
    device : torch.device or str
    batch : int, default 64
        Volumes sampled per ``grid_sample`` call.

    Returns
    -------
    Tensor, shape (n_volumes, X, Y, Z), float32 on ``device``
        0 where the point falls outside the source's voxel box.
    """
    device = resolve_device(device)
    data = torch.as_tensor(volumes, dtype=torch.float32, device=device)
    if data.ndim != 4:
        raise ValueError(f"volumes must have shape (n_volumes, x, y, z), got {tuple(data.shape)}")
    coords = np.asarray(source_voxels, dtype=float)
    if coords.shape == (4, 4):
        if out_shape is None:
            raise ValueError("out_shape is required with an affine")
        grid = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in out_shape[:3]), indexing="ij"), axis=-1)
        coords = grid @ coords[:3, :3].T + coords[:3, 3]
    coords_t = torch.as_tensor(coords, dtype=torch.float64, device=device)
    src_shape = data.shape[1:]
    upper = torch.tensor([n - 1 for n in src_shape], dtype=torch.float64, device=device)
    inside = ((coords_t >= -_EDGE_TOL) & (coords_t <= upper + _EDGE_TOL)).all(dim=-1)
    grid = _grid(coords_t.clamp(min=torch.zeros_like(upper), max=upper), src_shape).to(torch.float32)[None]
    out = torch.empty((data.shape[0], *coords.shape[:3]), dtype=torch.float32, device=device)
    for start in range(0, data.shape[0], batch):
        chunk = data[start:start + batch][None]  # (1, C, x, y, z): channels are volumes
        sampled = torch.nn.functional.grid_sample(chunk, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out[start:start + batch] = sampled[0] * inside
    return out


def resample_mask(mask: np.ndarray, source_voxels: np.ndarray, *, out_shape: Sequence[int] | None = None,
                  device: torch.device | str = "cpu", threshold: float = 0.5) -> np.ndarray:
    """A binary mask resampled with the data: trilinear, then ``>= threshold``.

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
    """
    weights = resample_volumes(np.asarray(mask, dtype=np.float32)[None], source_voxels, out_shape=out_shape, device=device)
    return (weights[0] >= threshold).cpu().numpy()
