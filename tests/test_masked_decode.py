"""Reading only the mask's voxels (``io.load_masked``, ``nifti.read_masked``): nibabel's full read, bit for bit.

The reference is nibabel alone: ``np.asanyarray(nib.load(path).dataobj)``
(the stdlib gzip, the whole box scaled), masked by ``io.masked_data``. The
files are written byte by byte here, so the stored dtype, byte order and
``scl_slope``/``scl_inter`` are exactly the ones under test.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from gpuconn.core import nifti
from gpuconn.core.errors import InputError
from gpuconn.core.io import load_masked, masked_data
from gpuconn.maps.series import read_series

SHAPE = (7, 8, 6, 11)


def _mask(shape=SHAPE[:3]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[1:6, 2:7, 1:5] = True
    mask[0, 0, 0] = True  # a voxel in a corner: the masked order is C order over (x, y, z)
    return mask


def _stored(dtype, shape, seed=3) -> np.ndarray:
    """Values spanning the dtype's range (integers) or a BOLD-like range (floats)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.normal(1000.0, 50.0, shape).astype(dtype)


def _write(path, stored: np.ndarray, *, slope=np.nan, inter=np.nan, big_endian=False):
    """A NIfTI-1 file holding ``stored`` as is (Fortran order) with the given scale factors in its header."""
    header = nib.Nifti1Header(endianness=">" if big_endian else "<")
    header.set_data_shape(stored.shape)
    header.set_data_dtype(stored.dtype)
    header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    header["vox_offset"] = 352
    header["scl_slope"], header["scl_inter"] = slope, inter
    data = stored.astype(stored.dtype.newbyteorder(">" if big_endian else "<")).tobytes(order="F")
    raw = header.binaryblock + b"\0" * 4 + data
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=1)
    path.write_bytes(raw)
    return path


# (stored dtype, slope, inter, big-endian): NaN or zero slope means no scaling in NIfTI-1
CASES = {
    "int16 slope 1/3 inter 0.1": (np.int16, 1 / 3, 0.1, False),
    "int16 slope 1/3 big-endian": (np.int16, 1 / 3, 0.0, True),
    "int16 unscaled (NaN slope)": (np.int16, np.nan, np.nan, False),
    "int16 zero slope (read as 1)": (np.int16, 0.0, 5.0, False),
    "int8 slope 2.5 inter -7": (np.int8, 2.5, -7.0, False),
    "uint8 slope 0.7": (np.uint8, 0.7, 0.0, False),
    "uint16 slope 1 inter 3": (np.uint16, 1.0, 3.0, False),
    "int32 slope 1e-3 big-endian": (np.int32, 1e-3, 0.5, True),
    "int32 unscaled": (np.int32, 1.0, 0.0, False),
    "float32 slope 1 inter 0": (np.float32, 1.0, 0.0, False),
    "float32 NaN slope big-endian": (np.float32, np.nan, np.nan, True),
    "float32 slope 1/3": (np.float32, 1 / 3, 0.0, False),
    "float64 slope 2 inter 1": (np.float64, 2.0, 1.0, True),
    "float64 unscaled": (np.float64, 1.0, 0.0, False),
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("decoder", ["igzip", "gzip"])
@pytest.mark.parametrize("case", list(CASES))
def test_masked_read_is_nibabels_full_read_masked_bit_for_bit(tmp_path, monkeypatch, case, decoder, suffix):
    dtype, slope, inter, big_endian = CASES[case]
    path = _write(tmp_path / f"bold{suffix}", _stored(dtype, SHAPE), slope=slope, inter=inter, big_endian=big_endian)
    mask = _mask()
    full = np.asanyarray(nib.load(path).dataobj)  # nibabel alone: the whole box scaled
    expected = masked_data(nib.load(path), mask, path=path)
    if decoder == "gzip":
        monkeypatch.setattr(nifti, "_igzip", None)
    elif nifti._igzip is None:
        pytest.skip("python-isal is not installed")

    values = nifti.read_masked(nifti.nifti_header(path), path, mask)
    assert values.dtype == full.dtype and values.shape == (int(mask.sum()), SHAPE[3])
    assert values.tobytes() == full[mask].tobytes()
    got = load_masked(path, mask, ndim=4, what="BOLD")
    assert got.dtype == expected.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, expected) and got.tobytes() == expected.tobytes()


def test_the_data_tell_float32_scaling_from_nibabels(tmp_path):
    """int16 * (1/3) + 0.1 in float32 differs from nibabel's float64 arithmetic cast to float32: the test above
    would catch a reader that scaled in another dtype."""
    dtype, slope, inter, _ = CASES["int16 slope 1/3 inter 0.1"]
    stored = _stored(dtype, SHAPE)
    path = _write(tmp_path / "bold.nii.gz", stored, slope=slope, inter=inter)
    mask = _mask()
    in_float32 = stored[mask].astype(np.float32) * np.float32(slope) + np.float32(inter)
    got = load_masked(path, mask)
    assert not np.array_equal(got, np.ascontiguousarray(in_float32.T))
    assert np.array_equal(got, masked_data(nib.load(path), mask))


def test_igzip_inflates_the_masked_read(tmp_path, monkeypatch):
    if nifti._igzip is None:
        pytest.skip("python-isal is not installed")
    path = _write(tmp_path / "bold.nii.gz", _stored(np.int16, SHAPE), slope=0.5, inter=0.0)
    opened = []
    real_open = nifti._igzip.open
    monkeypatch.setattr(nifti._igzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    load_masked(path, _mask())
    assert opened == [str(path)]


@pytest.mark.parametrize("shape", [SHAPE[:3], SHAPE[:3] + (1,)])
def test_a_3d_image_or_one_volume_gives_one_row(tmp_path, shape):
    path = _write(tmp_path / "map.nii.gz", _stored(np.int16, shape), slope=0.25, inter=1.0)
    got = load_masked(path, _mask(), ndim=3, what="map")
    assert got.shape == (1, int(_mask().sum()))
    assert np.array_equal(got, masked_data(nib.load(path), _mask()))


def test_a_5d_image_keeps_its_trailing_axes(tmp_path):
    shape = SHAPE[:3] + (3, 2)
    path = _write(tmp_path / "image.nii.gz", _stored(np.int16, shape), slope=1 / 3, inter=0.1)
    values = nifti.read_masked(nifti.nifti_header(path), path, _mask())
    full = np.asanyarray(nib.load(path).dataobj)
    assert values.shape == (int(_mask().sum()), 3, 2) and values.dtype == full.dtype
    assert values.tobytes() == full[_mask()].tobytes()


def test_read_series_reads_the_mask_only(tmp_path):
    path = _write(tmp_path / "sub-01.nii.gz", _stored(np.int16, SHAPE), slope=1 / 3, inter=0.1)
    mask = _mask()
    assert np.array_equal(read_series(path, mask), masked_data(nib.load(path), mask))


def test_nan_inside_the_mask_is_an_error_and_outside_is_not(tmp_path):
    stored = _stored(np.float32, SHAPE)
    stored[0, 7, 5, 2] = np.nan  # outside the mask
    path = _write(tmp_path / "bold.nii.gz", stored)
    mask = _mask()
    assert np.isfinite(load_masked(path, mask)).all()
    stored[2, 3, 2, 4] = np.inf
    stored[3, 3, 2, :] = np.nan
    _write(path, stored)
    with pytest.raises(InputError, match=r"bold\.nii\.gz has NaN or Inf in 2 voxel\(s\) inside the mask; "
                                         "fix the image or use a mask that excludes them"):
        load_masked(path, mask)


def test_a_mask_on_another_grid_is_the_masked_data_error(tmp_path):
    path = _write(tmp_path / "bold.nii.gz", _stored(np.int16, SHAPE), slope=0.5, inter=0.0)
    with pytest.raises(InputError, match=r"bold\.nii\.gz has shape \(7, 8, 6\) but the mask has \(7, 8, 5\)"):
        load_masked(path, _mask((7, 8, 5)))


@pytest.mark.parametrize("decoder", ["igzip", "gzip"])
def test_a_truncated_file_is_one_clear_error(tmp_path, monkeypatch, decoder):
    path = _write(tmp_path / "bold.nii.gz", _stored(np.int16, SHAPE), slope=0.5, inter=0.0)
    path.write_bytes(path.read_bytes()[:-300])
    if decoder == "gzip":
        monkeypatch.setattr(nifti, "_igzip", None)
    with pytest.raises(InputError, match=r"cannot read BOLD .*bold\.nii\.gz: .*is the file complete\?"):
        load_masked(path, _mask(), ndim=4, what="BOLD")
