"""FLAME1 / OLS / fixed effects (gpuconn.stats.flame) against per-voxel NumPy/SciPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from flame_data import near_threshold_data, reference_energy
from gpuconn.core.errors import InputError
from gpuconn.stats.flame import FE_DOF, _reml, check_flame_inputs, flame

# Search range of flame.py (b / scale in [1e-10, 1e3]), used by the reference too.
_LOW, _HIGH = np.log(1e-10), np.log(1e3)


def _reference_variance(y, z, s):
    """RE variance of one voxel with scipy.optimize.minimize_scalar, on the same scaled range."""
    z = z[:, np.any(z != 0, axis=0)]  # a group's rows may leave a column all zero
    scale = y.var() + s.mean()
    res = optimize.minimize_scalar(reference_energy, bounds=(_LOW, _HIGH), args=(y / np.sqrt(scale), z, s / scale),
                                   method="bounded", options={"xatol": 1e-10, "maxiter": 1000})
    return np.exp(res.x) * scale


def _reference_flame1(y, s, x, c, groups, dof=None):
    """Per-voxel FLAME1: variance per group, then GLS, t and z (default dof N - P)."""
    n, p = x.shape
    dof = n - p if dof is None else dof
    out = {k: [] for k in ("re", "pe", "cope", "varcope", "t", "z")}
    for v in range(y.shape[1]):
        b = np.array([_reference_variance(y[groups == g, v], x[groups == g], s[groups == g, v])
                      for g in np.unique(groups)])
        w = 1.0 / (s[:, v] + b[np.searchsorted(np.unique(groups), groups)])
        cov = np.linalg.inv((x.T * w) @ x)
        beta = cov @ (x.T * w) @ y[:, v]
        cope, varcope = c @ beta, c @ cov @ c
        t = cope / np.sqrt(varcope)
        for key, val in zip(out, (b, beta, cope, varcope, t, stats.norm.isf(stats.t.sf(t, dof)))):
            out[key].append(val)
    return {k: np.array(v) for k, v in out.items()}


def _simulate(rng, n=20, n_vox=25, re_var=1.0, effect=0.5):
    x = np.column_stack([np.ones(n), rng.standard_normal(n)])
    s = rng.uniform(0.2, 2.0, (n, n_vox))
    b = re_var * rng.uniform(0.0, 2.0, n_vox)
    b[:5] = 0.0  # some voxels without random effects (estimate at or near 0)
    y = effect * x[:, :1] + rng.standard_normal((n, n_vox)) * np.sqrt(s + b)
    return y, s, x


def test_reml_derivatives_match_finite_differences(rng):
    y = torch.as_tensor(rng.standard_normal((6, 12)))
    s = torch.as_tensor(rng.uniform(0.1, 1.0, (6, 12)))
    q = torch.as_tensor(np.linalg.qr(np.column_stack([np.ones(12), np.arange(12.0)]))[0])
    x = torch.as_tensor(rng.uniform(-3, 1, 6))
    _, d1, d2 = _reml(x, y, s, q, derivatives=True)
    # Central differences, |E| ~ 10: the first with h = 1e-5 (truncation h^2 ~ 1e-10,
    # round-off eps |E| / h ~ 1e-10); the second with h = 1e-3 (truncation ~ 1e-6,
    # round-off eps |E| / h^2 ~ 1e-9).
    e0 = _reml(x, y, s, q, derivatives=False)
    h = 1e-5
    e_plus, e_minus = (_reml(x + d, y, s, q, derivatives=False) for d in (h, -h))
    np.testing.assert_allclose(d1, (e_plus - e_minus) / (2 * h), rtol=1e-7, atol=1e-8)
    h = 1e-3
    e_plus, e_minus = (_reml(x + d, y, s, q, derivatives=False) for d in (h, -h))
    np.testing.assert_allclose(d2, (e_plus - 2 * e0 + e_minus) / h**2, rtol=1e-5, atol=1e-6)


def test_flame1_matches_scipy_reference(rng, device):
    y, s, x = _simulate(rng)
    c = np.array([[1.0, 0.0], [0.0, 1.0]])
    res = flame(y, s, x, c, run_mode="flame1", device=device, chunk=7)
    ref = [_reference_flame1(y, s, x, ci, np.ones(len(y), int)) for ci in c]
    scale = y.var(axis=0) + s.mean(axis=0)
    # 1e-5 (DESIGN.md): both searches stop at 1e-10 in log variance; the bounded
    # Brent reference resolves the mode to ~sqrt(eps) relative, far below 1e-5.
    np.testing.assert_allclose(res.re_variance[0], ref[0]["re"][:, 0], rtol=1e-5, atol=1e-5 * scale.max())
    np.testing.assert_allclose(res.pe.T, ref[0]["pe"], rtol=1e-5, atol=1e-8)
    for i in range(2):
        np.testing.assert_allclose(res.cope[i], ref[i]["cope"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(res.varcope[i], ref[i]["varcope"], rtol=1e-5)
        np.testing.assert_allclose(res.tstat[i], ref[i]["t"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(res.zstat[i], ref[i]["z"], rtol=1e-5, atol=1e-8)
    assert np.all(res.tdof == len(y) - 2)


def test_flame1_variance_groups_match_reference(rng):
    y, s, x = _simulate(rng, n=24, n_vox=12)
    groups = np.repeat([1, 2], 12)
    x = np.column_stack([groups == 1, groups == 2]).astype(float)  # two group means
    y[groups == 2] *= 2.0
    c = np.array([[1.0, -1.0]])
    res = flame(y, s, x, c, groups=groups, device="cpu")
    # flameo's FLAME1 dof: the smallest n_g - P_g of the groups in the contrast, 12 - 1 here.
    ref = _reference_flame1(y, s, x, c[0], groups, dof=11)
    assert np.all(res.tdof == 11)
    scale = y.var(axis=0) + s.mean(axis=0)
    np.testing.assert_allclose(res.re_variance.T, ref["re"], rtol=1e-5, atol=1e-5 * scale.max())  # as above
    np.testing.assert_allclose(res.zstat[0], ref["z"], rtol=1e-5, atol=1e-8)


def test_flame1_with_zero_varcopes_is_ols(rng):
    y, s, x = _simulate(rng, n_vox=10)
    c = np.array([[0.0, 1.0]])
    mixed = flame(y, np.zeros_like(s), x, c, run_mode="flame1", device="cpu")
    ols = flame(y, s, x, c, run_mode="ols", device="cpu")
    beta, rss = np.linalg.lstsq(x, y, rcond=None)[:2]
    se = np.sqrt(rss / (len(y) - 2) * np.linalg.inv(x.T @ x)[1, 1])
    np.testing.assert_allclose(ols.tstat[0], beta[1] / se, rtol=1e-10)  # float64 round-off
    # With s = 0 the REML mode is RSS / (N - P) exactly; the Newton stop at 1e-10 in log b bounds the error.
    np.testing.assert_allclose(mixed.re_variance[0], rss / (len(y) - 2), rtol=1e-8)
    for key in ("pe", "cope", "varcope", "tstat", "zstat"):
        np.testing.assert_allclose(getattr(mixed, key), getattr(ols, key), rtol=1e-8, atol=1e-12)


def test_fixed_effects_is_weighted_least_squares(rng):
    y, s, x = _simulate(rng, n_vox=8)
    c = np.array([[1.0, 0.0]])
    fe = flame(y, s, x, c, run_mode="fe", device="cpu")
    for v in range(y.shape[1]):
        cov = np.linalg.inv((x.T / s[:, v]) @ x)
        beta = cov @ (x.T / s[:, v]) @ y[:, v]
        np.testing.assert_allclose(fe.pe[:, v], beta, rtol=1e-10)  # float64 round-off
        np.testing.assert_allclose(fe.varcope[0, v], cov[0, 0], rtol=1e-10)
    assert np.all(fe.re_variance == 0) and np.all(fe.tdof == FE_DOF)


def test_f_test_of_one_contrast_is_t_squared(rng):
    y, s, x = _simulate(rng, n_vox=6)
    res = flame(y, s, x, np.array([[0.0, 1.0], [1.0, 0.0]]), ftests=np.array([[1, 0]]), device="cpu")
    np.testing.assert_allclose(res.fstat[0], res.tstat[0] ** 2, rtol=1e-10)  # identity, float64 round-off
    assert res.fdof1.tolist() == [1.0]


def test_flame1_variance_is_unbiased_on_simulated_two_level_data():
    """N = 40, heteroscedastic first-level variances, planted RE variance 1."""
    rng = np.random.default_rng(7)
    n, n_vox, planted = 40, 1500, 1.0
    x = np.column_stack([np.ones(n), rng.standard_normal(n)])
    s = rng.uniform(0.25, 2.0, (n, n_vox))
    y = x @ np.array([[0.3], [0.2]]) + rng.standard_normal((n, n_vox)) * np.sqrt(s + planted)
    est = flame(y, s, x, np.array([[1.0, 0.0]]), device="cpu").re_variance[0]
    se = est.std(ddof=1) / np.sqrt(n_vox)
    # Voxels are independent: the mean is off by < 3 standard errors with probability 0.997.
    assert abs(est.mean() - planted) < 3 * se, (est.mean(), se)


def test_constant_voxel_gives_zeros(rng):
    y, s, x = _simulate(rng, n_vox=3)
    y[:, 1] = 0.0
    s[:, 1] = 0.0
    res = flame(y, s, x, np.array([[1.0, 0.0]]), device="cpu")
    assert res.zstat[0, 1] == 0 and res.re_variance[0, 1] == 0 and np.all(np.isfinite(res.zstat))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("negative", "varcopes has 1 voxel(s) with negative, NaN or Inf variances"),
        ("nan", "varcopes has 1 voxel(s) with negative, NaN or Inf variances"),
        ("columns", "design has 20 columns for 20 subjects: no residual degrees of freedom"),
        ("groups", "groups has 19 rows but there are 20 subjects"),
        ("shape", "copes has shape (20, 4) but varcopes has (20, 3)"),
        ("mode", "run_mode 'flame3' is not one of fe, ols, flame1, flame12"),  # the CLI says --runmode
    ],
)
def test_bad_inputs_are_named(rng, change, message):
    y, s, x = _simulate(rng, n_vox=4)
    groups, mode = None, "flame1"
    if change == "negative":
        s[3, 2] = -1.0
    elif change == "nan":
        s[3, 2] = np.nan
    elif change == "columns":
        x = rng.standard_normal((20, 20))
    elif change == "groups":
        groups = np.ones(19)
    elif change == "shape":
        s = s[:, :3]
    else:
        mode = "flame3"
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_flame_inputs(y, s, x, groups=groups, run_mode=mode)


def test_t_fit_recovers_a_student_t():
    from gpuconn.stats.flame import _t_fit

    rng = np.random.default_rng(11)
    dof, scale = 6.0, 2.0
    samples = torch.as_tensor(1.5 + scale * rng.standard_t(dof, size=(20000, 3)))
    phi, nu = _t_fit(samples, torch.full((3,), 1.5, dtype=torch.float64))
    # Monte-Carlo error with 20000 draws: a few % on the scale and ~25% on the dof at nu = 6.
    np.testing.assert_allclose(np.sqrt(phi.numpy()), scale, rtol=0.05)
    np.testing.assert_allclose(nu.numpy(), dof, rtol=0.35)


def _flame12_data(rng, n=20, n_vox=30, re_var=0.8):
    x = np.column_stack([np.ones(n), rng.standard_normal(n)])
    s = rng.uniform(0.2, 1.0, (n, n_vox))
    effect = np.linspace(0.0, 2.5, n_vox)
    y = effect * np.sqrt(re_var) * x[:, :1] + rng.standard_normal((n, n_vox)) * np.sqrt(s + re_var)
    return y, s, x


def test_flame12_changes_only_voxels_flameo_passes_to_stage_2(rng, device):
    from gpuconn.stats.flame import McmcOptions

    y, s, x = _flame12_data(rng)
    c = np.array([[1.0, 0.0]])
    opts = McmcOptions(n_jumps=600, burnin=100, z_lower=2.0, z_upper=4.0)
    stage1 = flame(y, s, x, c, device=device)
    both = flame(y, s, x, c, run_mode="flame12", device=device, mcmc=opts)
    upper = stats.norm.isf(stats.t.sf(stage1.tstat[0], 1000))
    band = ~(((upper > 4) & (stage1.zstat[0] > 4)) | ((upper < 2) & (stage1.zstat[0] < 2)))
    np.testing.assert_array_equal(both.mcmc_mask, band)
    assert 0 < band.sum() < band.size
    for key in ("pe", "cope", "varcope", "tstat", "zstat", "tdof", "re_variance"):  # far from threshold: FLAME1's
        np.testing.assert_array_equal(getattr(both, key)[..., ~band], getattr(stage1, key)[..., ~band])
    assert np.all(both.tdof[0, band] != stage1.tdof[0, band]) and np.all(np.isfinite(both.zstat))
    again = flame(y, s, x, c, run_mode="flame12", device=device, mcmc=opts)
    np.testing.assert_array_equal(again.zstat, both.zstat)  # one seed, the same chains


def test_flame12_agrees_with_flame1_where_random_effects_dominate():
    from gpuconn.stats.flame import McmcOptions

    rng = np.random.default_rng(5)
    y, s, x = _flame12_data(rng, n=30, n_vox=24, re_var=4.0)
    c = np.array([[1.0, 0.0]])
    stage1 = flame(y, s, x, c, device="cpu")
    both = flame(y, s, x, c, run_mode="flame12", device="cpu",
                 mcmc=McmcOptions(n_jumps=3000, burnin=300, z_lower=-np.inf, z_upper=np.inf))
    assert both.mcmc_mask.all()
    # Same model, different inference (posterior t fit vs plug-in GLS). Over seeds 5-9 the t maps
    # correlated > 0.995 with median |dt| < 0.22, and near threshold (|z| < 3.5) max |dz| < 0.29;
    # the bounds below leave ~1.5-2x room. Far above threshold the fitted dof (10-500 vs N - P)
    # moves z a lot, which is why flameo sends only voxels near threshold to stage 2.
    assert np.corrcoef(stage1.tstat[0], both.tstat[0])[0, 1] > 0.99
    assert np.median(np.abs(both.tstat[0] - stage1.tstat[0])) < 0.35
    near = np.abs(stage1.zstat[0]) < 3.5
    assert near.sum() >= 5 and np.abs(both.zstat[0] - stage1.zstat[0])[near].max() < 0.5


def test_null_grf_cluster_fwer_is_not_inflated():
    """Cheap version of bench/bench_flame.py --fwer: FLAME1 + GRF clusters on null smoothed data."""
    import math

    from scipy import ndimage

    from gpuconn.stats.grf import estimate_smoothness, grf_cluster_p

    rng = np.random.default_rng(2)
    shape, n, n_sets = (20, 20, 14), 10, 12
    mask = np.zeros(shape, dtype=bool)
    mask[3:-3, 3:-3, 3:-3] = True
    sigma = 3.0 / math.sqrt(8 * math.log(2))
    x = np.ones((n, 1))
    hits = 0
    for _ in range(n_sets):
        noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma)[mask] for _ in range(n)])
        s = rng.uniform(0.1, 0.5, noise.shape)
        y = noise / noise.std() * np.sqrt(s + 0.5)
        res = flame(y, s, x, np.ones((1, 1)), device="cpu")
        smooth = estimate_smoothness(y - x @ res.pe, mask, dof=n - 1)
        _, p = grf_cluster_p(res.zstat[0], mask, z_threshold=2.3, smoothness=smooth)
        hits += any(v < 0.05 for v in p.values())
    # Nominal FWER 0.05: P(X >= 4) for X ~ Binomial(12, 0.05) is 0.002, so 4+ hits means inflation.
    assert hits <= 3, hits


# z of 24 near-threshold voxels (tests/flame_data.py): the mean of three FLAME1+2 chains of
# 50000 jumps (10x flameo's default, seeds 10-12), from `python bench/bench_flame.py --skip-speed --near`
# (bench/RESULTS.md). Its Monte Carlo standard error per voxel: median 0.038, at most 0.094.
_LONG_CHAIN_Z = np.array([2.747, 2.863, 2.930, 2.780, 2.542, 2.444, 2.170, 2.037, 2.292, 2.063, 2.973, 2.525,
                          2.853, 2.210, 2.131, 2.398, 2.755, 2.669, 2.604, 2.080, 1.646, 2.397, 2.547, 2.552])


def test_flame12_is_closer_than_flame1_to_a_long_chain_near_threshold():
    from gpuconn.stats.flame import McmcOptions

    y, s, x = near_threshold_data()
    c = np.ones((1, 1))
    z1 = flame(y, s, x, c, device="cpu").zstat[0]
    assert np.all((z1 > 2.0) & (z1 < 2.6))
    z12 = flame(y, s, x, c, device="cpu", run_mode="flame12",
                mcmc=McmcOptions(z_lower=-np.inf, z_upper=np.inf)).zstat[0]  # flameo's default chain, seed 10
    d1, d12 = np.abs(z1 - _LONG_CHAIN_Z), np.abs(z12 - _LONG_CHAIN_Z)
    # The reference's own error (median se 0.038) moves each distance by about that much; the mean
    # distances must differ by more. One default chain's sd per voxel is ~0.1 (5 seeds in the bench),
    # so |z12 - ref| itself stays within a few Monte Carlo sd: max 3 x 0.25 (the largest sd seen).
    assert d12.mean() + 0.038 < d1.mean(), (d12.mean(), d1.mean())
    assert np.median(d12) < np.median(d1)
    assert d12.max() < 0.75
