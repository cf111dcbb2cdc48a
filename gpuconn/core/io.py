"""NIfTI and table I/O: loading, masking, grid checks and atomic writes.

Images are loaded with nibabel and turned into ``(n_volumes, n_voxels)``
arrays of the voxels inside a mask, and back. Every output is written to a
temporary name in the destination folder and renamed when complete, so an
interrupted or failed write never leaves a partial file under the final name;
inside :func:`output_transaction` (every CLI command) a command that fails
also removes the complete files it had already written.
NIfTI and TSV outputs get a JSON sidecar with the parameters that made them
and the versions of the packages involved.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import glob
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from .. import __version__
from . import afni, feat
from .nifti import NIFTI_SUFFIXES, check_rank, nifti_header, read_data, read_masked
from .errors import GpuconnError, InputError

__all__ = [
    "split_ext",
    "sidecar_path",
    "load_header",
    "load_image",
    "load_masked",
    "load_mask",
    "check_same_grid",
    "masked_data",
    "unmask",
    "atomic_path",
    "note_input",
    "existing_input",
    "output_lock",
    "output_transaction",
    "keep_outputs",
    "save_image",
    "write_json",
    "write_tsv",
    "write_text",
    "read_tsv",
    "provenance",
    "command_line",
]

_AFFINE_ATOL = 1e-3  # mm; header round-off in float32 qform/sform


def split_ext(path: str | os.PathLike) -> tuple[str, str]:
    """Split a path into stem and extension, treating ``.nii.gz``/``.tsv.gz`` as one."""
    text = str(path)
    if afni.is_dataset(text):  # x+tlrc.HEAD -> (x, +tlrc.HEAD)
        suffix = afni.dataset_suffix(text)
        return text[: -len(suffix)], suffix
    for suffix in (".nii.gz", ".tsv.gz", ".nii", ".tsv", ".json", ".txt", ".mat", ".con", ".grp", ".fts", ".html"):
        if text.endswith(suffix):
            return text[: -len(suffix)], suffix
    root, ext = os.path.splitext(text)
    return root, ext


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar name of an output (``x.nii.gz`` → ``x.json``)."""
    return Path(split_ext(path)[0] + ".json")


def load_header(path: str | os.PathLike, *, ndim: int | None = None, what: str = "image") -> nib.Nifti1Image:
    """Open a NIfTI image without reading its data, checking it exists, opens and has the right rank.

    The cheap half of :func:`load_image`, for validation passes that need
    only the shape, affine and header.

    Parameters
    ----------
    path : path-like
        ``.nii`` or ``.nii.gz`` file, or an AFNI dataset (``x+tlrc``,
        ``x+tlrc.HEAD``, ``.BRIK``, ``.BRIK.gz``; see :mod:`gpuconn.core.afni`),
        or a first-level ``.feat`` folder (its ``filtered_func_data``) or
        ``<feat>/reg_standard/mask.nii.gz``, in standard space (see
        :mod:`gpuconn.core.feat`).
    ndim : {3, 4}, optional
        Required dimensionality. A 4D image with one volume passes as 3D
        (and keeps its 4D shape here).
    what : str
        What the image is for, used in error messages (``'BOLD'``, ``'mask'``).

    Returns
    -------
    nibabel.Nifti1Image
        With its data left on disk.

    Raises
    ------
    InputError
        Missing or unreadable file, or wrong dimensionality.
    """
    path = Path(path)
    if afni.is_dataset(path):
        img = afni.open_dataset(path, what=what)
    elif feat.is_standard_view(path):  # a .feat folder: its data resampled to reg/standard
        img = feat.open_standard_view(path, what=what)
    else:
        img = nifti_header(path, what=what, other_formats=" or AFNI dataset (+orig/+tlrc .HEAD)")
    note_input(path, source_format=img.extra.get("source_format"))
    check_rank(img, path, ndim, what)
    return img


def load_image(path: str | os.PathLike, *, ndim: int | None = None, what: str = "image") -> nib.Nifti1Image:
    """Load a NIfTI image, checking it exists, decodes and has the right rank.

    Parameters
    ----------
    path : path-like
        ``.nii`` or ``.nii.gz`` file.
    ndim : {3, 4}, optional
        Required dimensionality. A 4D image with one volume passes as 3D.
    what : str
        What the image is for, used in error messages (``'BOLD'``, ``'mask'``).

    Returns
    -------
    nibabel.Nifti1Image
        With its data already read and checked to decode.

    Raises
    ------
    InputError
        Missing, unreadable or truncated file, or wrong dimensionality.
    """
    return read_data(load_header(path, ndim=ndim, what=what), path, ndim=ndim, what=what)


def check_same_grid(
    img_a: nib.Nifti1Image,
    path_a: str | os.PathLike,
    img_b: nib.Nifti1Image,
    path_b: str | os.PathLike,
    *,
    atol: float = _AFFINE_ATOL,
) -> None:
    """Raise a clear error unless two images share their spatial shape and affine.

    Parameters
    ----------
    img_a, img_b : nibabel.Nifti1Image
    path_a, path_b : path-like
        Their files, named in the error.
    atol : float
        Tolerance on affine entries in mm.

    Raises
    ------
    InputError
        Naming both files and the mismatch.
    """
    shape_a, shape_b = img_a.shape[:3], img_b.shape[:3]
    if shape_a != shape_b:
        raise InputError(
            f"grid mismatch: {path_a} has shape {shape_a} but {path_b} has shape {shape_b}; "
            "resample one onto the other's grid"
        )
    if not np.allclose(img_a.affine, img_b.affine, atol=atol):
        diff = float(np.max(np.abs(img_a.affine - img_b.affine)))
        raise InputError(
            f"affine mismatch: {path_a} and {path_b} differ by up to {diff:.4g} mm "
            f"({np.round(img_a.affine[:3], 3).tolist()} vs {np.round(img_b.affine[:3], 3).tolist()}); "
            "resample one onto the other's grid"
        )


def load_mask(
    path: str | os.PathLike,
    *,
    reference: nib.Nifti1Image | None = None,
    reference_path: str | os.PathLike | None = None,
    threshold: float = 0.0,
    what: str = "mask",
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a 3D mask (voxels ``> threshold``), optionally checked against a reference grid.

    Returns
    -------
    mask : ndarray of bool, shape (x, y, z)
    img : nibabel.Nifti1Image

    Raises
    ------
    InputError
        Not 3D, empty, or on a different grid from the reference.
    """
    img = load_image(path, ndim=3, what=what)
    if reference is not None:
        check_same_grid(reference, reference_path or "reference image", img, path)
    data = np.asarray(img.dataobj)
    mask = np.nan_to_num(data, nan=0.0) > threshold
    if not mask.any():
        raise InputError(f"{what} {path} is empty (no voxel above {threshold}); check the file or threshold")
    return mask, img


def masked_data(
    img: nib.Nifti1Image,
    mask: np.ndarray,
    *,
    path: str | os.PathLike = "image",
    dtype: Any = np.float32,
) -> np.ndarray:
    """Voxels inside ``mask`` as a ``(n_volumes, n_voxels)`` array (``(1, n_voxels)`` for 3D).

    Raises
    ------
    InputError
        If the image's grid differs from the mask's, or any masked value is
        NaN or infinite (the message counts them and suggests a tighter mask).
    """
    data = np.asarray(img.dataobj)
    _check_mask_shape(data.shape, mask, path)
    return _volume_rows(data[mask], path, dtype)


def load_masked(
    path: str | os.PathLike,
    mask: np.ndarray,
    *,
    ndim: int | None = None,
    what: str = "image",
    dtype: Any = np.float32,
) -> np.ndarray:
    """:func:`load_image` then :func:`masked_data`, scaling only the voxels inside ``mask``.

    The same array bit for bit, without scaling the stored integers of the
    whole box (:func:`gpuconn.core.nifti.read_masked`): for a brain mask,
    three quarters of a 2 mm MNI image are left unscaled.

    Parameters
    ----------
    path : path-like
        As for :func:`load_header` (NIfTI, AFNI dataset or FEAT folder).
    mask : ndarray of bool, shape (x, y, z)
    ndim : {3, 4}, optional
        Required dimensionality (a 4D image of one volume passes as 3D).
    what : str
        What the image is for, used in error messages (``'BOLD'``).
    dtype : numpy dtype, default float32

    Returns
    -------
    ndarray, shape (n_volumes, n_voxels)
        ``(1, n_voxels)`` for a 3D image.

    Raises
    ------
    InputError
        Those of :func:`load_image` and :func:`masked_data`.
    """
    img = load_header(path, ndim=ndim, what=what)
    _check_mask_shape(img.shape, mask, path)
    return _volume_rows(read_masked(img, path, mask, what=what), path, dtype)


def _check_mask_shape(shape: tuple[int, ...], mask: np.ndarray, path: str | os.PathLike) -> None:
    if shape[:3] != mask.shape:
        raise InputError(f"{path} has shape {shape[:3]} but the mask has {mask.shape}")


def _volume_rows(values: np.ndarray, path: str | os.PathLike, dtype: Any) -> np.ndarray:
    """Masked ``(n_voxels,)`` or ``(n_voxels, n_volumes)`` values as contiguous ``(n_volumes, n_voxels)``, all finite."""
    values = values[:, None] if values.ndim == 1 else values
    values = np.ascontiguousarray(values.T, dtype=dtype)
    bad = ~np.isfinite(values)
    if bad.any():
        n_vox = int(bad.any(axis=0).sum())
        raise InputError(
            f"{path} has NaN or Inf in {n_vox} voxel(s) inside the mask; "
            "fix the image or use a mask that excludes them"
        )
    return values


def unmask(values: np.ndarray, mask: np.ndarray, *, fill: float = 0.0) -> np.ndarray:
    """Put ``(n_maps, n_voxels)`` (or ``(n_voxels,)``) values back on the mask's grid.

    Returns
    -------
    ndarray, shape (x, y, z, n_maps) or (x, y, z)
    """
    values = np.asarray(values)
    n_vox = int(mask.sum())
    if values.shape[-1] != n_vox:
        raise ValueError(f"values have {values.shape[-1]} voxels but the mask has {n_vox}")
    if values.ndim == 1:
        out = np.full(mask.shape, fill, dtype=values.dtype)
        out[mask] = values
        return out
    out = np.full(mask.shape + (values.shape[0],), fill, dtype=values.dtype)
    out[mask] = values.T
    return out


# Files created by atomic_path inside the innermost output_transaction.
_created: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("gpuconn_created", default=None)
@dataclasses.dataclass
class _CommandInputs:
    """What the command inside the outermost :func:`output_transaction` has read."""

    paths: set[Path] = dataclasses.field(default_factory=set)  # no output may replace one
    formats: set[str] = dataclasses.field(default_factory=set)  # non-NIfTI formats, named in every sidecar


_inputs: contextvars.ContextVar[_CommandInputs | None] = contextvars.ContextVar("gpuconn_inputs", default=None)


def existing_input(path: str | os.PathLike, *, what: str) -> Path:
    """``path`` as a Path, checked to exist and noted as an input of the running command (:func:`note_input`).

    Raises
    ------
    InputError
        The file does not exist (``'<what> file not found: <path>'``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    note_input(path)
    return path


def note_input(path: str | os.PathLike, *, source_format: str | None = None) -> None:
    """Record ``path`` as an input of the running command (inside :func:`output_transaction`).

    :func:`atomic_path` then refuses to write over it; a ``source_format``
    (AFNI, FEAT) is named under ``SourceFormat`` in the command's sidecars.
    """
    inputs = _inputs.get()
    if inputs is not None:
        inputs.paths.add(Path(path).resolve())
        if source_format:
            inputs.formats.add(source_format)


@contextlib.contextmanager
def output_transaction() -> Iterator[list[Path]]:
    """All or nothing: if the block fails, remove the files it created through :func:`atomic_path`.

    Files that existed before the block (overwritten ones) are kept. A
    ``SystemExit`` with code 0 or None (a normal CLI end) counts as success.
    Nested blocks hand their files to the enclosing one on success. Inside
    the block, no output may replace a file the block has read
    (:func:`note_input`).

    Yields
    ------
    list of Path
        The files created so far (filled as the block writes).
    """
    created: list[Path] = []
    token = _created.set(created)
    inputs_token = _inputs.set(_CommandInputs()) if _inputs.get() is None else None
    try:
        yield created
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            for path in reversed(created):
                path.unlink(missing_ok=True)
            created.clear()
        raise
    finally:
        _created.reset(token)
        if inputs_token is not None:
            _inputs.reset(inputs_token)
        parent = _created.get()
        if parent is not None:
            parent.extend(created)


def keep_outputs(paths) -> None:
    """Keep ``paths`` and their JSON sidecars even if the enclosing :func:`output_transaction` fails.

    For a multi-run command interrupted after some runs were complete (each
    written atomically): the rollback then removes only the rest. Paths the
    transaction did not create are ignored.
    """
    created = _created.get()
    if created is None:
        return
    kept = {Path(p) for p in paths} | {sidecar_path(p) for p in paths}
    created[:] = [p for p in created if p not in kept]


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Hold an advisory lock on an output root or folder while a command writes it.

    A second command that wants the same outputs stops at once with a
    message naming the running one. The lock is ``flock`` on
    ``<root>.lock`` (``<folder>/.gpuconn.lock`` for a folder), holding the
    writer's pid, host and start time; the kernel releases it when the
    process ends, however it ends, so a lock left by a killed process is
    taken over. The file is removed when the block ends.

    Parameters
    ----------
    target : path-like
        Output root (``-o``) or folder.
    folder : bool, default False
        ``target`` is a folder.

    Yields
    ------
    Path
        The lock file.

    Raises
    ------
    GpuconnError
        Another process holds the lock, or the lock file cannot be created.
    """
    import fcntl
    import socket
    import time

    target = Path(target)
    lock = target / ".gpuconn.lock" if folder else target.with_name(target.name + ".lock")
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]  # removed again when left empty
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as exc:
            raise GpuconnError(f"cannot create the lock {lock}: {exc.strerror}; choose a writable output folder") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise GpuconnError(
                f"{target} is being written by another gpuconn command ({holder}); wait for it to finish or "
                "choose another output; if that process is gone, its lock is taken over on the next run"
            ) from None
        try:  # the holder before us may have removed the file between our open and flock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        for folder_made in made:  # deepest first; a folder that now holds outputs stays
            try:
                folder_made.rmdir()
            except OSError:
                break


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window other threads could see)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The temporary name keeps the extension (so ``.nii.gz`` is still
    compressed); on any exception the temporary file is removed and nothing
    appears under the final name. The file gets the mode a plain ``open()``
    would give it (``0666`` less the umask: 0644 under umask 022), not the
    temporary file's private 0600. Temporary files of ``path`` left by a
    process killed mid-write (SIGKILL runs no clean-up) are removed first.

    Raises
    ------
    GpuconnError
        If the destination folder cannot be created or written.
    InputError
        If ``path`` is an input of the running command.
    """
    path = Path(path)
    inputs = _inputs.get()
    if inputs is not None and path.resolve() in inputs.paths:
        raise InputError(f"{path} is an input of this command; writing an output there would destroy it: "
                         "choose another output name or folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stem, ext = split_ext(path.name)
        # mkstemp names: prefix + 8 random characters + suffix; those left by a killed writer go
        for stale in path.parent.glob(f".{glob.escape(stem)}.????????.tmp{glob.escape(ext)}"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise GpuconnError(f"cannot write to {path.parent}: {exc.strerror}; choose a writable output folder") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        is_new = not path.exists()
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        if is_new and _created.get() is not None:
            _created.get().append(path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise GpuconnError(f"writing {path} failed: {exc.strerror or exc}; no partial file was left") from exc
        raise


#: The command line being run (set by the CLI), for sidecars; the interpreter's argv otherwise.
command_line: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("gpuconn_command_line", default=None)


def provenance(params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready record of the command line, parameters and package versions for a sidecar.

    Inside :func:`output_transaction` (every CLI command), the formats of
    non-NIfTI inputs opened so far (AFNI datasets, FEAT folders) are named
    under ``SourceFormat``.
    """
    import scipy
    import torch

    argv = command_line.get()
    record = {
        "GeneratedBy": {"Name": "gpuconn", "Version": __version__,
                        "CommandLine": shlex.join(argv if argv is not None else sys.argv)},
        "Parameters": _jsonable(dict(params or {})),
        "Versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "torch": torch.__version__,
            "nibabel": nib.__version__,
            "pandas": pd.__version__,
        },
    }
    inputs = _inputs.get()
    if inputs is not None and inputs.formats:
        record["SourceFormat"] = ", ".join(sorted(inputs.formats))
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _write_sidecar(path: Path, params: Mapping[str, Any] | None, reference: nib.Nifti1Image | None = None) -> None:
    record = provenance(params)
    source = getattr(reference, "extra", {}).get("source_format")
    if source and "SourceFormat" not in record:  # the reference was not read from NIfTI (AFNI, FEAT)
        record["SourceFormat"] = source
    write_json(sidecar_path(path), record)


def save_image(
    data: np.ndarray,
    reference: nib.Nifti1Image,
    path: str | os.PathLike,
    *,
    params: Mapping[str, Any] | None = None,
    sidecar: bool = True,
    dtype: Any = np.float32,
) -> Path:
    """Write a 3D/4D array as NIfTI on the reference image's grid, atomically.

    Parameters
    ----------
    data : ndarray, shape (x, y, z) or (x, y, z, n)
        Must match the reference's spatial shape.
    reference : nibabel.Nifti1Image
        Source of affine and header (qform/sform codes, units, TR); its
        ``extra["source_format"]`` (set for AFNI and FEAT inputs) goes to the sidecar
        as ``SourceFormat``.
    path : path-like
        ``.nii`` or ``.nii.gz``.
    params : mapping, optional
        Written with package versions to the JSON sidecar.
    sidecar : bool, default True
        Write ``<stem>.json`` beside the image.
    dtype : numpy dtype, default float32

    Returns
    -------
    Path
    """
    path = Path(path)
    if not str(path).endswith(NIFTI_SUFFIXES):
        raise InputError(f"output {path} must end in .nii or .nii.gz")
    data = np.asarray(data, dtype=dtype)
    if data.shape[:3] != reference.shape[:3]:
        raise ValueError(f"data shape {data.shape} does not match reference grid {reference.shape[:3]}")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_intent("none")
    header["scl_slope"], header["scl_inter"] = np.nan, np.nan
    img = nib.Nifti1Image(data, reference.affine, header)
    img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    if sidecar:
        _write_sidecar(path, params, reference)
    return path


def write_tsv(
    table: pd.DataFrame,
    path: str | os.PathLike,
    *,
    params: Mapping[str, Any] | None = None,
    sidecar: bool = False,
    float_format: str = "%.6g",
) -> Path:
    """Write a table as tab-separated values (``n/a`` for missing), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format=float_format)
    if sidecar:
        _write_sidecar(path, params)
    return path


def read_tsv(path: str | os.PathLike, *, what: str = "table") -> pd.DataFrame:
    """Read a BIDS-style TSV (``n/a`` as missing) with a clear error when absent or malformed.

    A ``.csv`` file is read comma-separated; a file of another name whose
    only column's header holds commas is refused, naming it (a CSV saved as
    ``.tsv``). A ``participant_id`` column is read as text, as spelled
    (``001`` stays ``001``). An AFNI ``.1D`` file (e.g. extra regressors) is
    read as a table with :func:`gpuconn.core.afni.read_1d_table` (columns
    ``col0``, ``col1``... or the ``ColumnLabels`` of an ``X.xmat.1D``).
    """
    if afni.is_1d(path):
        return afni.read_1d_table(path, what=what)
    path = existing_input(path, what=what)
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, na_values=["n/a", "NaN", "nan"], keep_default_na=True,
                            dtype={"participant_id": str})
    except Exception as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from exc
    if sep == "\t" and table.shape[1] == 1 and "," in str(table.columns[0]):
        raise InputError(f"{what} {path} is comma-separated (header {str(table.columns[0])!r}); "
                         "save it tab-separated, or name it .csv")
    return table
