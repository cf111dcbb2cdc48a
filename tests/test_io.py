"""NIfTI round trips, grid checks, masking and atomic writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from gpuconn.core import io
from gpuconn.core.errors import GpuconnError, InputError

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]])


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


@pytest.fixture
def bold(tmp_path, rng):
    data = rng.normal(size=(5, 6, 4, 7)).astype(np.float32)
    return _save(tmp_path / "bold.nii.gz", data), data


@pytest.fixture
def mask(tmp_path):
    m = np.zeros((5, 6, 4), bool)
    m[1:4, 2:5, 1:3] = True
    return _save(tmp_path / "mask.nii", m.astype(np.float32)), m


def test_masked_round_trip_preserves_values_and_affine(tmp_path, bold, mask):
    (bold_path, data), (mask_path, m) = bold, mask
    img = io.load_image(bold_path, ndim=4)
    mask_arr, _ = io.load_mask(mask_path, reference=img, reference_path=bold_path)
    values = io.masked_data(img, mask_arr, path=bold_path)
    assert values.shape == (7, int(m.sum())) and values.dtype == np.float32
    np.testing.assert_array_equal(values, data[m].T)
    out = io.save_image(io.unmask(values, mask_arr), img, tmp_path / "out" / "back.nii.gz", params={"k": 1})
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(back.dataobj)[m], data[m])
    assert np.all(np.asarray(back.dataobj)[~m] == 0)
    sidecar = json.loads((tmp_path / "out" / "back.json").read_text())
    assert sidecar["Parameters"] == {"k": 1}
    assert set(sidecar["Versions"]) >= {"numpy", "torch", "nibabel"}


def test_unmask_single_map_gives_3d(mask):
    _, m = mask
    vol = io.unmask(np.arange(m.sum(), dtype=float), m)
    assert vol.shape == m.shape and vol[m].tolist() == list(range(int(m.sum())))


def test_affine_mismatch_names_both_files(tmp_path, bold):
    bold_path, _ = bold
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    other = _save(tmp_path / "mask_shifted.nii.gz", np.ones((5, 6, 4)), shifted)
    with pytest.raises(InputError, match=r"affine mismatch: .*bold.nii.gz and .*mask_shifted.nii.gz differ by up to 2 mm"):
        io.load_mask(other, reference=io.load_image(bold_path), reference_path=bold_path)


def test_shape_mismatch_names_both_files(tmp_path, bold):
    bold_path, _ = bold
    other = _save(tmp_path / "small.nii.gz", np.ones((5, 6, 3)))
    with pytest.raises(InputError, match=r"grid mismatch: .*bold.nii.gz has shape \(5, 6, 4\) but .*small.nii.gz has shape \(5, 6, 3\)"):
        io.check_same_grid(io.load_image(bold_path), bold_path, io.load_image(other), other)


def test_load_image_errors(tmp_path, bold):
    bold_path, _ = bold
    with pytest.raises(InputError, match="BOLD file not found: .*nope.nii.gz"):
        io.load_image(tmp_path / "nope.nii.gz", what="BOLD")
    with pytest.raises(InputError, match=r"has shape \(5, 6, 4, 7\); expected a 3D volume"):
        io.load_image(bold_path, ndim=3)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(bold_path.read_bytes()[:300])
    with pytest.raises(InputError, match="cannot read image .*truncated.nii.gz"):
        io.load_image(truncated)
    text = tmp_path / "mask.txt"
    text.write_text("1 0 1")
    with pytest.raises(InputError, match="mask.txt is not a NIfTI file"):
        io.load_image(text)


def test_load_header_checks_without_reading_data(tmp_path, bold):
    bold_path, _ = bold
    img = io.load_header(bold_path, ndim=4, what="BOLD")
    assert img.shape == (5, 6, 4, 7) and not isinstance(img.dataobj, np.ndarray)  # still on disk
    with pytest.raises(InputError, match=r"BOLD .*bold.nii.gz has shape \(5, 6, 4, 7\); expected a 3D volume"):
        io.load_header(bold_path, ndim=3, what="BOLD")
    with pytest.raises(InputError, match="BOLD file not found: .*nope.nii.gz"):
        io.load_header(tmp_path / "nope.nii.gz", what="BOLD")
    one = _save(tmp_path / "one.nii.gz", np.ones((5, 6, 4, 1)))
    assert io.load_header(one, ndim=3).shape == (5, 6, 4, 1) and io.load_image(one, ndim=3).shape == (5, 6, 4)


def test_empty_mask_and_nan_data_are_clear_errors(tmp_path, bold, mask):
    bold_path, data = bold
    empty = _save(tmp_path / "empty.nii.gz", np.zeros((5, 6, 4)))
    with pytest.raises(InputError, match="mask .*empty.nii.gz is empty"):
        io.load_mask(empty)
    data = data.copy()
    data[2, 3, 1, 4] = np.nan
    nan_path = _save(tmp_path / "nan.nii.gz", data)
    m = io.load_mask(mask[0])[0]
    with pytest.raises(InputError, match="nan.nii.gz has NaN or Inf in 1 voxel"):
        io.masked_data(io.load_image(nan_path), m, path=nan_path)


def test_atomic_write_failure_leaves_nothing(tmp_path, bold, monkeypatch):
    bold_path, data = bold
    img = io.load_image(bold_path)
    target = tmp_path / "res" / "stat.nii.gz"

    def broken_save(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(io.nib, "save", broken_save)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_image(data, img, target)
    assert list((tmp_path / "res").iterdir()) == []


def test_disk_full_is_a_user_error_with_no_file_left(tmp_path, monkeypatch):
    target = tmp_path / "t.tsv"
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(GpuconnError, match="writing .*t.tsv failed: No space left on device; no partial file was left"):
        io.write_tsv(pd.DataFrame({"a": [1]}), target)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GpuconnError, match="cannot write to .*file"):
        io.write_json(blocker / "out.json", {"a": 1})


def test_tsv_round_trip_uses_na(tmp_path):
    table = pd.DataFrame({"a": [1.5, np.nan], "b": ["x", "y"]})
    path = io.write_tsv(table, tmp_path / "t.tsv")
    assert path.read_text().splitlines()[2] == "n/a\ty"
    pd.testing.assert_frame_equal(io.read_tsv(path), table)


def test_split_ext_and_sidecar_names():
    assert io.split_ext("a/b.nii.gz") == ("a/b", ".nii.gz")
    assert io.sidecar_path("x/sub-01_bold.nii.gz").name == "sub-01_bold.json"
    assert io.sidecar_path("x/t.tsv").name == "t.json"
