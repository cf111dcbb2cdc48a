"""Confound readers, motion metrics (FD, Jenkinson RMS), spikes, aCompCor."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from gpuconn.subject import confounds as cf
from gpuconn.core.errors import InputError


def _write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- readers


def test_read_motion_par(tmp_path):
    params = np.arange(18, dtype=float).reshape(3, 6) / 10
    path = tmp_path / "prefiltered_func_data_mcf.par"
    np.savetxt(path, params, fmt="%.6f", delimiter="  ")
    np.testing.assert_allclose(cf.read_motion_par(path), params)


def test_read_motion_par_wrong_columns(tmp_path):
    path = _write(tmp_path / "m.par", "1 2 3\n4 5 6\n")
    with pytest.raises(InputError, match=r"m\.par have 3 columns; expected 6"):
        cf.read_motion_par(path)


def test_read_matrix_header_and_errors(tmp_path):
    with_header = _write(tmp_path / "a.tsv", "x\ty\n1\t2\n3\t4\n")
    np.testing.assert_array_equal(cf.read_matrix(with_header), [[1, 2], [3, 4]])
    outliers = _write(tmp_path / "outliers.txt", "0 0\n1 0\n0 1\n")  # fsl_motion_outliers -o
    assert cf.read_matrix(outliers).shape == (3, 2)
    with pytest.raises(InputError, match="rows of different lengths"):
        cf.read_matrix(_write(tmp_path / "b.txt", "1 2\n3\n"))
    with pytest.raises(InputError, match="NaN"):
        cf.read_matrix(_write(tmp_path / "c.txt", "1 nan\n3 4\n"))
    with pytest.raises(InputError, match="not found"):
        cf.read_matrix(tmp_path / "missing.txt")


def test_read_matrix_binary_file(tmp_path):
    path = tmp_path / "motion.par.gz"
    path.write_bytes(gzip.compress(b"0 0 0 0 0 0\n" * 3))
    with pytest.raises(InputError, match=r"motion parameters .*motion\.par\.gz is not a text file"):
        cf.read_motion_par(path)


def test_read_fmriprep_confounds(tmp_path):
    path = _write(
        tmp_path / "sub-01_task-rest_desc-confounds_timeseries.tsv",
        "csf\tframewise_displacement\ttrans_x_derivative1\n1.0\tn/a\tn/a\n2.0\t0.1\t0.3\n3.0\t0.2\t0.4\n",
    )
    table = cf.read_fmriprep_confounds(path, ["csf", "framewise_displacement"])
    assert list(table.columns) == ["csf", "framewise_displacement"]
    np.testing.assert_allclose(table["framewise_displacement"], [0.0, 0.1, 0.2])
    with pytest.raises(InputError) as err:
        cf.read_fmriprep_confounds(path, ["csf", "white_matter"])
    msg = str(err.value)
    assert "no column(s) white_matter" in msg and "available: csf, framewise_displacement, trans_x_derivative1" in msg


def test_read_fmriprep_confounds_nan_after_first_row(tmp_path):
    path = _write(tmp_path / "c.tsv", "csf\n1.0\nn/a\n3.0\n")
    with pytest.raises(InputError, match=r"column\(s\) csf at row\(s\) \[1\]"):
        cf.read_fmriprep_confounds(path)


def test_read_fmriprep_confounds_text_cell(tmp_path):
    path = _write(tmp_path / "c.tsv", "csf\tglobal_signal\n1.0\t2.0\noops\t3.0\n")
    with pytest.raises(InputError, match=r"c\.tsv has non-numeric values \(.*'oops'\); expected numbers or n/a"):
        cf.read_fmriprep_confounds(path)


def test_fmriprep_motion_order_and_length(tmp_path):
    header = "trans_x\ttrans_y\ttrans_z\trot_x\trot_y\trot_z\n"
    path = _write(tmp_path / "c.tsv", header + "1\t2\t3\t0.1\t0.2\t0.3\n" * 4)
    params = cf.load_motion(confounds=path, n_volumes=4)
    np.testing.assert_allclose(params[0], [0.1, 0.2, 0.3, 1, 2, 3])
    with pytest.raises(InputError, match=r"c\.tsv has 4 rows but the image bold\.nii\.gz has 5 volumes"):
        cf.load_motion(confounds=path, n_volumes=5, bold="bold.nii.gz")
    assert cf.load_motion() is None


# ---------------------------------------------------------------- expansions and metrics


def test_friston24_by_hand():
    params = np.arange(18, dtype=float).reshape(3, 6)
    out = cf.friston24(params)
    assert out.shape == (3, 24)
    np.testing.assert_array_equal(out[:, :6], params)
    np.testing.assert_array_equal(out[:, 6:12], params[[0, 0, 1]])
    np.testing.assert_array_equal(out[:, 12:18], params**2)
    np.testing.assert_array_equal(out[:, 18:], params[[0, 0, 1]] ** 2)
    assert len(cf.friston24_names()) == 24


def test_framewise_displacement_by_hand():
    params = np.zeros((3, 6))
    params[1] = [0.01, 0, -0.02, 0.5, -0.25, 0]  # radians, mm
    params[2] = params[1]
    params[2, 5] = 1.0
    # FD_1 = 50 * (0.01 + 0.02) + 0.5 + 0.25 = 2.25; FD_2 = 1.0
    np.testing.assert_allclose(cf.framewise_displacement(params), [0.0, 2.25, 1.0])


def test_rigid_matrix_rotates_about_centre():
    centre = np.array([10.0, -20.0, 30.0])
    params = np.array([[0.1, -0.2, 0.3, 0.0, 0.0, 0.0]])
    m = cf.rigid_matrices(params, center=centre)[0]
    np.testing.assert_allclose(m[:3, :3] @ centre + m[:3, 3], centre, atol=1e-12)
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m[:3, :3]), 1.0)


def test_rms_pure_translation_and_rotation_by_hand():
    params = np.zeros((3, 6))
    params[1, 3:] = [3.0, 4.0, 0.0]  # |t| = 5 mm
    theta = 0.02
    params[2, 2] = theta  # rotation about z, no translation
    absolute, relative = cf.rms_displacement(params)
    # rotation by theta: A = Rz - I, trace(A^T A) = 4 (1 - cos theta)
    rot_rms = np.sqrt(80.0**2 / 5 * 4 * (1 - np.cos(theta)))
    np.testing.assert_allclose(absolute, [0.0, 5.0, rot_rms], rtol=1e-12)
    # volume 1 -> 2: M2 M1^-1 - I has A = Rz - I and t = -Rz t1
    t1 = np.array([3.0, 4.0, 0.0])
    rz = cf.rigid_matrices(params)[2, :3, :3]
    a = rz - np.eye(3)
    expected = np.sqrt(80.0**2 / 5 * np.trace(a.T @ a) + (rz @ -t1) @ (rz @ -t1))
    np.testing.assert_allclose(relative, [0.0, 5.0, expected], rtol=1e-12)


def test_jenkinson_rms_is_mean_square_displacement_over_sphere(rng):
    """The closed form against a Monte-Carlo mean of |M x - x|^2 over the ball (standard error ~0.3 %)."""
    centre = np.array([5.0, -3.0, 12.0])
    params = np.array([[0.05, -0.03, 0.04, 1.0, -2.0, 0.5], [-0.02, 0.06, 0.01, -0.5, 1.0, 2.0]])
    m1, m2 = cf.rigid_matrices(params, center=(0.0, 0.0, 0.0))
    direction = rng.standard_normal((400_000, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    points = centre + 80.0 * direction * rng.random((400_000, 1)) ** (1 / 3)
    homog = np.c_[points, np.ones(len(points))]
    moved_ref = homog @ m1.T  # positions under M1
    moved = moved_ref @ (m2 @ np.linalg.inv(m1)).T
    mc = np.sqrt(np.mean(np.sum((moved - moved_ref)[:, :3] ** 2, axis=1)))
    # closed form takes the sphere centred at c in the frame of M1
    closed = cf.jenkinson_rms(m1, m2, center=centre)
    assert closed == pytest.approx(mc, rel=0.01)


def test_rms_independent_of_centre_when_rotating_about_it():
    params = np.array([[0.0] * 6, [0.05, -0.03, 0.04, 1.0, -2.0, 0.5], [0.02, 0.01, -0.01, 0.0, 0.5, 0.0]])
    a0, r0 = cf.rms_displacement(params)
    a1, r1 = cf.rms_displacement(params, center=(45.0, -60.0, 30.0))
    np.testing.assert_allclose(a0, a1, rtol=1e-10)
    np.testing.assert_allclose(r0, r1, rtol=1e-10)


def test_spike_regressors_like_fsl_motion_outliers():
    spikes = cf.spike_regressors(np.array([0.0, 0.6, 0.2, 0.9, 0.5]), 0.5)
    expected = np.zeros((5, 2))
    expected[1, 0] = expected[3, 1] = 1
    np.testing.assert_array_equal(spikes, expected)
    assert cf.spike_regressors(np.zeros(4), 0.5).shape == (4, 0)


def test_tissue_mask_threshold_and_erosion():
    prob = np.zeros((7, 7, 7))
    prob[1:6, 1:6, 1:6] = 0.95
    prob[3, 3, 3] = 0.5
    assert cf.tissue_mask(prob, erode=0).sum() == 124
    eroded = cf.tissue_mask(prob, threshold=0.9, erode=1)
    # the 3x3x3 core minus the low-probability centre and its 6 neighbours
    assert eroded.sum() == 27 - 7


# ---------------------------------------------------------------- aCompCor


def _numpy_compcor(signal: np.ndarray, k: int) -> np.ndarray:
    t = np.linspace(-1, 1, signal.shape[0])
    trend = np.c_[np.ones_like(t), t]
    x = signal - trend @ np.linalg.lstsq(trend, signal, rcond=None)[0]
    std = x.std(axis=0, ddof=1)
    varying = std > 1e-9 * np.abs(x).max()  # a constant voxel leaves rounding noise only
    x = np.where(varying, x / np.where(varying, std, 1), 0)
    u, _, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :k]


def _match_sign(a, b):
    return a * np.sign(np.sum(a * b, axis=0))


def test_acompcor_matches_numpy_svd(device, rng):
    n = 40
    # six well-separated components so the top five are well defined
    latent = np.linalg.qr(rng.standard_normal((n, 6)))[0] * [60.0, 45.0, 35.0, 25.0, 18.0, 12.0]
    tissue = (latent @ rng.standard_normal((6, 300)) + rng.standard_normal((n, 300)) + 100).astype(np.float32)
    tissue[:, 7] = 50.0  # a constant voxel stays out of the PCA
    comps = cf.acompcor(tissue, n_components=5, device=device)
    ref = _numpy_compcor(tissue.astype(float), 5)
    # float32 input, float64 PCA: components agree to ~1e-6; 1e-5 leaves margin
    np.testing.assert_allclose(_match_sign(comps, ref), ref, atol=1e-5)
    np.testing.assert_allclose(comps.T @ comps, np.eye(5), atol=1e-10)
    assert np.all(comps[np.abs(comps).argmax(axis=0), range(5)] > 0)


def test_acompcor_batch_with_different_voxel_counts(device, rng):
    latent = np.linalg.qr(rng.standard_normal((30, 4)))[0] * [60.0, 40.0, 25.0, 15.0]
    signals = [(latent @ rng.standard_normal((4, v)) + rng.standard_normal((30, v))).astype(np.float32) for v in (40, 90)]
    batch = cf.acompcor(signals, n_components=3, device=device)
    assert batch.shape == (2, 30, 3)
    for out, sig in zip(batch, signals):
        ref = _numpy_compcor(sig.astype(float), 3)
        np.testing.assert_allclose(_match_sign(out, ref), ref, atol=1e-5)


def test_acompcor_takes_device_option_values(rng):
    # 'auto' (the --device default) was handed to torch.device, which raised a bare RuntimeError
    signal = rng.standard_normal((30, 20))
    assert cf.acompcor(signal, n_components=3, device="auto").shape == (30, 3)


def test_acompcor_too_few_voxels(rng):
    with pytest.raises(InputError, match=r"at least 5 voxels.*shape \(30, 3\)"):
        cf.acompcor(rng.standard_normal((30, 3)), n_components=5)
