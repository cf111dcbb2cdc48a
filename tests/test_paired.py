"""Paired cope differences with summed varcopes (gpuconn.stats.paired)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from gpuconn.core.errors import InputError
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


def test_gpuconn_design_regression_with_paired_copes(tmp_path, rng, capsys):
    import pandas as pd

    from gpuconn.cli.app import run

    arrays, p = _images(tmp_path, rng)  # 6 subjects
    table = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(6)], "pain_change": [1.0, 0, 3, -1, 2, 0.5]})
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    argv = ["design", "regression", str(tmp_path / "participants.tsv"), "-o", str(tmp_path / "reg"),
            "--variable", "pain_change", "--copes", f"{p['pre']},{p['post']}", "--varcopes", f"{p['vpre']},{p['vpost']}"]
    assert run(argv) == 0, capsys.readouterr().err
    diff = nib.load(tmp_path / "reg_cope.nii.gz").get_fdata()
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in arrays.items()}
    np.testing.assert_allclose(diff, f32["post"] - f32["pre"], rtol=1e-6, atol=1e-6)  # float32 output
    assert (tmp_path / "reg_varcope.nii.gz").exists() and (tmp_path / "reg.mat").exists()
    rc = run(argv[:-2] + ["-o", str(tmp_path / "bad")])
    assert rc == 2 and "--copes and --varcopes need PRE,POST each" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))
