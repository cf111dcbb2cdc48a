"""``gpuconn seed --glm``: per run and seed cope/varcope/tstat/zstat (gpuconn.maps.firstlevel.seed_glm_maps)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from gpuconn.cli.app import run

SHAPE = (12, 12, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-12.0, -12.0, -10.0]


def _study(tmp_path, rng, n_volumes=60):
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    shared = rng.standard_normal(n_volumes)
    data = rng.standard_normal(SHAPE + (n_volumes,)) + 100
    data[4:8, 4:8, 4:8] += 2 * shared
    data[~mask] = 0
    bold = tmp_path / "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), bold)
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), mask_path)
    return bold, mask_path, mask, data


def test_seed_glm_writes_cope_varcope_and_matches_ols(tmp_path, rng, capsys):
    bold, mask_path, mask, data = _study(tmp_path, rng)
    argv = ["seed", "--bold", str(bold), "--mask", str(mask_path), "--seed-coord", "0,0,0", "--radius", "4",
            "--name", "A", "--device", "cpu", "-q"]
    assert run(argv + ["--glm", "none", "--out", str(tmp_path / "ols")]) == 0, capsys.readouterr().err
    assert run(argv + ["--glm", "film", "--out", str(tmp_path / "film")]) == 0, capsys.readouterr().err
    label = "sub-01_task-rest"
    for stat in ("cope", "varcope", "tstat", "zstat"):
        assert (tmp_path / "film" / f"{label}_seed-A_{stat}.nii.gz").exists()
    sidecar = json.loads((tmp_path / "film" / f"{label}_seed-A_cope.json").read_text())
    assert sidecar["Parameters"]["prewhiten"] == "film" and sidecar["Parameters"]["dof"] == 58
    # OLS mode against NumPy: the seed's mean series (demeaned) and a constant.
    ijk = np.argwhere(mask)
    world = ijk @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    sphere = np.linalg.norm(world, axis=1) <= 4
    y = data[mask].T.astype(np.float32).astype(np.float64)
    seed = y[:, sphere].mean(axis=1)
    x = np.column_stack([seed - seed.mean(), np.ones(len(seed))])
    beta = np.linalg.lstsq(x, y, rcond=None)[0][0]
    cope = np.asarray(nib.load(tmp_path / "ols" / f"{label}_seed-A_cope.nii.gz").dataobj)[mask]
    np.testing.assert_allclose(cope, beta, rtol=1e-4, atol=1e-5)  # float32 data and output
    z_film = np.asarray(nib.load(tmp_path / "film" / f"{label}_seed-A_zstat.nii.gz").dataobj)[mask]
    block = np.zeros(SHAPE, dtype=bool)
    block[4:8, 4:8, 4:8] = True
    assert z_film[block[mask]].min() > 3 and np.median(np.abs(z_film[~block[mask]])) < 1  # found with FILM too


def test_seed_glm_bad_mode_is_one_line(tmp_path, rng, capsys):
    bold, mask_path, _, _ = _study(tmp_path, rng)
    rc = run(["seed", "--bold", str(bold), "--mask", str(mask_path), "--seed-coord", "0,0,0", "--radius", "4",
              "--glm", "ar1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--glm 'ar1' is not one of film, none" in err[0]
    assert not (tmp_path / "o").exists()
