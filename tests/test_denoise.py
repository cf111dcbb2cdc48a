"""Nuisance GLM with high-pass, censoring, low-pass, smoothing; run-level pipeline and its errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nilearn import signal as nsignal
from nilearn.image import smooth_img
from scipy import fft, ndimage

from gpuconn.subject import denoise as dn
from gpuconn.core.errors import InputError

TR = 2.0


def _clean(data: np.ndarray, design: pd.DataFrame, device, keep=None) -> np.ndarray:
    q = dn.orthonormal_basis(design.to_numpy(float), keep)
    y = torch.as_tensor(data, dtype=torch.float32, device=device)
    if keep is not None:
        y = y * torch.as_tensor(keep[:, None], device=device)
    out = dn.regress_out(y[None], torch.as_tensor(q, device=device)[None])[0].cpu().numpy()
    return out if keep is None else out[keep]


def _nilearn(data, confounds, **kwargs):
    return nsignal.clean(
        data.astype(float), confounds=confounds, t_r=TR, high_pass=0.01, filter="cosine",
        detrend=False, standardize=None, standardize_confounds=True, **kwargs,
    )


def test_cosine_basis_is_nilearn_drift(rng):
    for n, hp in ((60, 0.01), (120, 0.006), (37, 0.02)):
        ours = dn.cosine_basis(n, tr=TR, high_pass=hp)
        theirs = nsignal.create_cosine_drift(hp, np.arange(n) * TR)[:, :-1]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_glm_with_high_pass_matches_nilearn_and_lstsq(device, rng):
    n, v = 60, 300
    confounds = rng.standard_normal((n, 5))
    data = (rng.standard_normal((n, v)) + confounds @ rng.standard_normal((5, v)) + 100).astype(np.float32)
    design = dn.nuisance_design(pd.DataFrame(confounds), tr=TR, high_pass=0.01)
    ours = _clean(data, design, device)
    # nilearn z-scores the confounds, so its model has no constant: ours = nilearn - mean
    theirs = _nilearn(data, confounds)
    ref = data - design.to_numpy() @ np.linalg.lstsq(design.to_numpy(), data.astype(float), rcond=None)[0]
    # float32 data of magnitude 100, float64 projection: |error| ~ 100 * 2^-24 * a few
    np.testing.assert_allclose(ours, theirs - theirs.mean(axis=0), atol=5e-5)
    np.testing.assert_allclose(ours, ref, atol=5e-5)
    np.testing.assert_allclose(ours.mean(axis=0), 0, atol=5e-5)


def test_drop_censoring_matches_nilearn_sample_mask(device, rng):
    n, v = 50, 100
    confounds = rng.standard_normal((n, 3))
    data = rng.standard_normal((n, v)).astype(np.float32)
    keep = np.ones(n, dtype=bool)
    keep[[4, 20, 21]] = False
    design = dn.nuisance_design(pd.DataFrame(confounds), tr=TR, high_pass=0.01).loc[keep].reset_index(drop=True)
    ours = _clean(data, design, device, keep)
    theirs = _nilearn(data, confounds, sample_mask=np.flatnonzero(keep))
    np.testing.assert_allclose(ours, theirs - theirs.mean(axis=0), atol=1e-5)


def test_spike_regressors_equal_dropping_the_volumes(device, rng):
    n, v = 40, 50
    confounds = pd.DataFrame(rng.standard_normal((n, 3)))
    data = rng.standard_normal((n, v)).astype(np.float32)
    outliers = [3, 17]
    keep = np.ones(n, dtype=bool)
    keep[outliers] = False
    spikes = pd.DataFrame(np.eye(n)[:, outliers], columns=["s0", "s1"])
    with_spikes = _clean(data, dn.nuisance_design(pd.concat([confounds, spikes], axis=1), tr=TR, high_pass=0.01), device)
    dropped = _clean(data, dn.nuisance_design(confounds, tr=TR, high_pass=0.01).loc[keep].reset_index(drop=True), device, keep)
    np.testing.assert_allclose(with_spikes[outliers], 0, atol=1e-6)
    np.testing.assert_allclose(with_spikes[keep], dropped, atol=1e-5)


def test_low_pass_removes_high_dct_components(rng):
    n, v = 64, 20
    data = rng.standard_normal((n, v))
    design = dn.nuisance_design(pd.DataFrame(index=range(n)), tr=TR, high_pass=0.01, low_pass=0.1)
    ours = _clean(data, design, "cpu")
    coef_in, coef_out = fft.dct(data, norm="ortho", axis=0), fft.dct(ours, norm="ortho", axis=0)
    freq = np.arange(n) / (2 * n * TR)
    removed = (freq == 0) | (freq <= 0.01) | (freq > 0.1)
    np.testing.assert_allclose(coef_out[removed], 0, atol=1e-5)
    np.testing.assert_allclose(coef_out[~removed], coef_in[~removed], atol=1e-5)


def test_low_pass_must_exceed_high_pass():
    with pytest.raises(InputError, match="^low_pass 0.005 Hz must be above high_pass 0.01 Hz$"):
        dn.nuisance_design(pd.DataFrame(index=range(30)), tr=TR, high_pass=0.01, low_pass=0.005)


def test_dependent_columns_dropped_with_warning(rng):
    a = rng.standard_normal(30)
    design = pd.DataFrame({"a": a, "b": rng.standard_normal(30), "twice_a": 2 * a, "zero": np.zeros(30)})
    with pytest.warns(UserWarning, match=r"dropped 2 column\(s\) that depend on the others: (twice_a|a), zero"):
        kept, dropped = dn.drop_dependent_columns(design, source="x.nii.gz")
    assert len(dropped) == 2 and "zero" in dropped and kept.shape[1] == 2


def test_batched_runs_of_different_sizes_match_single_runs(device, rng):
    """Zero padding of volumes, voxels and design columns leaves each projection unchanged."""
    runs = []
    for n, v, p in ((40, 30, 3), (50, 45, 6)):
        y = rng.standard_normal((n, v)).astype(np.float32)
        d = dn.nuisance_design(pd.DataFrame(rng.standard_normal((n, p))), tr=TR, high_pass=0.01)
        runs.append((y, d))
    n_max, v_max = 50, 45
    data = torch.zeros((2, n_max, v_max), dtype=torch.float32, device=device)
    bases = torch.zeros((2, n_max, 12), dtype=torch.float64, device=device)
    for i, (y, d) in enumerate(runs):
        q = dn.orthonormal_basis(d.to_numpy(), np.arange(n_max) < y.shape[0])
        data[i, : y.shape[0], : y.shape[1]] = torch.as_tensor(y, device=device)
        bases[i, :, : q.shape[1]] = torch.as_tensor(q, device=device)
    batched = dn.regress_out(data, bases).cpu().numpy()
    for i, (y, d) in enumerate(runs):
        np.testing.assert_allclose(batched[i, : y.shape[0], : y.shape[1]], _clean(y, d, device), atol=1e-6)


# ---------------------------------------------------------------- smoothing


def test_gaussian_kernel_is_scipy_kernel():
    for sigma in (0.7, 1.27, 2.5):
        impulse = np.zeros(41)
        impulse[20] = 1.0
        ref = ndimage.gaussian_filter1d(impulse, sigma, truncate=4.0)
        k = dn.gaussian_kernel(sigma)
        np.testing.assert_allclose(ref[20 - k.size // 2 : 20 + k.size // 2 + 1], k, atol=1e-15)
    assert dn.gaussian_sigma(6.0, (2.0, 2.0, 3.0)) == pytest.approx([1.2739827, 1.2739827, 0.8493218], rel=1e-6)


def test_smoothing_matches_scipy_inside_a_mask(device, rng):
    shape = (10, 12, 10)
    mask = np.zeros(shape, dtype=bool)
    mask[2:9, 1:11, 2:8] = True
    mask[5, 5, 5] = False
    vols = rng.standard_normal((3,) + shape).astype(np.float32)
    voxel = (2.0, 2.5, 3.0)
    ours = dn.smooth(torch.as_tensor(vols, device=device), torch.as_tensor(mask, device=device), fwhm=5.0, voxel_size=voxel)
    sig = dn.gaussian_sigma(5.0, voxel)
    weight = ndimage.gaussian_filter(mask.astype(float), sig, mode="constant", truncate=4.0)
    for i in range(3):
        num = ndimage.gaussian_filter(vols[i].astype(float) * mask, sig, mode="constant", truncate=4.0)
        ref = np.where(mask, num / np.where(mask, weight, 1), 0)
        # float32 separable convolution of unit-variance data: ~1e-6
        np.testing.assert_allclose(ours[i].cpu().numpy(), ref, atol=1e-5)


def test_smoothing_with_full_mask_equals_nilearn_away_from_the_edge(rng):
    shape = (24, 24, 24)
    data = rng.standard_normal(shape + (2,)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nl = smooth_img(nib.Nifti1Image(data, affine), fwhm=6.0).get_fdata()
    vols = torch.as_tensor(np.moveaxis(data, -1, 0))
    ours = dn.smooth(vols, torch.ones(shape, dtype=torch.bool), fwhm=6.0, voxel_size=(2.0, 2.0, 2.0)).numpy()
    r = dn.gaussian_kernel(dn.gaussian_sigma(6.0, (2.0,))[0]).size // 2  # 5 voxels
    inner = (slice(r, -r),) * 3
    np.testing.assert_allclose(np.moveaxis(ours, 0, -1)[inner], nl[inner], atol=1e-5)
    scipy_ref = ndimage.gaussian_filter(data[..., 0].astype(float), dn.gaussian_sigma(6.0, (2.0,) * 3))
    np.testing.assert_allclose(ours[0][inner], scipy_ref[inner], atol=1e-5)
    # at the edge nilearn reflects, gpuconn renormalises: different on purpose
    assert not np.allclose(ours[0][0], scipy_ref[0], atol=1e-3)


def test_smoothing_commutes_with_the_regression(rng):
    shape, n = (8, 9, 7), 30
    mask = np.zeros(shape, dtype=bool)
    mask[1:7, 1:8, 1:6] = True
    vols = torch.as_tensor(rng.standard_normal((n,) + shape).astype(np.float32))
    design = dn.nuisance_design(pd.DataFrame(rng.standard_normal((n, 3))), tr=TR, high_pass=0.01)
    q = torch.as_tensor(dn.orthonormal_basis(design.to_numpy()))[None]
    m = torch.as_tensor(mask)

    def regress(v):
        flat = v.reshape(n, -1)[None]
        return dn.regress_out(flat, q)[0].reshape(v.shape) * m

    a = dn.smooth(regress(vols), m, fwhm=6.0, voxel_size=(3.0,) * 3)
    b = regress(dn.smooth(vols, m, fwhm=6.0, voxel_size=(3.0,) * 3))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


# ---------------------------------------------------------------- run level


def _write_run(tmp_path, rng, *, n=40, shape=(8, 9, 7), name="sub-01_task-rest_space-MNI_desc-preproc_bold.nii.gz"):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:7, 1:8, 1:6] = 1
    params = 0.001 * rng.standard_normal((n, 6)).cumsum(axis=0)
    motion_signal = params[:, 3]
    data = 100 + rng.standard_normal(shape + (n,)) + 50 * motion_signal
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_zooms((3.0, 3.0, 3.0, TR))
    bold = tmp_path / name
    nib.save(img, bold)
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine), mask_path)
    table = pd.DataFrame(params[:, [3, 4, 5, 0, 1, 2]], columns=["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"])
    table["csf"] = rng.standard_normal(n)
    conf = tmp_path / "confounds.tsv"
    table.to_csv(conf, sep="\t", index=False)
    return dn.RunFiles(bold=bold, mask=mask_path, confounds=conf), data, mask.astype(bool)


def _options(**kw):
    base = dict(acompcor=0, physio="no", fwhm=0.0, high_pass=0.01)
    base.update(kw)
    return dn.DenoiseOptions(**base)


def test_denoise_runs_writes_outputs_matching_lstsq(tmp_path, rng):
    files, data, mask = _write_run(tmp_path, rng)
    out = tmp_path / "out"
    paths = list(dn.denoise_runs([files], [out], _options(columns=("csf",)), device="cpu"))[0]
    assert paths["bold"].name == "sub-01_task-rest_space-MNI_desc-denoised_bold.nii.gz"
    design = pd.read_csv(paths["design"], sep="\t")
    assert list(design.columns[:7]) == ["rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z", "csf"]
    assert design.columns[-1] == "constant"
    y = data[mask].T
    x = design.to_numpy()
    ref = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    cleaned = nib.load(paths["bold"]).get_fdata()[mask].T
    np.testing.assert_allclose(cleaned, ref, atol=1e-4)  # design TSV written to 8 significant digits
    assert (paths["bold"].parent / "sub-01_task-rest_space-MNI_desc-denoised_bold.json").exists()


def test_clean_runs_matches_lstsq_then_scipy_smoothing(device, tmp_path, rng):
    """The whole per-run path (batch of two, regression, unmasking, smoothing) against NumPy/SciPy."""
    files, data, mask = _write_run(tmp_path, rng)
    (tmp_path / "two").mkdir()
    other, data2, _ = _write_run(tmp_path / "two", rng, n=36, name="sub-02_task-rest_space-MNI_desc-preproc_bold.nii.gz")
    other = dn.RunFiles(bold=other.bold, mask=files.mask, confounds=other.confounds)
    runs = [dn.prepare_run(f, _options(fwhm=6.0)) for f in (files, other)]
    outs = dn.clean_runs(runs, fwhm=6.0, device=device)
    sigma = dn.gaussian_sigma(6.0, (3.0, 3.0, 3.0))
    weight = ndimage.gaussian_filter(mask.astype(float), sigma, mode="constant")
    for run, raw, out in zip(runs, (data, data2), outs):
        y = raw[mask].T
        x = run.design.to_numpy()
        res = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        vol = np.zeros(mask.shape + (len(y),))
        vol[mask] = res.T
        ref = ndimage.gaussian_filter(vol, tuple(sigma) + (0,), mode="constant") / np.where(mask, weight, 1)[..., None]
        ref[~mask] = 0
        assert out.shape == ref.shape
        # float32 data of magnitude 100: residual error ~1e-5 before smoothing
        np.testing.assert_allclose(out, ref, atol=5e-5)


def test_too_few_degrees_of_freedom_names_the_file(tmp_path, rng):
    files, _, _ = _write_run(tmp_path, rng, n=20)
    with pytest.raises(InputError, match=r"desc-preproc_bold\.nii\.gz: 0 residual degrees of freedom left \(20 volumes kept, \d+ regressors\); need at least 10"):
        dn.prepare_run(files, _options(motion="24"))


def test_confound_length_mismatch_and_no_partial_output(tmp_path, rng):
    files, _, _ = _write_run(tmp_path, rng)
    short = tmp_path / "short.tsv"
    pd.read_csv(files.confounds, sep="\t").iloc[:-2].to_csv(short, sep="\t", index=False)
    bad = dn.RunFiles(bold=files.bold, mask=files.mask, confounds=short)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"short\.tsv has 38 rows but the image .*bold\.nii\.gz has 40 volumes"):
        list(dn.denoise_runs([bad], [out], _options(), device="cpu"))
    assert not out.exists() or not any(out.iterdir())


def test_acompcor_columns_length_checked_with_motion_par(tmp_path, rng):
    """The TSV's a_comp_cor_XX columns are checked even when motion comes from a .par (was a NaN-padded design)."""
    files, _, _ = _write_run(tmp_path, rng)
    par = tmp_path / "motion.par"
    np.savetxt(par, 0.001 * rng.standard_normal((40, 6)))
    short = tmp_path / "short.tsv"
    pd.DataFrame({f"a_comp_cor_{i:02d}": rng.standard_normal(30) for i in range(5)}).to_csv(short, sep="\t", index=False)
    bad = dn.RunFiles(bold=files.bold, mask=files.mask, confounds=short, motion_par=par)
    with pytest.warns(UserWarning, match="no WM/CSF maps"):
        with pytest.raises(InputError, match=r"short\.tsv has 30 rows but the image .*bold\.nii\.gz has 40 volumes"):
            dn.prepare_run(bad, _options(acompcor=5), load_data=False)


def test_confounds_without_motion_columns_serve_motion_none(tmp_path, rng):
    files, _, _ = _write_run(tmp_path, rng)
    csf_only = tmp_path / "csf_only.tsv"
    pd.read_csv(files.confounds, sep="\t")[["csf"]].to_csv(csf_only, sep="\t", index=False)
    run = dn.RunFiles(bold=files.bold, mask=files.mask, confounds=csf_only)
    prepared = dn.prepare_run(run, _options(motion="none", outlier_metric="none", columns=("csf",)), load_data=False)
    assert list(prepared.design.columns[:1]) == ["csf"]
    # what does need motion still asks for it
    with pytest.raises(InputError, match=r"csf_only\.tsv has no column\(s\) rot_x"):
        dn.prepare_run(run, _options(motion="none", columns=("csf",)), load_data=False)


def test_collect_runs_mask_override_serves_runs_without_one(tmp_path):
    func = tmp_path / "sub-01" / "func"
    func.mkdir(parents=True)
    (func / "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz").write_bytes(b"")
    template = tmp_path / "template_mask.nii.gz"
    with pytest.raises(InputError, match=r"no brain mask \(\*_desc-brain_mask.nii.gz\) beside .*; give one with mask$"):
        dn.collect_runs(tmp_path, tmp_path / "out")
    # --derivatives with --mask: the run has no mask of its own (was refused before the override applied)
    (files, dirs) = dn.collect_runs(tmp_path, tmp_path / "out", mask=template)
    assert files[0].mask == template and dirs == [tmp_path / "out" / "sub-01" / "func"]


def test_mask_grid_mismatch(tmp_path, rng):
    files, _, _ = _write_run(tmp_path, rng)
    other = tmp_path / "other_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), other)
    with pytest.raises(InputError, match="grid mismatch"):
        dn.prepare_run(dn.RunFiles(bold=files.bold, mask=other, confounds=files.confounds), _options())


def test_validation_pass_and_censoring(tmp_path, rng):
    files, _, _ = _write_run(tmp_path, rng)
    options = _options(outlier_threshold=0.0, outlier_metric="fd", motion="none", censor="drop")
    # every volume after the first moves: threshold 0 censors all but volume 0
    with pytest.raises(InputError, match="residual degrees of freedom"):
        dn.prepare_run(files, options, load_data=False)
    light = dn.prepare_run(files, _options(outlier_threshold=0.2), load_data=False)
    full = dn.prepare_run(files, _options(outlier_threshold=0.2))
    assert 0 < full.n_outliers < 20
    assert light.data.shape[1] == 0 and list(light.design.columns) == list(full.design.columns)
    assert full.n_outliers == sum(c.startswith("motion_outlier") for c in full.design.columns)


def test_acompcor_from_probseg_and_global_signal(tmp_path, rng):
    files, data, mask = _write_run(tmp_path, rng)
    wm = np.zeros(mask.shape, np.float32)
    wm[2:6, 2:7, 2:5] = 1.0
    csf = np.zeros(mask.shape, np.float32)
    csf[1:7, 1:8, 1] = 0.95
    for name, arr in (("wm", wm), ("csf", csf)):
        nib.save(nib.Nifti1Image(arr, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / f"{name}.nii.gz")
    files = dn.RunFiles(bold=files.bold, mask=files.mask, confounds=files.confounds, wm=tmp_path / "wm.nii.gz", csf=tmp_path / "csf.nii.gz")
    run = dn.prepare_run(files, _options(acompcor=3, erode=0, global_signal=True, acompcor_mode="separate"))
    cols = list(run.design.columns)
    assert cols[6:13] == ["wm_comp_cor_00", "wm_comp_cor_01", "wm_comp_cor_02", "csf_comp_cor_00", "csf_comp_cor_01", "csf_comp_cor_02", "global_signal"]
    np.testing.assert_allclose(run.design["global_signal"], data[mask].mean(axis=0), rtol=1e-5)
    with pytest.raises(InputError, match=r"CSF map .*csf\.nii\.gz leaves 0 voxels after threshold 0.9 and 1 erosion"):
        dn.prepare_run(files, _options(acompcor=3, erode=1, acompcor_mode="separate"))
    combined = dn.prepare_run(files, _options(acompcor=3, erode=1))  # WM alone has enough voxels
    assert "a_comp_cor_02" in combined.design.columns


# ---------------------------------------------------------------- simulated study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from gpuconn.study.simulate import simulate_study

    return simulate_study(tmp_path_factory.mktemp("study"), n_patients=3, n_controls=2, n_volumes=40, voxel_size=6.0, seed=1)


def _r2(data: np.ndarray, series) -> np.ndarray:
    """Squared correlation of each voxel (column) with one series."""
    x = np.asarray(series, dtype=float)
    x = (x - x.mean()) / x.std()
    y = data - data.mean(axis=0)
    return ((x @ y) / len(x) / np.maximum(y.std(axis=0), 1e-12)) ** 2


def test_simulated_nuisance_is_removed(study):
    files, _ = dn.collect_runs(study.root, study.root / "unused", participant_label=["001"])
    run = dn.prepare_run(files[0], dn.DenoiseOptions(fwhm=0.0))  # the reference-study model
    assert {"hr_crf", "rv_rrf", "a_comp_cor_04", "trans_z", "cosine_00", "constant"} <= set(run.design.columns)
    cleaned = dn.clean_runs([run], fwhm=0.0)[0][run.mask].T
    truth = pd.read_csv(study.root / "truth" / f"{files[0].bold.name.split('_space-')[0]}_timeseries.tsv", sep="\t")
    for name in ("hr_conv", "rv_conv", "tissue_0"):
        before, after = _r2(run.data, truth[name]).mean(), _r2(cleaned, truth[name]).mean()
        # measured: before 0.09-0.14, after < 0.01 (seed 1); assert a 5-fold drop
        assert after < 0.2 * before, (name, before, after)
    # the derived physiological regressors follow the planted ones
    assert np.corrcoef(run.design["hr_crf"], truth["hr_conv"])[0, 1] > 0.8
    assert np.corrcoef(run.design["rv_rrf"], truth["rv_conv"])[0, 1] > 0.9


def test_simulated_physio_recovers_heart_rate_and_rv(study):
    from gpuconn.subject import physio as ph

    files, _ = dn.collect_runs(study.root, study.root / "unused", participant_label=["002"])
    rec = ph.read_physio(files[0].physio)
    truth = pd.read_csv(study.root / "truth" / f"{files[0].bold.name.split('_space-')[0]}_timeseries.tsv", sep="\t")
    kw = dict(sampling_frequency=rec.sampling_frequency, tr=3.0, n_volumes=40)
    hr = ph.heart_rate(rec.data["cardiac"].to_numpy(), **kw)
    rv = ph.respiratory_volume(rec.data["respiratory"].to_numpy(), **kw)
    assert np.corrcoef(hr, truth["hr"])[0, 1] > 0.85  # measured 0.93 on sub-001
    assert np.corrcoef(rv, truth["rv"])[0, 1] > 0.85


def test_cli_denoise_derivatives_and_single_run(study, tmp_path, capsys):
    from gpuconn.cli.app import run

    out = tmp_path / "den"
    rc = run(["denoise", "--derivatives", str(study.root), "--participant-label", "004", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.rglob("*"))
    stem = "sub-004_ses-pre_task-rest_space-MNI152NLin2009cAsym_desc-denoised"
    mask = "sub-004_ses-pre_task-rest_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"  # the mask it was denoised in
    assert [mask, f"{stem}_bold.json", f"{stem}_bold.nii.gz", f"{stem}_design.tsv"] == [
        w for w in written if w.startswith("sub-004_")]
    files, _ = dn.collect_runs(study.root, out, participant_label=["004"])
    f = files[0]
    single = tmp_path / "single"
    args = ["denoise", "--bold", str(f.bold), "--mask", str(f.mask), "--confounds", str(f.confounds), "--physio", str(f.physio),
            "--wm", str(f.wm), "--csf", str(f.csf), "--out", str(single), "--quiet", "--device", "cpu"]  # fmt: skip
    assert run(args) == 0
    a = nib.load(next(out.rglob("*_bold.nii.gz"))).get_fdata()
    b = nib.load(next(single.glob("*_bold.nii.gz"))).get_fdata()
    np.testing.assert_allclose(a, b)


def test_cli_denoise_errors_leave_no_output(study, tmp_path, capsys):
    from gpuconn.cli.app import run

    out = tmp_path / "den"
    rc = run(["denoise", "--derivatives", str(study.root), "--column", "not_a_column", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no column(s) not_a_column; available: trans_x" in err
    assert not out.exists()
    rc = run(["denoise", "--derivatives", str(study.root), "--motion", "12", "--out", str(out), "--quiet"])
    assert rc == 2 and "--motion '12' is not one of 6, 24, none" in capsys.readouterr().err
    rc = run(["denoise", "--derivatives", str(study.root), "--physio", "p.tsv.gz", "--out", str(out)])
    assert rc == 2 and "--physio belongs to one run; use it with --bold, not --derivatives" in capsys.readouterr().err
    rc = run(["denoise", "--bold", "x.nii.gz", "--out", str(out)])
    assert rc == 2 and "--bold needs --mask" in capsys.readouterr().err


def test_per_volume_hr_rv_columns_are_convolved(tmp_path, rng):
    from gpuconn.subject.physio import physio_regressors

    files, _, _ = _write_run(tmp_path, rng)
    table = pd.read_csv(files.confounds, sep="\t")
    table["heart_rate"] = 60 + rng.standard_normal(len(table))
    table["respiratory_volume"] = 1 + 0.1 * rng.standard_normal(len(table))
    table.to_csv(files.confounds, sep="\t", index=False)
    run = dn.prepare_run(files, _options(physio="yes"))
    expected = physio_regressors(table["heart_rate"].to_numpy(), table["respiratory_volume"].to_numpy(), tr=TR)
    np.testing.assert_allclose(run.design[["hr_crf", "rv_rrf"]].to_numpy(), expected)
    table.drop(columns=["heart_rate"]).to_csv(files.confounds, sep="\t", index=False)
    with pytest.raises(InputError, match="^physio yes but no \\*_physio.tsv.gz and no heart_rate/respiratory_volume"):
        dn.prepare_run(files, _options(physio="yes"))


def test_drop_censoring_writes_fewer_volumes_and_records_them(tmp_path, rng):
    import json

    files, _, _ = _write_run(tmp_path, rng)
    censor = np.zeros((40, 2))
    censor[[5, 22], [0, 1]] = 1
    censor_file = tmp_path / "outliers.txt"
    np.savetxt(censor_file, censor, fmt="%d")  # as fsl_motion_outliers -o writes it
    files = dn.RunFiles(bold=files.bold, mask=files.mask, confounds=files.confounds, censor_file=censor_file)
    paths = list(dn.denoise_runs([files], [tmp_path / "out"], _options(censor="drop"), device="cpu"))[0]
    img = nib.load(paths["bold"])
    assert img.shape[-1] == 38 and img.header.get_zooms()[-1] == TR
    meta = json.loads(paths["bold"].with_name(paths["bold"].name.replace(".nii.gz", ".json")).read_text())["Parameters"]
    assert meta["CensoredVolumes"] == [5, 22] and meta["VolumesKept"] == 38
    assert len(pd.read_csv(paths["design"], sep="\t")) == 38


def test_probseg_at_another_resolution_is_resampled_to_the_bold_grid(tmp_path, rng):
    """fMRIPrep's res-1 anatomy beside a res-2 BOLD: a 1.5 mm copy of a 3 mm WM map gives the same components.

    The fine voxels 2i and 2i + 1 sit 0.75 mm either side of coarse voxel i's
    centre (origin -0.75 mm) and hold its value, so trilinear resampling
    gives the coarse map back exactly.
    """
    files, _, mask = _write_run(tmp_path, rng)
    wm = np.zeros(mask.shape, np.float32)
    wm[2:6, 2:7, 2:5] = 1.0
    csf = np.zeros(mask.shape, np.float32)
    csf[1:7, 1:8, 1] = 0.95
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    fine = np.diag([1.5, 1.5, 1.5, 1.0])
    fine[:3, 3] = -0.75
    nib.save(nib.Nifti1Image(wm, coarse), tmp_path / "wm.nii.gz")
    nib.save(nib.Nifti1Image(np.kron(wm, np.ones((2, 2, 2), np.float32)), fine), tmp_path / "wm_res-1.nii.gz")
    nib.save(nib.Nifti1Image(csf, coarse), tmp_path / "csf.nii.gz")
    options = _options(acompcor=3, erode=0, acompcor_mode="separate")
    same = dn.prepare_run(dn.RunFiles(bold=files.bold, mask=files.mask, confounds=files.confounds,
                                      wm=tmp_path / "wm.nii.gz", csf=tmp_path / "csf.nii.gz"), options)
    with pytest.warns(UserWarning, match=r"wm_res-1\.nii\.gz: its \(16, 18, 14\) grid of \(1.5, 1.5, 1.5\) mm is not the BOLD.s"):
        resampled = dn.prepare_run(dn.RunFiles(bold=files.bold, mask=files.mask, confounds=files.confounds,
                                               wm=tmp_path / "wm_res-1.nii.gz", csf=tmp_path / "csf.nii.gz"), options)
    np.testing.assert_allclose(resampled.design.to_numpy(float), same.design.to_numpy(float), rtol=1e-6, atol=1e-9)


def test_cli_denoise_sigterm_keeps_finished_runs_and_a_rerun_skips_them(study, tmp_path, capsys, monkeypatch):
    """SIGTERM (handled as Ctrl-C) during the 2nd run: exit 130 with one line, the 1st run's outputs stay (the
    2nd leaves nothing), a rerun skips the 1st and says so, --overwrite and a changed setting recompute (#16 item 4)."""
    import os
    import signal

    from gpuconn.cli.app import run

    out = tmp_path / "den"
    argv = ["denoise", "--derivatives", str(study.root), "--participant-label", "001", "004", "--fwhm", "0",
            "--out", str(out), "--quiet", "--device", "cpu"]
    files, out_dirs = dn.collect_runs(study.root, out, participant_label=["001", "004"])
    assert len(files) >= 3
    real, calls = dn.clean_runs, []

    def clean(runs, **kwargs):
        calls.append(runs[0].files.bold.name)
        if interrupt and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises KeyboardInterrupt here
        return real(runs, **kwargs)

    monkeypatch.setattr(dn, "clean_runs", clean)
    interrupt = True
    capsys.readouterr()
    assert run(argv) == 130
    err = capsys.readouterr().err
    assert err.strip() == (f"gpuconn denoise: interrupted after 1 of {len(files)} run(s); their outputs are kept in {out}, "
                           "and rerunning the same command skips them")
    first = dn.output_paths(files[0], out_dirs[0])
    assert all(p.exists() for p in first.values())
    kept = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert kept == sorted([*(p.name for p in first.values()), first["bold"].name.replace(".nii.gz", ".json")])
    stamp = first["bold"].stat().st_mtime_ns
    interrupt, calls[:] = False, []
    assert run(argv) == 0
    assert (f"1 of {len(files)} run(s) already denoised in {out} from the same inputs and settings, skipped "
            "(--overwrite recomputes them)") in capsys.readouterr().out
    assert len(calls) == len(files) - 1 and files[0].bold.name not in calls
    assert first["bold"].stat().st_mtime_ns == stamp
    calls[:] = []
    assert run([*argv, "--overwrite"]) == 0 and len(calls) == len(files)
    calls[:] = []
    assert run([*argv, "--fwhm", "4"]) == 0 and len(calls) == len(files)  # another setting (the last --fwhm): redone
    assert "skipped" not in capsys.readouterr().out
