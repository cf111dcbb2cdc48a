"""GRF: smoothness vs the true FWHM, cluster p vs Friston 1994 written out, gpuconn glm."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gpuconn.cli.app import run
from gpuconn.core.errors import InputError
from gpuconn.stats.grf import (
    Smoothness,
    cluster_p_values,
    dof_correction,
    estimate_smoothness,
    expected_clusters,
    grf_cluster_p,
    ols_residuals,
    parametric_glm,
)


def _smoothed_noise(rng, n, shape, fwhm_voxels):
    sigma = fwhm_voxels / math.sqrt(8 * math.log(2))
    return np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(n)])


@pytest.mark.parametrize("fwhm", [3.0, 4.5])
def test_smoothness_within_10_percent(rng, fwhm):
    shape = (30, 32, 28)
    volumes = _smoothed_noise(rng, 16, shape, fwhm)
    mask = np.zeros(shape, dtype=bool)
    mask[5:-5, 5:-5, 5:-5] = True  # away from the filter's reflected edges
    design = np.column_stack([np.ones(16), rng.normal(size=16)])
    import torch

    residuals = ols_residuals(torch.as_tensor(volumes[:, mask]), design)
    smooth = estimate_smoothness(residuals, mask, dof=14, voxel_size=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(smooth.fwhm_voxels, fwhm, rtol=0.10)
    np.testing.assert_allclose(smooth.fwhm_mm, 2 * smooth.fwhm_voxels)
    sigma_sq = smooth.fwhm_voxels**2 / (8 * math.log(2))
    assert smooth.dlh == pytest.approx(dof_correction(14) / math.sqrt(8 * np.prod(sigma_sq)))
    assert smooth.resels == pytest.approx(np.prod(smooth.fwhm_voxels))
    assert smooth.volume == mask.sum()


def _smoothest_loop(volumes, mask, dof):
    """smoothest's algorithm as a plain loop over the grid (3D, > 2 volumes)."""
    r = np.array(volumes, dtype=np.float64)  # (t, x, y, z)
    r = (r - r.mean(axis=0)) / r.std(axis=0, ddof=1)
    ss_minus, s2 = np.zeros(3), np.zeros(3)
    nx, ny, nz = mask.shape
    for x in range(1, nx):
        for y in range(1, ny):
            for z in range(1, nz):
                if mask[x, y, z] and mask[x - 1, y, z] and mask[x, y - 1, z] and mask[x, y, z - 1]:
                    for d, (a, b, c) in enumerate([(x - 1, y, z), (x, y - 1, z), (x, y, z - 1)]):
                        ss_minus[d] += np.sum(r[:, x, y, z] * r[:, a, b, c])
                        s2[d] += np.sum(0.5 * (r[:, x, y, z] ** 2 + r[:, a, b, c] ** 2))
    sigma_sq = -1 / (4 * np.log(ss_minus / s2))
    return np.prod(sigma_sq) ** -0.5 * 8**-0.5 * dof_correction(dof), np.sqrt(8 * np.log(2) * sigma_sq)


def test_smoothness_equals_plain_loop(rng):
    shape = (9, 8, 7)
    volumes = _smoothed_noise(rng, 6, shape, 2.5)
    mask = rng.random(shape) > 0.15
    smooth = estimate_smoothness(volumes[:, mask], mask, dof=4.5)
    dlh, fwhm = _smoothest_loop(volumes, mask, 4.5)
    assert smooth.dlh == pytest.approx(dlh, rel=1e-10)
    np.testing.assert_allclose(smooth.fwhm_voxels, fwhm, rtol=1e-10)


def test_dof_correction_table():
    # smoothest interpolates between table entries a < dof <= b as sqrt(T[b] + slope * (dof - a))
    assert dof_correction(20) == pytest.approx(math.sqrt(1.0632924 + (1.0632924 - 1.0674553) * (20 - 19)))
    assert dof_correction(35.5) == pytest.approx(math.sqrt(1.0281339 + (1.0281339 - 1.0390117) / 10 * 5.5))
    assert dof_correction(5.9) == 1.1
    assert dof_correction(1000) == pytest.approx(math.sqrt(1 + 1.0321 / 1000))


def test_unsmoothed_residuals_are_an_error(rng):
    mask = np.ones((6, 6, 6), dtype=bool)
    anti = np.indices(mask.shape).sum(axis=0) % 2 * 2.0 - 1.0  # checkerboard: correlation -1
    residuals = np.stack([anti[mask] * s for s in rng.normal(size=5)])
    with pytest.raises(InputError, match="lag-1 correlation"):
        estimate_smoothness(residuals, mask)


def _friston_p(k, u, dlh, volume):
    """Friston et al. (1994) / FSL cluster, D = 3, written out term by term."""
    em = volume * (2 * math.pi) ** -2 * dlh * (u**2 - 1) * math.exp(-(u**2) / 2)
    en = volume * 0.5 * math.erfc(u / math.sqrt(2))
    beta = (math.gamma(2.5) * em / en) ** (2 / 3)
    return 1 - math.exp(-em * math.exp(-beta * k ** (2 / 3)))


def test_cluster_p_worked_numbers():
    # a typical FSL smoothest output for 2 mm MNI data: DLH 0.0325, VOLUME 228453
    dlh, volume, u = 0.0325, 228453, 2.3
    sizes = np.array([1, 50, 200, 500, 1500])
    p = cluster_p_values(sizes, z_threshold=u, dlh=dlh, volume=volume)
    expected = [_friston_p(k, u, dlh, volume) for k in sizes]
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert np.all(np.diff(p) < 0) and p[0] > 0.99 and p[-1] < 1e-3
    em = expected_clusters(u, dlh=dlh, volume=volume)
    assert em == pytest.approx(volume * dlh * (u**2 - 1) * math.exp(-(u**2) / 2) / (2 * math.pi) ** 2)


def test_cluster_p_threshold_must_exceed_one():
    with pytest.raises(InputError, match="above 1"):
        cluster_p_values(np.array([10]), z_threshold=0.9, dlh=0.1, volume=1000)


def test_grf_cluster_p_labels(rng):
    mask = np.ones((12, 12, 12), dtype=bool)
    z = np.zeros(mask.shape, dtype=np.float32)
    z[2:5, 2:5, 2:5] = 3.0
    z[9, 9, 9] = 4.0
    smooth = Smoothness(dlh=0.1, volume=1728, resels=20.0, fwhm_voxels=np.ones(3), fwhm_mm=np.ones(3))
    labels, p = grf_cluster_p(z[mask], mask, z_threshold=2.3, smoothness=smooth)
    assert sorted(np.bincount(labels)[1:]) == [1, 27]
    assert p[1] < p[2]  # the 27-voxel cluster (raster label 1) is less likely by chance


def test_glm_cli_finds_planted_blob(tmp_path, rng):
    shape = (20, 20, 16)
    data = _smoothed_noise(rng, 24, shape, 3.0)
    data /= data.std()
    data[:, 5:10, 5:10, 4:9] += 1.0
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-30, -30, -24]
    nib.save(nib.Nifti1Image(np.moveaxis(data, 0, -1).astype(np.float32), affine), tmp_path / "in.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine), tmp_path / "mask.nii.gz")
    root = tmp_path / "g"
    rc = run(["glm", "-i", str(tmp_path / "in.nii.gz"), "-o", str(root), "-1", "-m", str(tmp_path / "mask.nii.gz"),
              "--device", "cpu"])
    assert rc == 0
    import pandas as pd

    table = pd.read_csv(f"{root}_cluster_zstat1.tsv", sep="\t")
    assert len(table) >= 1 and (table["p"] < 0.05).all()
    top = table.iloc[0]
    assert 5 <= top["peak_i"] < 10 and 5 <= top["peak_j"] < 10 and 4 <= top["peak_k"] < 9
    assert top["peak_x"] == pytest.approx(-30 + 3 * top["peak_i"])
    thresh = np.asarray(nib.load(f"{root}_thresh_zstat1.nii.gz").dataobj)
    index = np.asarray(nib.load(f"{root}_cluster_index_zstat1.nii.gz").dataobj)
    assert ((thresh > 0) == (index > 0)).all() and index.max() == table["cluster_index"].max()
    smooth = pd.read_json(f"{root}_smoothness.json", typ="series")
    assert 0.8 * 9 < np.mean(smooth["FWHMmm"]) < 1.2 * 9  # FWHM 3 voxels of 3 mm


def test_glm_cli_errors(tmp_path, capsys):
    rc = run(["glm", "-i", str(tmp_path / "none.nii.gz"), "-o", str(tmp_path / "g"), "-1", "--cluster-z", "0.5"])
    assert rc == 2
    assert "--cluster-z must be above 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 6), np.float32), np.eye(4)), tmp_path / "in.nii.gz")
    rc = run(["glm", "-i", str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "g"), "-1", "-d", "design.mat"])
    assert rc == 2
    assert "error: -1 (one-sample) builds its own design; drop -d/-t or drop -1\n" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"^one_sample \(one-sample\) builds its own design; drop design_path/"):
        parametric_glm(tmp_path / "in.nii.gz", tmp_path / "g", one_sample=True, design_path="design.mat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]
