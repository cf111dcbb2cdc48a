"""Opening plain NIfTI files: existence, format, decoding and rank, each with a one-line error.

The lowest layer of image reading. :func:`gpuconn.core.io.load_header` sends
AFNI datasets (:mod:`gpuconn.core.afni`) and FEAT folders
(:mod:`gpuconn.core.feat`) to their modules and plain files here; the FEAT
module and the resampler open the NIfTI files a FEAT folder holds here too,
so none of them needs :mod:`gpuconn.core.io`.

``.nii.gz`` data are inflated by python-isal's ``igzip`` where it is
installed (the ``fast-gzip`` extra), else by the standard library's
``gzip``: the same bytes (gzip is lossless), decoded by nibabel either way,
so the arrays are identical; igzip inflates about 1.5x faster and releases
the GIL, which matters where reading is the bound (seed maps, with
read-ahead).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

from .errors import InputError

try:
    from isal import igzip as _igzip
except ImportError:  # the stdlib's gzip, through nibabel
    _igzip = None

__all__ = ["NIFTI_SUFFIXES", "check_rank", "nifti_header", "read_data", "load_nifti", "gzip_decoder"]

#: File name endings read as NIfTI.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _unreadable(path: Path, what: str, exc: Exception) -> InputError:
    return InputError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}; is the file complete?")


def check_rank(img: nib.Nifti1Image, path: str | os.PathLike, ndim: int | None, what: str) -> None:
    """Raise InputError unless ``img`` has ``ndim`` dimensions (a 4D image of one volume passes as 3D)."""
    shape = img.shape
    if ndim is not None and len(shape) != ndim and not (ndim == 3 and len(shape) == 4 and shape[3] == 1):
        expected = "a 3D volume" if ndim == 3 else "a 4D series (x, y, z, time)"
        raise InputError(f"{what} {path} has shape {shape}; expected {expected}")


def nifti_header(
    path: str | os.PathLike, *, ndim: int | None = None, what: str = "image", other_formats: str = ""
) -> nib.Nifti1Image:
    """Open a ``.nii``/``.nii.gz`` file without reading its data, checking it exists, opens and has the rank.

    Parameters
    ----------
    path : path-like
    ndim : {3, 4}, optional
        Required dimensionality (see :func:`check_rank`).
    what : str
        What the image is for, used in error messages (``'BOLD'``, ``'mask'``).
    other_formats : str
        Other formats the caller accepts, named in the wrong-format message
        (``' or AFNI dataset (+orig/+tlrc .HEAD)'``).

    Returns
    -------
    nibabel.Nifti1Image
        With its data left on disk.

    Raises
    ------
    InputError
        Missing, not NIfTI, unreadable, or of the wrong rank.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if not str(path).endswith(NIFTI_SUFFIXES):
        raise InputError(f"{what} {path} is not a NIfTI file (.nii or .nii.gz){other_formats}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise _unreadable(path, what, exc) from exc
    check_rank(img, path, ndim, what)
    return img


def read_data(img: nib.Nifti1Image, path: str | os.PathLike, *, ndim: int | None = None,
              what: str = "image") -> nib.Nifti1Image:
    """The image with its data read and checked to decode (a 4D image of one volume as 3D for ``ndim=3``).

    Raises
    ------
    InputError
        Truncated or corrupt data.
    """
    try:
        data = _decoded(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise _unreadable(Path(path), what, exc) from exc
    if ndim == 3 and data.ndim == 4:
        data = data[..., 0]
    return nib.Nifti1Image(data, img.affine, img.header, extra=img.extra)


def gzip_decoder() -> str | None:
    """The python-isal version whose igzip inflates ``.nii.gz`` files, or None when the stdlib's gzip does."""
    if _igzip is None:
        return None
    import isal

    return isal.__version__


def _decoded(proxy) -> np.ndarray:
    """``np.asanyarray(proxy)``, a plain NIfTI ``.gz`` file's bytes inflated by igzip where python-isal is installed.

    The igzip stream replaces only the file under nibabel's reader: shape,
    storage dtype, offset, order and scaling are the proxy's own.
    """
    path = proxy.file_like if type(proxy) is ArrayProxy else None  # AFNI and FEAT proxies read their own way
    if _igzip is None or not isinstance(path, str) or not path.endswith(".gz"):
        return np.asanyarray(proxy)
    with _igzip.open(path, "rb") as stream:
        spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        return np.asanyarray(ArrayProxy(stream, spec, mmap=False, order=proxy.order))


def load_nifti(path: str | os.PathLike, *, ndim: int | None = None, what: str = "image") -> nib.Nifti1Image:
    """:func:`nifti_header` and :func:`read_data`: a NIfTI file with its data read and checked."""
    return read_data(nifti_header(path, ndim=ndim, what=what), path, ndim=ndim, what=what)
