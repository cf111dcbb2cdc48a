"""First-level FSL FEAT folders as inputs, brought to standard space on the device.

A ``.feat`` folder holds the run's data in its functional space
(``filtered_func_data``, ``mask``, ``example_func``), the motion
(``mc/prefiltered_func_data_mcf.par``) and the registrations in ``reg/``
(``standard``, ``example_func2standard.mat``, and with FNIRT
``example_func2standard_warp``).

gpuconn reads the data in standard space, as FSL's ``featregapply`` would
write them to ``reg_standard/``:

* the FEAT folder itself, or ``<feat>/reg_standard/filtered_func_data.nii.gz``,
  opens (:func:`gpuconn.core.io.load_header` calls :func:`open_standard_view`) as the 4D series on the
  ``reg/standard`` grid;
* ``<feat>/reg_standard/mask.nii.gz`` opens as the brain mask on that grid.

When such a ``reg_standard`` file exists on disk (``featregapply`` was run)
it is read as it is. Otherwise every volume is resampled with
:mod:`gpuconn.core.resample`: through ``example_func2standard_warp`` when
present, else ``example_func2standard.mat`` (FLIRT convention), trilinear,
batched on the device of the step that opens the data (its ``--device``,
:func:`gpuconn.core.backend.device_scope`; ``auto`` outside a step), which is what
``applywarp --ref=standard --in=filtered_func_data --warp=...`` (or
``--premat=...mat``) gives. The mask is resampled with the same transform
and kept where the interpolated value is at least 0.5. The images carry
``extra['source_format'] = 'FSL FEAT (resampled to reg/standard)'`` for
the sidecars.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

__all__ = [
    "SOURCE_FORMAT",
    "FeatRun",
    "is_feat_dir",
    "is_standard_view",
    "feat_run",
    "feat_runs",
    "study_runs",
    "open_standard_view",
]

SOURCE_FORMAT = "FSL FEAT (resampled to reg/standard)"
_VIEW_DIR = "reg_standard"
_NIFTI = (".nii.gz", ".nii")


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in _NIFTI:
        if (folder / (stem + suffix)).exists():
            return folder / (stem + suffix)
    return None


def is_feat_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding FEAT's ``filtered_func_data``."""
    path = Path(path)
    return path.is_dir() and _find(path, "filtered_func_data") is not None


@dataclass(frozen=True)
class FeatRun:
    """The files of one first-level FEAT folder, with its standard-space views.

    Attributes
    ----------
    folder : Path
    label : str
        Output label: the folder name without ``.feat``.
    bold : Path
        The folder itself: it opens as ``filtered_func_data`` in standard
        space (see module docs), and names outputs after the folder.
    mask : Path
        ``<folder>/reg_standard/mask.nii.gz`` (opened in standard space).
    motion_par : Path or None
        ``mc/prefiltered_func_data_mcf.par`` when present.
    """

    folder: Path
    label: str
    bold: Path
    mask: Path
    motion_par: Path | None


def feat_run(folder: str | os.PathLike, *, registration: bool = True) -> FeatRun:
    """Check a first-level FEAT folder and name its standard-space inputs.

    Parameters
    ----------
    folder : path-like
    registration : bool, default True
        Require ``reg/`` (False for motion-only uses such as ``qc``).

    Raises
    ------
    InputError
        Not a folder, no ``filtered_func_data``, no ``mask``, no ``reg/``, no
        ``reg/standard`` or neither ``example_func2standard.mat`` nor
        ``example_func2standard_warp`` in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"FEAT folder not found: {folder}")
    if _find(folder, "filtered_func_data") is None:
        raise InputError(f"{folder} has no filtered_func_data.nii.gz; give a first-level .feat folder")
    if _find(folder, "mask") is None:
        raise InputError(f"FEAT folder {folder} has no mask.nii.gz; rerun FEAT's pre-stats or give --bold with --mask")
    if registration:
        _registration(folder)
    label = folder.name.removesuffix(".feat") or folder.name
    motion = folder / "mc" / "prefiltered_func_data_mcf.par"
    view = folder / _VIEW_DIR
    return FeatRun(folder, label, folder, view / "mask.nii.gz", motion if motion.exists() else None)


def feat_runs(patterns: list[str | os.PathLike], *, registration: bool = True) -> list[FeatRun]:
    """FEAT folders from paths or glob patterns (``'sub-*/rest.feat'``), checked, in sorted order per pattern.

    Raises
    ------
    InputError
        A pattern that matches nothing, or a folder :func:`feat_run` rejects.
    """
    runs = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        if not matches:
            raise InputError(f"no FEAT folder matches {pattern}")
        runs += [feat_run(m, registration=registration) for m in matches]
    return runs


def study_runs(pattern: str) -> list:
    """The FEAT folders of a study file's ``inputs.feat`` glob, as :class:`gpuconn.core.bids.Run` objects.

    Subject and session come from ``sub-``/``ses-`` entities in the folder's
    path (the folder label when there is no ``sub-``); ``bold`` is the
    folder, ``mask`` its ``reg_standard/mask.nii.gz`` view and ``motion``
    its MCFLIRT ``.par``.

    Raises
    ------
    InputError
        As :func:`feat_runs`, or two folders of one subject and session.
    """
    import re

    from .bids import Run

    runs, seen = [], {}
    for run in feat_runs([pattern]):
        parts = run.folder.resolve().parts
        entities = dict(m for part in parts for m in re.findall(r"(sub|ses)-([a-zA-Z0-9]+)", part))
        subject, session = entities.get("sub", run.label), entities.get("ses")
        if (subject, session) in seen:
            raise InputError(f"FEAT folders {seen[subject, session]} and {run.folder} are both subject {subject} "
                             f"session {session or '(none)'}; name folders with sub-<label>[/ses-<label>]")
        seen[subject, session] = run.folder
        runs.append(Run(subject=subject, session=session, bold=run.bold, mask=run.mask, motion=run.motion_par))
    return sorted(runs, key=lambda r: (r.subject, r.session or ""))


def _registration(folder: Path) -> tuple[Path, Path | None, Path | None]:
    """(standard, warp or None, mat or None) of a FEAT folder, with errors naming what is missing."""
    reg = folder / "reg"
    if not reg.is_dir():
        raise InputError(
            f"FEAT folder {folder} has no reg/ (registration to standard space); "
            "run FEAT's registration stage (or give the data already in standard space with --bold and --mask)"
        )
    standard = _find(reg, "standard")
    if standard is None:
        raise InputError(f"FEAT folder {folder} has no reg/standard.nii.gz; rerun FEAT's registration stage")
    warp = _find(reg, "example_func2standard_warp")
    mat = reg / "example_func2standard.mat"
    if warp is None and not mat.exists():
        raise InputError(
            f"FEAT folder {folder} has neither reg/example_func2standard.mat nor reg/example_func2standard_warp; "
            "rerun FEAT's registration stage"
        )
    return standard, warp, mat if mat.exists() else None


def is_standard_view(path: str | os.PathLike) -> bool:
    """Whether ``path`` names FEAT data in standard space that gpuconn computes (not a file on disk)."""
    path = Path(path)
    if is_feat_dir(path):
        return True
    return (not path.exists() and path.parent.name == _VIEW_DIR and is_feat_dir(path.parent.parent)
            and path.name.removesuffix(".gz").removesuffix(".nii") in ("filtered_func_data", "mask"))


class _ResampledProxy:
    """Array proxy: the FEAT image resampled to the standard grid when read (float32)."""

    is_proxy = True
    dtype = np.dtype(np.float32)

    def __init__(self, source: Path, transform, shape: tuple[int, ...], is_mask: bool, device: str):
        self._source, self._transform, self._is_mask, self._device = source, transform, is_mask, device
        self.shape, self.ndim = shape, len(shape)

    def __array__(self, dtype=None, copy=None):
        from .nifti import load_nifti
        from .resample import resample_mask, resample_volumes

        img = load_nifti(self._source, ndim=3 if self._is_mask else 4, what="FEAT mask" if self._is_mask else "FEAT data")
        data = np.asarray(img.dataobj, dtype=np.float32)
        source_voxels = self._transform(img)
        if self._is_mask:
            out = resample_mask(data > 0, source_voxels, out_shape=self.shape[:3], device=self._device).astype(np.float32)
        else:
            volumes = np.moveaxis(data, -1, 0)  # (n_volumes, x, y, z)
            out = np.moveaxis(resample_volumes(volumes, source_voxels, out_shape=self.shape[:3],
                                               device=self._device).cpu().numpy(), 0, -1)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, slicer):
        return np.asarray(self)[slicer]


def open_standard_view(path: str | os.PathLike, *, what: str = "image", device: str | None = None) -> nib.Nifti1Image:
    """Open FEAT data on the ``reg/standard`` grid, resampled when read.

    Parameters
    ----------
    path : path-like
        A FEAT folder (its ``filtered_func_data``), or
        ``<feat>/reg_standard/filtered_func_data.nii.gz`` / ``mask.nii.gz``.
    what : str
        For error messages.
    device : str, optional
        Where the resampling runs; default the device of the step opening
        the image (:func:`gpuconn.core.backend.device_scope`, set from the
        command's ``--device``), ``auto`` outside any.

    Returns
    -------
    nibabel.Nifti1Image
        On the standard grid (affine and voxel sizes of ``reg/standard``),
        4D with the run's TR for the data, 3D for the mask; data read on
        access.

    Raises
    ------
    InputError
        As :func:`feat_run`, or an unreadable transform or source image.
    """
    from .backend import scoped_device
    from .nifti import nifti_header
    from .resample import flirt_source_voxels, read_flirt_matrix, read_warp, warp_source_voxels

    path = Path(path)
    folder = path if is_feat_dir(path) else path.parent.parent
    is_mask = not is_feat_dir(path) and path.name.startswith("mask")
    run = feat_run(folder)
    standard_path, warp_path, mat_path = _registration(run.folder)
    standard = nifti_header(standard_path, what="FEAT standard image")
    source_path = _find(run.folder, "mask" if is_mask else "filtered_func_data")
    source = nifti_header(source_path, ndim=3 if is_mask else 4, what=what)
    if warp_path is not None:
        field = read_warp(warp_path, standard)

        def transform(img):
            return warp_source_voxels(np.asarray(field.dataobj, dtype=float), img, standard)
    else:
        matrix = read_flirt_matrix(mat_path)

        def transform(img):
            return flirt_source_voxels(matrix, img, standard)
    shape = tuple(standard.shape[:3]) + (() if is_mask else (source.shape[3],))
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    zooms = tuple(float(z) for z in standard.header.get_zooms()[:3])
    header.set_zooms(zooms if is_mask else zooms + (float(source.header.get_zooms()[3]),))
    header.set_xyzt_units("mm", source.header.get_xyzt_units()[1] if not is_mask else "sec")
    proxy = _ResampledProxy(source_path, transform, shape, is_mask, scoped_device() if device is None else device)
    img = nib.Nifti1Image(proxy, standard.affine, header, extra={"source_format": SOURCE_FORMAT})
    img.set_qform(standard.affine, int(standard.header["qform_code"]) or "mni")
    img.set_sform(standard.affine, int(standard.header["sform_code"]) or "mni")
    return img
