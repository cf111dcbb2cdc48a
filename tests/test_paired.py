"""Paired cope differences with summed varcopes (gpuconn.stats.paired)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from gpuconn.errors import InputError
from gpuconn.stats.paired import paired_differences

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _images(tmp_path, rng, shape=(4, 5, 3, 6)):
    arrays = {"pre": rng.standard_normal(shape), "post": rng.standard_normal(shape),
              "vpre": rng.uniform(0.1, 1, shape), "vpost": rng.uniform(0.1, 1, shape)}
    paths = {}
    for name, data in arrays.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), str(paths[name]))
    return arrays, paths


def test_paired_differences_values(tmp_path, rng):
    arrays, p = _images(tmp_path, rng)
    cope, varcope = paired_differences(p["pre"], p["post"], p["vpre"], p["vpost"], tmp_path / "d.nii.gz",
                                       tmp_path / "v.nii.gz")
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in arrays.items()}
    # float32 inputs and output: differences exact to float32 rounding of the result
    np.testing.assert_allclose(nib.load(cope).get_fdata(), f32["post"] - f32["pre"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nib.load(varcope).get_fdata(), f32["vpre"] + f32["vpost"], rtol=1e-6)
    assert (tmp_path / "d.json").exists()


@pytest.mark.parametrize("fault", ["negative", "volumes"])
def test_paired_differences_bad_input(tmp_path, rng, fault):
    arrays, p = _images(tmp_path, rng)
    if fault == "negative":
        arrays["vpost"][1, 1, 1, 2] = -1
        nib.save(nib.Nifti1Image(arrays["vpost"].astype(np.float32), AFFINE), str(p["vpost"]))
        message = "vpost.nii.gz has 1 voxel\\(s\\) with negative"
    else:
        nib.save(nib.Nifti1Image(arrays["post"][..., :5].astype(np.float32), AFFINE), str(p["post"]))
        message = "post.nii.gz has 5 volumes but .*pre.nii.gz has 6"
    with pytest.raises(InputError, match=message):
        paired_differences(p["pre"], p["post"], p["vpre"], p["vpost"], tmp_path / "d.nii.gz", tmp_path / "v.nii.gz")
    assert not (tmp_path / "d.nii.gz").exists()
