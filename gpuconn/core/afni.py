"""AFNI inputs: ``+orig``/``+tlrc`` datasets and afni_proc.py ``.1D`` text files.

Images
    An AFNI dataset is a ``.HEAD`` (attributes) with a ``.BRIK`` or
    ``.BRIK.gz`` (data) beside it. :func:`open_dataset` reads it through
    nibabel's AFNI support and hands back a ``nibabel.Nifti1Image`` whose
    data stay on disk, so the rest of gpuconn sees one image type:

    * sub-brick scale factors (``BRICK_FLOAT_FACS``) are applied on reading
      (scaled data come back as float32);
    * the affine is RAS+ (nibabel flips AFNI's RAI/DICOM x and y);
    * the TR is the time axis step (``TAXIS_FLOATS[1]``; milliseconds,
      ``TAXIS_NUMS[2] = 77001``, are converted to seconds); a one-brick
      dataset without a time axis is 3D;
    * the qform/sform code is ``talairach`` for ``+tlrc``, ``mni`` for MNI
      template space, else ``scanner``.

    The image carries ``extra['source_format']`` (``'AFNI'``), which
    :func:`gpuconn.core.io.save_image` writes into the output's sidecar.
    :func:`label_table` reads an atlas's label names from its ``.HEAD``
    (``VALUE_LABEL_DTABLE``, ``ATLAS_LABEL_TABLE``), so ``--seed-label
    atlas+tlrc:L_Amygdala`` works by name.

1D files
    Numbers in whitespace-separated columns, ``#`` comment lines (the NIML
    header of ``X.xmat.1D`` included), AFNI run-length items (``3@0`` is
    three zeros) and AFNI selectors on the file name: columns
    ``file.1D[0..5]`` and rows ``file.1D{0..99}`` (``$`` is the last,
    ``a..b(s)`` steps by ``s``; quotes as typed in a shell are ignored).

    * Motion (``dfile_rall.1D``, ``motion_*.1D``; ``3dvolreg -1Dfile``):
      roll, pitch, yaw in degrees (rotations about the I-S, R-L and A-P
      axes), then dS, dL, dP in mm. :func:`afni_motion_to_internal` turns
      them into gpuconn's MCFLIRT order (rotations about x, y, z in radians,
      then translations along x, y, z in mm) as nipype's
      ``normalize_mc_params`` does: ``rot = (pitch, yaw, roll)`` in radians,
      ``trans = (dL, dP, dS)``. Framewise displacement is then exactly the
      one of the same motion in ``.par`` form; Jenkinson RMS agrees to
      second order in the angles (AFNI and FSL compose the three rotations
      in different orders) and neither depends on the axes' signs.
    * Censor (``censor_*_combined_2.1D``): one column, 1 = keep, 0 = censor;
      :func:`censor_to_spikes` turns it into an ``fsl_motion_outliers``
      style spike matrix.
    * Regressors: any columns, named from the ``ColumnLabels`` of an
      ``X.xmat.1D`` header when present, else ``col0``, ``col1``, ...

afni_proc.py results folders
    A folder ``<subj>.results`` (or a folder holding such folders, possibly
    under ``sub-*/[ses-*/]``) is read as runs by
    :func:`gpuconn.core.bids.find_results_runs`, which
    :func:`gpuconn.core.bids.find_runs` calls for such a folder, so every
    ``--derivatives`` option and the study file take it. Per subject:
    ``desc='preproc'`` (the default, like fMRIPrep's preprocessed series)
    is the volume-registered, scaled ``all_runs.<subj>+tlrc`` to denoise;
    ``desc='denoised'`` is afni_proc's residual series
    ``errts.<subj>[.fanaticor|.tproject]+tlrc``; the brain mask is
    ``full_mask.<subj>+tlrc`` (else ``mask_epi_anat.<subj>+tlrc``), the
    motion ``dfile_rall.1D`` and the censor file
    ``censor_<subj>_combined_2.1D``. ``+orig`` is used when there is no
    ``+tlrc``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .errors import InputError
from .textfile import numeric_rows

__all__ = [
    "label_table",
    "SOURCE_FORMAT",
    "is_dataset",
    "dataset_suffix",
    "head_path",
    "open_dataset",
    "is_1d",
    "read_1d",
    "read_1d_table",
    "afni_motion_to_internal",
    "read_motion_1d",
    "censor_to_spikes",
    "read_censor_1d",
]

#: Value of ``img.extra['source_format']`` for images read from AFNI datasets.
SOURCE_FORMAT = "AFNI"

_DATASET = re.compile(r"^(?P<prefix>.*\+(?:orig|acpc|tlrc))(?P<ext>\.?|\.HEAD|\.BRIK(?:\.gz|\.bz2|\.Z|\.zst)?)$")
_BRIK_SUFFIXES = ("", ".gz", ".bz2", ".Z", ".zst")
_MS_UNITS = 77001  # TAXIS_NUMS[2]: UNITS_MSEC_TYPE (77002 seconds, 77003 Hz)
_XFORM_CODES = {"ORIG": "scanner", "ANAT": "scanner", "TLRC": "talairach", "MNI": "mni"}


def _match(path: str | os.PathLike):
    return _DATASET.match(str(path))


def is_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an AFNI dataset (``x+tlrc``, ``x+tlrc.HEAD``, ``x+orig.BRIK.gz``...)."""
    return _match(path) is not None


def dataset_suffix(path: str | os.PathLike) -> str:
    """The ``+view.EXT`` part of an AFNI dataset name (``''`` when it is not one)."""
    match = _match(path)
    if match is None:
        return ""
    prefix = match.group("prefix")
    return prefix[prefix.rindex("+"):] + match.group("ext")


def head_path(path: str | os.PathLike) -> Path:
    """The ``.HEAD`` file of an AFNI dataset named by any of its forms.

    Raises
    ------
    ValueError
        If ``path`` is not an AFNI dataset name.
    """
    match = _match(path)
    if match is None:
        raise ValueError(f"{path} is not an AFNI dataset name (+orig/+tlrc .HEAD/.BRIK)")
    return Path(match.group("prefix") + ".HEAD")


class _DatasetProxy:
    """Array proxy over nibabel's ``AFNIArrayProxy``: scaled data as float32, 3D when one brick.

    nibabel's ``AFNIArrayProxy.reshape`` fails (it passes a keyword its
    constructor does not take), hence this thin wrapper.
    """

    is_proxy = True

    def __init__(self, proxy, shape: tuple[int, ...], dtype: np.dtype):
        self._proxy = proxy
        self.shape = shape
        self.ndim = len(shape)
        self.dtype = dtype

    def __array__(self, dtype=None, copy=None):
        data = np.asarray(self._proxy).reshape(self.shape).astype(self.dtype, copy=False)
        return data if dtype is None else data.astype(dtype, copy=False)

    def get_unscaled(self):
        return np.asarray(self._proxy.get_unscaled()).reshape(self.shape)

    def __getitem__(self, slicer):
        if self.ndim == 3:  # a single 3D map: small, read whole
            return np.asarray(self)[slicer]
        return np.asarray(self._proxy[slicer]).astype(self.dtype, copy=False)


def open_dataset(path: str | os.PathLike, *, what: str = "image") -> nib.Nifti1Image:
    """Open an AFNI dataset as a NIfTI image without reading its data.

    Parameters
    ----------
    path : path-like
        ``x+tlrc``, ``x+tlrc.HEAD``, ``x+tlrc.BRIK`` or ``x+tlrc.BRIK.gz``.
    what : str
        What the image is for, used in error messages.

    Returns
    -------
    nibabel.Nifti1Image
        Shape ``(x, y, z, t)``, or ``(x, y, z)`` for one brick without a time
        axis; RAS+ affine; zooms with the TR in seconds; data on disk, read
        through the dataset's scale factors; ``extra['source_format']`` is
        ``'AFNI'``.

    Raises
    ------
    InputError
        A missing ``.HEAD`` or ``.BRIK``, or a dataset nibabel cannot read
        (sub-bricks of mixed types, a broken header).
    """
    head = head_path(path)
    if not head.exists():
        raise InputError(f"{what} file not found: {head} (AFNI dataset {path})")
    brik_stem = str(head)[: -len(".HEAD")] + ".BRIK"
    if not any(os.path.exists(brik_stem + s) for s in _BRIK_SUFFIXES):
        raise InputError(
            f"AFNI {what} {head} has no {Path(brik_stem).name} or {Path(brik_stem).name}.gz beside it; "
            "copy the data file next to the .HEAD"
        )
    try:
        afni = nib.load(str(head))
        header = afni.header
        n_bricks = int(header.info["DATASET_RANK"][1])
        zooms = [float(z) for z in header.get_zooms()]
        scaled = header.get_data_scaling() is not None
        raw_dtype = afni.get_data_dtype()
        space = header.get_space()
    except Exception as exc:  # nibabel raises many types for what it cannot read
        raise InputError(
            f"cannot read AFNI {what} {head}: {type(exc).__name__}: {exc}; "
            "convert it with 3dAFNItoNIFTI (or 3dcalc -datum float) and pass the NIfTI"
        ) from exc
    time_axis = "TAXIS_NUMS" in header.info
    shape = tuple(int(s) for s in afni.shape[:3])
    if n_bricks > 1 or time_axis:
        shape += (n_bricks,)
        tr = float(header.info.get("TAXIS_FLOATS", [0.0, 0.0])[1]) if time_axis else 0.0
        if time_axis and header.info["TAXIS_NUMS"][2] == _MS_UNITS:
            tr /= 1000.0
        zooms = zooms[:3] + [tr]
    else:
        zooms = zooms[:3]
    dtype = np.dtype(np.float32) if scaled else raw_dtype.newbyteorder("=")
    proxy = _DatasetProxy(afni.dataobj, shape, dtype)
    nifti_header = nib.Nifti1Header()
    nifti_header.set_data_dtype(dtype)
    nifti_header.set_data_shape(shape)
    nifti_header.set_zooms(zooms)
    nifti_header.set_xyzt_units("mm", "sec")
    img = nib.Nifti1Image(proxy, afni.affine, nifti_header, extra={"source_format": SOURCE_FORMAT})
    code = _XFORM_CODES.get(space, "scanner")
    img.set_qform(afni.affine, code)
    img.set_sform(afni.affine, code)
    return img


# --- 1D text files ---------------------------------------------------------------------------------------

_ONE_D = re.compile(r"^(?P<file>.*?\.1[dD])(?P<cols>\[[^\]]*\])?(?P<rows>\{[^}]*\})?$")


# "<value>" "<name>" pairs of a VALUE_LABEL_DTABLE (3drefit -labeltable, @MakeLabelTable)
_DTABLE_PAIR = re.compile(r'"\s*(-?\d+)\s*"\s+"([^"]*)"')
# <ATLAS_POINT ... STRUCT="name" ... VAL="value" ... /> of an ATLAS_LABEL_TABLE (@Atlasize, AFNI's atlases)
_ATLAS_POINT = re.compile(r"<ATLAS_POINT\b[^>]*>", re.IGNORECASE)
_POINT_FIELD = re.compile(r'\b(STRUCT|VAL)\s*=\s*"([^"]*)"', re.IGNORECASE)


def label_table(path: str | os.PathLike) -> dict[str, int]:
    """The label names of an AFNI atlas dataset, from its ``.HEAD``.

    Parameters
    ----------
    path : path-like
        Any name of the dataset (``x+tlrc``, ``x+tlrc.HEAD``, ...).

    Returns
    -------
    dict of str to int
        Name to voxel value, from ``VALUE_LABEL_DTABLE`` (the NIML table
        ``3drefit -labeltable`` attaches: ``"value" "name"`` pairs) then
        ``ATLAS_LABEL_TABLE`` (``<ATLAS_POINT STRUCT="name" VAL="value">``,
        as ``@Atlasize`` writes); empty when the dataset has neither.

    Raises
    ------
    InputError
        A missing or unreadable ``.HEAD``.
    """
    head = head_path(path)
    try:
        info = nib.brikhead.parse_AFNI_header(str(head))
    except FileNotFoundError:
        raise InputError(f"atlas file not found: {head} (AFNI dataset {path})") from None
    except Exception as exc:  # nibabel raises many types for what it cannot read
        raise InputError(f"cannot read the AFNI header {head}: {type(exc).__name__}: {exc}") from exc
    table: dict[str, int] = {}
    for value, name in _DTABLE_PAIR.findall(str(info.get("VALUE_LABEL_DTABLE", ""))):
        table.setdefault(name.strip(), int(value))
    for point in _ATLAS_POINT.findall(str(info.get("ATLAS_LABEL_TABLE", ""))):
        fields = {key.upper(): text for key, text in _POINT_FIELD.findall(point)}
        if "STRUCT" in fields and fields.get("VAL", "").strip().lstrip("-").isdigit():
            table.setdefault(fields["STRUCT"].strip(), int(fields["VAL"]))
    return table


def is_1d(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an AFNI ``.1D`` file name (with or without selectors)."""
    return _ONE_D.match(str(path).replace("'", "").replace('"', "")) is not None


def _parse_selector(text: str, n: int, path, kind: str) -> np.ndarray:
    """AFNI selector body (``0..5``, ``1,3,$``, ``0..$(2)``) -> indices below ``n``."""
    out: list[int] = []
    shown = f"[{text}]" if kind == "column" else f"{{{text}}}"

    def index(token: str) -> int:
        token = token.strip()
        return n - 1 if token == "$" else int(token)

    try:
        for item in text.split(","):
            item = item.strip()
            step = 1
            stepped = re.fullmatch(r"(.*)\((-?\d+)\)", item)
            if stepped:
                item, step = stepped.group(1), int(stepped.group(2))
            if ".." in item:
                a, b = item.split("..")
                start, stop = index(a), index(b)
                if step == 0:
                    raise ValueError("step 0")
                out += list(range(start, stop + (1 if step > 0 else -1), step if start <= stop else -abs(step)))
            else:
                out.append(index(item))
    except ValueError as exc:
        raise InputError(f"1D {kind} selector '{shown}' of {path} is not AFNI syntax (e.g. 0..5, 1,3,5, 2..$): {exc}") from exc
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise InputError(f"1D {kind} selector '{shown}' of {path} asks for {kind} {bad[0]} but the file has {n} {kind}s")
    return np.asarray(out, dtype=int)


def _split_1d(path: str | os.PathLike) -> tuple[Path, str | None, str | None]:
    text = str(path).replace("'", "").replace('"', "")
    match = _ONE_D.match(text)
    if match is None:
        return Path(text), None, None
    cols, rows = match.group("cols"), match.group("rows")
    return Path(match.group("file")), cols[1:-1] if cols else None, rows[1:-1] if rows else None


def _expand(token: str) -> list[str]:
    if "@" in token:  # AFNI run-length: count@value
        count, value = token.split("@", 1)
        return [value] * int(count)
    return [token]


def _read_1d_text(path: str | os.PathLike, what: str) -> tuple[np.ndarray, list[str] | None]:
    file, cols, rows = _split_1d(path)
    if not file.exists():
        raise InputError(f"{what} file not found: {file}")
    try:
        text = file.read_text()
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {file} is not a text file ({exc.reason}); expected an AFNI .1D matrix") from exc
    labels = None
    found = re.search(r'ColumnLabels\s*=\s*"([^"]*)"', text)
    if found:
        labels = [label.strip() for label in found.group(1).split(";") if label.strip()]
    lines = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                lines.append([v for token in line.split() for v in _expand(token)])
            except ValueError as exc:
                raise InputError(f"{what} {file} has a malformed run-length item ({exc}); expected count@value") from exc
    matrix = numeric_rows(lines, file, what=what, kind="numeric .1D matrix")
    if labels is not None and len(labels) != matrix.shape[1]:
        labels = None
    if cols is not None:
        keep = _parse_selector(cols, matrix.shape[1], file, "column")
        matrix = matrix[:, keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    if rows is not None:
        matrix = matrix[_parse_selector(rows, matrix.shape[0], file, "row")]
    if not np.all(np.isfinite(matrix)):
        raise InputError(f"{what} {file} has NaN or Inf values; fill or drop them")
    return matrix, labels


def read_1d(path: str | os.PathLike, *, what: str = "1D file") -> np.ndarray:
    """Read an AFNI ``.1D`` matrix (comments, run-length items and selectors honoured).

    Parameters
    ----------
    path : path-like
        ``file.1D``, optionally with ``[cols]`` and ``{rows}`` selectors.
    what : str
        What the file is for, used in error messages.

    Returns
    -------
    ndarray, shape (n_rows, n_columns)

    Raises
    ------
    InputError
        Missing, empty, ragged or non-numeric file, or a bad selector.
    """
    return _read_1d_text(path, what)[0]


def read_1d_table(path: str | os.PathLike, *, what: str = "confounds") -> pd.DataFrame:
    """A ``.1D`` matrix as a table: columns named by ``ColumnLabels`` when present, else ``col0``, ``col1``...

    Returns
    -------
    pandas.DataFrame, shape (n_rows, n_columns)
    """
    matrix, labels = _read_1d_text(path, what)
    names = labels if labels is not None else [f"col{i}" for i in range(matrix.shape[1])]
    return pd.DataFrame(matrix, columns=names)


def afni_motion_to_internal(params: np.ndarray) -> np.ndarray:
    """AFNI ``3dvolreg`` motion -> gpuconn's MCFLIRT order and units.

    Parameters
    ----------
    params : ndarray, shape (n_volumes, 6)
        roll, pitch, yaw (degrees), dS, dL, dP (mm).

    Returns
    -------
    ndarray, shape (n_volumes, 6)
        ``rot_x = pitch``, ``rot_y = yaw``, ``rot_z = roll`` (radians),
        ``trans_x = dL``, ``trans_y = dP``, ``trans_z = dS`` (mm).

    See Also
    --------
    nipype.utils.misc.normalize_mc_params : the same mapping (to SPM order).
    """
    params = np.asarray(params, dtype=float)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"AFNI motion must have shape (n_volumes, 6), got {params.shape}")
    roll, pitch, yaw, d_s, d_l, d_p = params.T
    return np.column_stack([np.deg2rad(pitch), np.deg2rad(yaw), np.deg2rad(roll), d_l, d_p, d_s])


def read_motion_1d(path: str | os.PathLike) -> np.ndarray:
    """Read afni_proc.py motion (``dfile_rall.1D``, ``motion_*.1D``) in gpuconn's order and units.

    Returns
    -------
    ndarray, shape (n_volumes, 6)
        As :func:`afni_motion_to_internal`.

    Raises
    ------
    InputError
        Not 6 columns (a 10-column ``3dvolreg -dfile`` file: select ``[1..6]``).
    """
    params = read_1d(path, what="motion parameters")
    if params.shape[1] != 6:
        hint = f"; select the motion columns with {_split_1d(path)[0]}'[1..6]'" if params.shape[1] == 10 else ""
        raise InputError(
            f"motion parameters {path} have {params.shape[1]} columns; expected 6 "
            f"(AFNI 3dvolreg -1Dfile: roll pitch yaw in degrees, dS dL dP in mm){hint}"
        )
    return afni_motion_to_internal(params)


def censor_to_spikes(keep: np.ndarray) -> np.ndarray:
    """An AFNI censor column (1 keep, 0 censor) as one spike column per censored volume.

    Parameters
    ----------
    keep : ndarray, shape (n_volumes,)

    Returns
    -------
    ndarray, shape (n_volumes, n_censored)
        1 at the censored volume, 0 elsewhere (``fsl_motion_outliers -o``).
    """
    keep = np.asarray(keep, dtype=float).ravel()
    censored = np.flatnonzero(keep == 0)
    spikes = np.zeros((keep.size, censored.size))
    spikes[censored, np.arange(censored.size)] = 1.0
    return spikes


def read_censor_1d(path: str | os.PathLike) -> np.ndarray:
    """Read an afni_proc.py censor file (``censor_*_combined_2.1D``) as a spike matrix.

    Returns
    -------
    ndarray, shape (n_volumes, n_censored)

    Raises
    ------
    InputError
        More than one column, or values other than 0 and 1.
    """
    column = read_1d(path, what="censor file")
    if column.shape[1] != 1:
        raise InputError(f"censor file {path} has {column.shape[1]} columns; expected 1 (AFNI: 1 = keep, 0 = censor)")
    if not np.isin(column, (0.0, 1.0)).all():
        raise InputError(f"censor file {path} has values other than 0 and 1; expected AFNI's 1 = keep, 0 = censor")
    return censor_to_spikes(column[:, 0])


# --- afni_proc.py results folders ------------------------------------------------------------------------
