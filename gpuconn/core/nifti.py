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

:func:`read_masked` reads only the voxels of a mask as values: a plain
file's stored numbers are masked first and only the kept ones scaled by
``scl_slope``/``scl_inter`` (nibabel's own arithmetic), where reading the
whole image would scale the whole box, mostly outside the brain.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.volumeutils import apply_read_scaling

from .errors import InputError

try:
    from isal import igzip as _igzip
except ImportError:  # the stdlib's gzip, through nibabel
    _igzip = None

__all__ = ["NIFTI_SUFFIXES", "check_rank", "nifti_header", "read_data", "read_masked", "load_nifti", "gzip_decoder"]

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


def read_masked(img: nib.Nifti1Image, path: str | os.PathLike, mask: np.ndarray, *,
                what: str = "image") -> np.ndarray:
    """The values of the voxels inside ``mask``, scaled as nibabel reads them, without scaling the others.

    ``np.asanyarray(img.dataobj)[mask]`` bit for bit (same values, same
    dtype): a plain NIfTI file's stored numbers are read unscaled (inflated
    by igzip where installed), masked, and the kept ones scaled by
    :func:`nibabel.volumeutils.apply_read_scaling` with the proxy's
    ``slope`` and ``inter``, which is what nibabel's ``ArrayProxy`` applies to
    the whole array (its scale factors are Python floats, from
    ``get_slope_inter``, a zero or NaN slope read as 1). The scaling is
    element-wise and its dtype depends on the stored dtype and the scale
    factors only, never on the values, so masking first changes no bit.
    AFNI datasets (per-volume scale factors) and FEAT views (resampled) are
    read whole, then masked.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        From :func:`nifti_header` (data still on disk) or another opener.
    path : path-like
        Its file, named in errors.
    mask : ndarray of bool, shape (x, y, z)
        On the image's grid (checked by the caller).
    what : str
        What the image is for, used in error messages.

    Returns
    -------
    ndarray, shape (n_voxels,) for a 3D image or (n_voxels, n_volumes) for 4D
        In nibabel's dtype for the image (float64 for scaled integers).

    Raises
    ------
    InputError
        Truncated or corrupt data.
    """
    proxy = img.dataobj
    try:
        if type(proxy) is not ArrayProxy:  # AFNI and FEAT proxies read their own way
            return _decoded(proxy)[mask]
        with _inflated(proxy) as source:
            stored = source.get_unscaled()
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise _unreadable(Path(path), what, exc) from exc
    # stored[mask], gathered from whole volumes (NIfTI is x-fastest): each voxel's place in a volume, in C order
    places = np.arange(mask.size).reshape(mask.shape, order="F")[mask]
    volumes = stored.reshape((mask.size, -1), order="F").T  # (n_volumes, x*y*z), a view of the stored array
    values = apply_read_scaling(np.take(volumes, places, axis=1), proxy.slope, proxy.inter)
    return values.T.reshape(places.shape + stored.shape[3:], order="F")


@contextlib.contextmanager
def _inflated(proxy) -> Iterator:
    """``proxy``, or for a plain NIfTI ``.gz`` file where python-isal is installed, its copy reading an igzip stream.

    The igzip stream replaces only the file under nibabel's reader: shape,
    storage dtype, offset, order and scaling are the proxy's own.
    """
    path = proxy.file_like if type(proxy) is ArrayProxy else None  # AFNI and FEAT proxies read their own way
    if _igzip is None or not isinstance(path, str) or not path.endswith(".gz"):
        yield proxy
        return
    with _igzip.open(path, "rb") as stream:
        spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        yield ArrayProxy(stream, spec, mmap=False, order=proxy.order)


def _decoded(proxy) -> np.ndarray:
    """``np.asanyarray(proxy)``, a plain NIfTI ``.gz`` file's bytes inflated by igzip where python-isal is installed."""
    with _inflated(proxy) as source:
        return np.asanyarray(source)


def load_nifti(path: str | os.PathLike, *, ndim: int | None = None, what: str = "image") -> nib.Nifti1Image:
    """:func:`nifti_header` and :func:`read_data`: a NIfTI file with its data read and checked."""
    return read_data(nifti_header(path, ndim=ndim, what=what), path, ndim=ndim, what=what)
