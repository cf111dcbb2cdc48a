"""Dual regression against a plain NumPy transcription of FSL fsl_glm's formulas.

Reference (``_fsl_glm`` below, float64, pinv as ``basicGLM::olsfit``):
demean design and data along the regression axis, optional des_norm
(``N - 1`` std), ``beta = pinv(X) Y``, ``sigma^2 = RSS / (N - K - 1)``,
``t = beta / sqrt(diag(pinv pinv') sigma^2)``, ``z`` by scipy
(``norm.isf(t.sf(|t|, dof))``).

Tolerances: the device path keeps data and the big products in float32
(sums over <= 1000 voxels or 60 volumes), the K x K algebra in float64. The
error is a few float32 epsilons (1.2e-7) times the condition of the small
systems: we assert 2e-5 relative on time courses and betas and 2e-4
absolute on Z (|Z| up to ~10, i.e. ~2e-5 relative).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats

from gpuconn.cli.app import run
from gpuconn.maps.dualreg import dual_regression, spatial_regression, temporal_regression
from gpuconn.maps.options import DualRegOptions
from gpuconn.stats.zstat import _t_to_z_series
from gpuconn.stats.zstat import t_to_z_tensor as t_to_z
from gpuconn.core.errors import InputError

SHAPE = (10, 12, 10)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _fsl_glm(y, x, *, des_norm=False):
    """fsl_glm --demean [--des_norm] --out_z on (N, M) data and (N, K) design, float64."""
    y = y - y.mean(axis=0)
    x = x - x.mean(axis=0)
    if des_norm:
        x = x / x.std(axis=0, ddof=1)
    pinv = np.linalg.pinv(x)
    beta = pinv @ y
    resid = y - x @ beta
    dof = y.shape[0] - x.shape[1] - 1
    var_beta = np.diag(pinv @ pinv.T)[:, None] * (resid**2).sum(axis=0) / dof
    t = beta / np.sqrt(var_beta)
    z = np.sign(t) * stats.norm.isf(stats.t.sf(np.abs(t), dof))
    return beta, z


def _reference(data, maps, *, des_norm=True):
    """Stage 1 (T, K) and stage 2 (K, V) beta and Z for one subject (T, V)."""
    y = data.astype(np.float64)
    timecourses = _fsl_glm(y.T, maps.T.astype(np.float64))[0].T
    beta, z = _fsl_glm(y, timecourses, des_norm=des_norm)
    return timecourses, beta, z


def _simulate(rng, n_subjects=3, n_volumes=40, n_voxels=400, n_maps=4):
    maps = rng.standard_normal((n_maps, n_voxels)).astype(np.float32)
    maps[:, : n_voxels // 2] *= 3.0  # unequal spatial variance
    timecourses = rng.standard_normal((n_subjects, n_volumes, n_maps))
    noise = rng.standard_normal((n_subjects, n_volumes, n_voxels)) * 2.0
    data = timecourses @ maps + noise + 500.0  # a BOLD-like offset the demeaning must remove
    return data.astype(np.float32), maps


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 34, 109, 1000])
def test_t_to_z_series_matches_scipy_into_the_far_tail(dof):
    # the device formula (series + continued fraction), run here on the CPU
    t = np.concatenate([np.linspace(-40, 40, 4001), [0.0, 3.2, 3.4, 200.0]])
    ref = np.sign(t) * stats.norm.isf(stats.t.sf(np.abs(t), dof))
    z = _t_to_z_series(torch.from_numpy(t), dof).numpy()
    finite = np.isfinite(ref)  # scipy's isf underflows past |z| ~ 38
    np.testing.assert_allclose(z[finite], ref[finite], rtol=1e-10, atol=1e-10)
    assert np.all(np.diff(z[:4001]) > 0), "z must increase with t"
    assert z[4001] == 0.0 and not np.signbit(z[4001])
    # near 0, z = t f_dof(0) / phi(0) (scipy loses these digits to cancellation)
    tiny = _t_to_z_series(torch.tensor([1e-8], dtype=torch.float64), dof).item()
    assert tiny == pytest.approx(1e-8 * stats.t.pdf(0, dof) / stats.norm.pdf(0), rel=1e-7)


def test_t_to_z_public_path_agrees_with_series(device):
    # cpu: scipy with the series for tails below 1e-300; cuda: the series
    t = torch.from_numpy(np.r_[np.linspace(-30, 30, 601), 1e3, -1e5]).to(device)
    for dof in (1, 34, 109):
        z = t_to_z(t, dof).cpu().numpy()
        np.testing.assert_allclose(z, _t_to_z_series(t.cpu(), dof).numpy(), rtol=1e-9, atol=1e-8)
    assert t_to_z(t.float(), 50).dtype == torch.float32


def test_t_to_z_beyond_double_tail_is_finite_and_monotone():
    # P(T > t) < 1e-300 here: log-space tail and Newton on log_ndtr.
    z = t_to_z(torch.tensor([1e3, 1e5, 1e7], dtype=torch.float64), 109)
    assert torch.isfinite(z).all() and (torch.diff(z) > 0).all()
    # check against the defining equation in log space: log Phi(-z) = log P(T > t)
    log_p = stats.t.logsf(1e3, 109)
    assert float(torch.special.log_ndtr(-z[0])) == pytest.approx(log_p, rel=1e-10)


def test_t_to_z_rejects_bad_dof():
    with pytest.raises(ValueError, match="dof must be a positive integer"):
        t_to_z(torch.zeros(3), 0)


@pytest.mark.parametrize("des_norm", [True, False])
def test_stages_match_numpy_fsl_glm(rng, device, des_norm):
    data, maps = _simulate(rng)
    tc = spatial_regression(torch.from_numpy(data).to(device), torch.from_numpy(maps).to(device))
    beta, z = temporal_regression(torch.from_numpy(data).to(device), tc, des_norm=des_norm)
    assert tc.shape == (3, 40, 4) and beta.shape == z.shape == (3, 4, 400)
    for s in range(3):
        ref_tc, ref_beta, ref_z = _reference(data[s], maps, des_norm=des_norm)
        assert _rel(tc[s].cpu(), ref_tc) < 2e-5
        assert _rel(beta[s].cpu(), ref_beta) < 2e-5
        np.testing.assert_allclose(z[s].cpu().numpy(), ref_z, atol=2e-4)
        assert np.abs(ref_z).max() > 5  # the planted maps are strongly present


def test_des_norm_scales_betas_but_not_z(rng):
    data, maps = _simulate(rng, n_subjects=1)
    tc = spatial_regression(torch.from_numpy(data), torch.from_numpy(maps))
    beta_n, z_n = temporal_regression(torch.from_numpy(data), tc, des_norm=True)
    beta_r, z_r = temporal_regression(torch.from_numpy(data), tc, des_norm=False)
    std = tc[0].std(dim=0).numpy()
    np.testing.assert_allclose(beta_n[0].numpy(), beta_r[0].numpy() * std[:, None], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(z_n.numpy(), z_r.numpy(), atol=1e-4)


def test_collinear_maps_and_timecourses_are_named(rng):
    data, maps = _simulate(rng, n_subjects=2)
    dup = np.concatenate([maps, maps[:1] * 2.0 + 1.0])  # collinear after demeaning
    with pytest.raises(InputError, match="my maps: the 5 maps are linearly dependent"):
        spatial_regression(torch.from_numpy(data), torch.from_numpy(dup), maps_name="my maps")
    tc = torch.from_numpy(rng.standard_normal((2, 40, 4)))
    tc[1, :, 3] = tc[1, :, 0] * 0.5 + 2.0
    with pytest.raises(InputError, match="sub-02.nii.gz: its stage-1 time courses are collinear"):
        temporal_regression(torch.from_numpy(data), tc, names=["sub-01.nii.gz", "sub-02.nii.gz"])


# --------------------------------------------------------------------------- files and CLI


def _save(path, volume_last):
    nib.Nifti1Image(volume_last, AFFINE).to_filename(str(path))
    return path


def _study(tmp_path, rng, *, n_subjects=3, n_volumes=30, n_maps=4):
    """Maps and subjects on a 10x12x10 grid; a few zero voxels outside a box-shaped brain."""
    brain = np.zeros(SHAPE, bool)
    brain[1:9, 1:11, 1:9] = True
    n_vox = int(brain.sum())
    maps = rng.standard_normal((n_maps, n_vox)).astype(np.float32)
    maps_img = np.zeros(SHAPE + (n_maps,), np.float32)
    maps_img[brain] = maps.T
    maps_path = _save(tmp_path / "melodic_IC.nii.gz", maps_img)
    subjects, series = [], []
    for s in range(n_subjects):
        data = (rng.standard_normal((n_volumes, n_maps)) @ maps + rng.standard_normal((n_volumes, n_vox)) + 100.0)
        vol = np.zeros(SHAPE + (n_volumes,), np.float32)
        vol[brain] = data.T
        subjects.append(_save(tmp_path / f"sub-{s + 1:02d}_bold.nii.gz", vol))
        series.append(data.astype(np.float32))
    return maps_path, subjects, brain, maps, series


def test_dual_regression_files_match_reference(tmp_path, rng):
    maps_path, subjects, brain, maps, series = _study(tmp_path, rng)
    out = tmp_path / "dr"
    result = dual_regression(maps_path, subjects, out, DualRegOptions(batch_size=2), device="cpu")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"dr_stage1_subject{s:05d}.txt" for s in range(3)]
        + [f"dr_stage2_subject{s:05d}.nii.gz" for s in range(3)]
        + [f"dr_stage2_subject{s:05d}_Z.nii.gz" for s in range(3)]
        + [f"dr_stage2_ic{k:04d}.nii.gz" for k in range(4)]
        + ["mask.nii.gz", "dualreg.json"]
    )
    assert np.array_equal(nib.load(result.mask).get_fdata() > 0, brain)  # common mask = varying voxels
    for s in range(3):
        ref_tc, ref_beta, ref_z = _reference(series[s], maps)
        assert _rel(np.loadtxt(result.stage1[s]), ref_tc) < 2e-5
        beta = nib.load(result.stage2[s]).get_fdata()
        assert beta.shape == SHAPE + (4,)
        assert _rel(beta[brain].T, ref_beta) < 2e-5 and np.all(beta[~brain] == 0)
        np.testing.assert_allclose(nib.load(result.stage2_z[s]).get_fdata()[brain].T, ref_z, atol=2e-4)
        for k in range(4):  # per-component files: one volume per subject, in input order
            np.testing.assert_array_equal(nib.load(result.components[k]).dataobj[..., s], beta[..., k])
    meta = json.loads((out / "dualreg.json").read_text())
    assert meta["Parameters"]["subjects"]["subject00002"] == str(subjects[2])
    assert meta["Parameters"]["stage2_dof"]["subject00000"] == 30 - 4 - 1


def _assert_no_output(out):
    assert not out.exists() or not any(out.iterdir())


def test_grid_mismatch_names_subject_and_writes_nothing(tmp_path, rng):
    maps_path, subjects, *_ = _study(tmp_path, rng)
    bad = _save(tmp_path / "sub-bad_bold.nii.gz", np.ones((10, 12, 9, 30), np.float32))
    with pytest.raises(InputError, match=r"grid mismatch: .*melodic_IC.nii.gz has shape \(10, 12, 10\) but "
                                         r".*sub-bad_bold.nii.gz has shape \(10, 12, 9\)"):
        dual_regression(maps_path, [*subjects, bad], tmp_path / "dr", device="cpu")
    _assert_no_output(tmp_path / "dr")


def test_too_few_volumes_is_named(tmp_path, rng):
    maps_path, subjects, *_ = _study(tmp_path, rng, n_volumes=5)
    with pytest.raises(InputError, match=r"sub-01_bold.nii.gz has 5 volumes but dual regression on 4 maps"):
        dual_regression(maps_path, subjects, tmp_path / "dr", device="cpu")
    _assert_no_output(tmp_path / "dr")


def test_collinear_subject_fails_without_partial_output(tmp_path, rng):
    maps_path, subjects, brain, maps, _ = _study(tmp_path, rng)
    # third subject: maps 0 and 1 share one time course, map 3 absent -> collinear stage-1 design
    coef = rng.standard_normal((30, 4))
    coef[:, 1] = coef[:, 0]
    coef[:, 3] = 0.0
    vol = np.zeros(SHAPE + (30,), np.float32)
    vol[brain] = (coef @ maps + 100.0).T
    bad = _save(tmp_path / "sub-collinear_bold.nii.gz", vol)
    out = tmp_path / "dr"
    with pytest.raises(InputError, match="sub-collinear_bold.nii.gz: its stage-1 time courses are collinear"):
        dual_regression(maps_path, [*subjects, bad], out, DualRegOptions(batch_size=1), device="cpu")
    _assert_no_output(out)


def test_cli_dualreg(tmp_path, rng, capsys):
    maps_path, subjects, brain, *_ = _study(tmp_path, rng, n_subjects=2)
    mask = _save(tmp_path / "mask.nii.gz", brain.astype(np.uint8))
    out = tmp_path / "dr"
    rc = run(["dualreg", str(maps_path), *map(str, subjects), "-o", str(out), "--mask", str(mask),
              "--no-des-norm", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "dr_stage2_ic0003.nii.gz").exists()
    assert json.loads((out / "dualreg.json").read_text())["Parameters"]["des_norm"] is False
    rc = run(["dualreg", str(maps_path), str(tmp_path / "missing.nii.gz"), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "subject series file not found" in err and "missing.nii.gz" in err
    # the library's option messages, shown with the flags typed
    rc = run(["dualreg", str(maps_path), *map(str, subjects), "-o", str(out), "-1", "-q", "--device", "cpu"])
    assert rc == 2
    assert "error: a design (-d/-t or -1) was given but -n is 0; give -n N to run randomise on each map\n" in (
        capsys.readouterr().err)
    rc = run(["dualreg", str(maps_path), *map(str, subjects), "-o", str(out), "--batch", "0", "-q"])
    assert rc == 2 and "error: --batch must be at least 1, got 0\n" in capsys.readouterr().err


def test_stage3_randomise_on_each_component(tmp_path, rng):
    maps_path, subjects, brain, *_ = _study(tmp_path, rng, n_subjects=4, n_volumes=20, n_maps=2)
    out = tmp_path / "dr"
    dual_regression(maps_path, subjects, out, DualRegOptions(one_sample=True, n_perm=1), device="cpu")
    for k in range(2):
        tstat = nib.load(out / f"dr_stage3_ic{k:04d}_tstat1.nii.gz").get_fdata()
        betas = nib.load(out / f"dr_stage2_ic{k:04d}.nii.gz").get_fdata()[brain]  # (V, subjects)
        ref = betas.mean(axis=1) / (betas.std(axis=1, ddof=1) / 2.0)  # one-sample t, n = 4
        np.testing.assert_allclose(tstat[brain], ref, rtol=1e-3, atol=1e-3)


def test_stage3_design_is_checked_before_any_work(tmp_path, rng):
    maps_path, subjects, *_ = _study(tmp_path, rng, n_subjects=3, n_volumes=20, n_maps=2)
    mat, con = tmp_path / "design.mat", tmp_path / "design.con"
    mat.write_text("/NumWaves 1\n/NumPoints 2\n/Matrix\n1\n1\n")
    con.write_text("/NumWaves 1\n/NumContrasts 1\n/Matrix\n1\n")
    with pytest.raises(InputError, match="design.mat has 2 rows but dr_stage2_icNNNN .one volume per subject. has 3"):
        dual_regression(maps_path, subjects, tmp_path / "dr", DualRegOptions(n_perm=10), device="cpu", design_path=mat,
                        contrast_path=con)
    _assert_no_output(tmp_path / "dr")
    with pytest.raises(InputError, match="a design .design_path/contrast_path or one_sample. was given but n_perm is 0"):
        dual_regression(maps_path, subjects, tmp_path / "dr", DualRegOptions(one_sample=True), device="cpu")
    with pytest.raises(InputError, match="not both or neither"):
        dual_regression(maps_path, subjects, tmp_path / "dr", DualRegOptions(n_perm=5), device="cpu")
