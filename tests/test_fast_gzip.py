"""python-isal's igzip behind the one NIfTI reader: the arrays of the stdlib gzip path, bit for bit."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest

from gpuconn.core import nifti
from gpuconn.core.errors import InputError
from gpuconn.core.io import load_image, masked_data

igzip = pytest.importorskip("isal.igzip")  # the fast-gzip extra (in the test extra too)


def _image(dtype, shape, *, big_endian=False, scaled=False):
    rng = np.random.default_rng(7)
    values = rng.normal(1000.0, 50.0, shape)
    header = nib.Nifti1Header(endianness=">" if big_endian else "<")
    header.set_data_dtype(dtype)
    if not scaled:
        values = values.astype(dtype)
    return nib.Nifti1Image(values.astype(np.float32) if scaled else values, np.diag([2.0, 2.0, 2.0, 1.0]), header)


CASES = {
    "int16 scaled (scl_slope/inter)": dict(dtype=np.int16, shape=(7, 8, 6, 11), scaled=True),
    "float32 4D": dict(dtype=np.float32, shape=(7, 8, 6, 11)),
    "float64 3D big-endian": dict(dtype=np.float64, shape=(9, 5, 4), big_endian=True),
    "uint8 3D": dict(dtype=np.uint8, shape=(9, 5, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_igzip_reads_the_arrays_the_stdlib_reads(tmp_path, monkeypatch, case):
    path = tmp_path / "image.nii.gz"
    nib.save(_image(**CASES[case]), path)
    opened = []
    real_open = igzip.open
    monkeypatch.setattr(nifti._igzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    fast = np.asanyarray(load_image(path).dataobj)
    assert opened == [str(path)], "the .nii.gz was inflated by igzip"
    monkeypatch.setattr(nifti, "_igzip", None)
    plain = np.asanyarray(load_image(path).dataobj)
    assert fast.dtype == plain.dtype and fast.shape == plain.shape
    assert fast.tobytes() == plain.tobytes()
    assert plain.dtype == np.asanyarray(nib.load(path).dataobj).dtype  # as nibabel reads it


def test_igzip_masked_series_equal_the_stdlib_ones(tmp_path, monkeypatch):
    path = tmp_path / "bold.nii.gz"
    nib.save(_image(**CASES["int16 scaled (scl_slope/inter)"]), path)
    mask = np.zeros((7, 8, 6), dtype=bool)
    mask[1:6, 2:7, 1:5] = True
    fast = masked_data(load_image(path, ndim=4), mask)
    monkeypatch.setattr(nifti, "_igzip", None)
    np.testing.assert_array_equal(fast, masked_data(load_image(path, ndim=4), mask))


@pytest.mark.parametrize("fast", [True, False])
def test_a_truncated_gz_is_one_clear_error_with_either_decoder(tmp_path, monkeypatch, fast):
    path = tmp_path / "bold.nii.gz"
    nib.save(_image(np.float32, (7, 8, 6, 11)), path)
    path.write_bytes(path.read_bytes()[:-500])
    if not fast:
        monkeypatch.setattr(nifti, "_igzip", None)
    with pytest.raises(InputError, match=r"cannot read BOLD .*bold\.nii\.gz.*is the file complete\?"):
        load_image(path, ndim=4, what="BOLD")


def test_info_names_the_gzip_decoder(monkeypatch, capsys):
    from gpuconn.cli.app import run

    assert run(["info"]) == 0
    assert "igzip (python-isal" in capsys.readouterr().out
    monkeypatch.setattr(nifti, "_igzip", None)
    assert run(["info"]) == 0
    assert "stdlib gzip (faster, same arrays: gpuconn[fast-gzip])" in capsys.readouterr().out
