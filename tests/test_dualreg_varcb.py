"""Dual regression stage-2 beta variances (``--out-varcb``, fsl_glm ``--out_varcb``)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from gpuconn.cli.app import run
from gpuconn.maps.dualreg import dual_regression
from gpuconn.maps.options import DualRegOptions

SHAPE = (8, 9, 7)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _study(tmp_path, rng, n_subjects=2, n_volumes=30, n_maps=3):
    brain = np.zeros(SHAPE, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    n_vox = int(brain.sum())
    maps = rng.standard_normal((n_maps, n_vox))
    img = np.zeros(SHAPE + (n_maps,), np.float32)
    img[brain] = maps.T
    maps_path = tmp_path / "maps.nii.gz"
    nib.save(nib.Nifti1Image(img, AFFINE), str(maps_path))
    subjects = []
    for s in range(n_subjects):
        data = rng.standard_normal((n_volumes, n_maps)) @ maps + rng.standard_normal((n_volumes, n_vox)) + 50
        vol = np.zeros(SHAPE + (n_volumes,), np.float32)
        vol[brain] = data.T
        subjects.append(tmp_path / f"sub-{s}.nii.gz")
        nib.save(nib.Nifti1Image(vol, AFFINE), str(subjects[-1]))
    return maps_path, subjects, brain


def test_varcb_is_the_variance_of_the_stage2_betas(tmp_path, rng):
    maps_path, subjects, brain = _study(tmp_path, rng)
    out = tmp_path / "dr"
    dual_regression(maps_path, subjects, out, DualRegOptions(varcb=True), device="cpu")
    for s, path in enumerate(subjects):
        name = f"subject{s:05d}"
        y = np.asarray(nib.load(path).dataobj, dtype=np.float64)[brain].T
        x = np.loadtxt(out / f"dr_stage1_{name}.txt", ndmin=2)
        x = x - x.mean(axis=0)
        x = x / x.std(axis=0, ddof=1)  # des_norm
        y = y - y.mean(axis=0)
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        dof = y.shape[0] - x.shape[1] - 1
        rss = ((y - x @ beta) ** 2).sum(axis=0)
        expected = np.diag(np.linalg.inv(x.T @ x))[:, None] * rss / dof
        varcb = np.asarray(nib.load(out / f"dr_stage2_{name}_varcb.nii.gz").dataobj)[brain].T
        # float32 data and stage-1 text (10 significant digits): ~1e-5 relative
        np.testing.assert_allclose(varcb, expected, rtol=2e-4)


def test_varcb_off_by_default(tmp_path, rng):
    maps_path, subjects, _ = _study(tmp_path, rng)
    dual_regression(maps_path, subjects, tmp_path / "plain", device="cpu")
    assert not list((tmp_path / "plain").glob("*_varcb.nii.gz"))


def test_cli_out_varcb(tmp_path, rng, capsys):
    maps_path, subjects, _ = _study(tmp_path, rng)
    argv = ["dualreg", str(maps_path), *map(str, subjects), "--out", str(tmp_path / "o"), "--out-varcb", "-q",
            "--device", "cpu"]
    assert run(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "dr_stage2_subject00001_varcb.nii.gz").exists()
