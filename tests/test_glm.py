"""GLM statistics against scipy.stats / lstsq references; partitioning; t/F to z."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from gpuconn.stats.glm import contrast_model, glm_statistic, partition, permuted_statistics, residualise
from gpuconn.stats.zstat import f_to_z, t_to_z

# Statistics are computed in float64 and rounded once to float32 (relative error ~6e-8);
# 1e-5 is the bound the design document sets (tests/test_precision.py holds the hard cases).
RTOL = 1e-5


def _stat(data, design, contrast, device, kind="t"):
    return glm_statistic(torch.as_tensor(data, dtype=torch.float32), design, np.asarray(contrast, float),
                         kind=kind, device=device).cpu().numpy()


def test_one_sample_equals_ttest_1samp(rng, device):
    data = rng.normal(0.3, 1.0, size=(25, 40))
    got = _stat(data, np.ones((25, 1)), [1.0], device)
    np.testing.assert_allclose(got, stats.ttest_1samp(data, 0).statistic, rtol=RTOL)


def test_two_sample_equals_ttest_ind(rng, device):
    data = rng.normal(size=(30, 40))
    data[:12] += 0.5
    group = np.r_[np.ones(12), np.zeros(18)]
    got = _stat(data, np.c_[group, 1 - group], [1.0, -1.0], device)
    np.testing.assert_allclose(got, stats.ttest_ind(data[:12], data[12:]).statistic, rtol=RTOL)


def test_paired_full_design_equals_ttest_rel(rng, device):
    n = 10
    pre = rng.normal(size=(n, 30))
    post = pre + rng.normal(0.4, 0.5, size=(n, 30))
    condition = np.r_[-np.ones(n), np.ones(n)]
    subjects = np.vstack([np.eye(n), np.eye(n)])
    got = _stat(np.vstack([pre, post]), np.c_[condition, subjects], np.r_[1.0, np.zeros(n)], device)
    np.testing.assert_allclose(got, stats.ttest_rel(post, pre).statistic, rtol=RTOL)


def test_regression_equals_linregress(rng, device):
    x = rng.normal(size=40)
    data = 0.3 * x[:, None] + rng.normal(size=(40, 5))
    got = _stat(data, np.c_[np.ones(40), x - x.mean()], [0.0, 1.0], device)
    for v in range(5):
        fit = stats.linregress(x, data[:, v])
        assert got[v] == pytest.approx(fit.slope / fit.stderr, rel=RTOL)


def test_t_with_covariates_equals_lstsq(rng, device):
    n = 35
    design = np.c_[np.ones(n), rng.normal(size=(n, 3))]
    data = design @ rng.normal(size=(4, 20)) + rng.normal(size=(n, 20))
    contrast = np.array([0.0, 1.0, -0.5, 2.0])
    beta, *_ = np.linalg.lstsq(design, data, rcond=None)
    sigma2 = ((data - design @ beta) ** 2).sum(0) / (n - 4)
    expected = contrast @ beta / np.sqrt(sigma2 * (contrast @ np.linalg.inv(design.T @ design) @ contrast))
    np.testing.assert_allclose(_stat(data, design, contrast, device), expected, rtol=RTOL)


def test_f_equals_reduced_versus_full_model(rng, device):
    n = 40
    design = np.c_[np.ones(n), rng.normal(size=(n, 3))]
    data = design @ rng.normal(size=(4, 15)) + rng.normal(size=(n, 15))
    contrast = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])
    _, nuisance = partition(design, contrast)

    def rss(x):
        return ((data - x @ np.linalg.lstsq(x, data, rcond=None)[0]) ** 2).sum(0)

    expected = ((rss(nuisance) - rss(design)) / 2) / (rss(design) / (n - 4))
    np.testing.assert_allclose(_stat(data, design, contrast, device, kind="f"), expected, rtol=RTOL)


def test_f_of_one_contrast_is_t_squared(rng):
    design = np.c_[np.ones(20), rng.normal(size=20)]
    data = rng.normal(size=(20, 10))
    t = _stat(data, design, [0.0, 1.0], "cpu")
    f = _stat(data, design, [[0.0, 1.0]], "cpu", kind="f")
    np.testing.assert_allclose(f, t**2, rtol=RTOL)


def test_partition_is_orthogonal_and_spans_the_design(rng):
    design = np.c_[np.ones(20), rng.normal(size=(20, 3))]
    interest, nuisance = partition(design, np.array([0.0, 1.0, 1.0, 0.0]))
    assert interest.shape == (20, 1) and nuisance.shape == (20, 3)
    np.testing.assert_allclose(interest.T @ nuisance, 0, atol=1e-10)
    assert np.linalg.matrix_rank(np.c_[interest, nuisance, design]) == 4


def test_dropping_invariant_rows_keeps_statistics(rng):
    # Under plain permutation the intercept row of Q'P e is always 0 and is skipped.
    n = 22
    design = np.c_[np.ones(n), rng.normal(size=(n, 2))]
    data = torch.as_tensor(rng.normal(size=(n, 30)), dtype=torch.float32)
    full = contrast_model(design, np.array([0.0, 1.0, 0.0]), kind="t", device=torch.device("cpu"))
    reduced = contrast_model(design, np.array([0.0, 1.0, 0.0]), kind="t", device=torch.device("cpu"),
                             invariant=np.ones((n, 1)))
    assert reduced.rows.shape[0] == full.rows.shape[0] - 1
    orders = torch.as_tensor(np.array([np.arange(n), rng.permutation(n), rng.permutation(n)]))
    signs = torch.ones((3, n), dtype=torch.float64)
    got = [permuted_statistics(m, *residualise(data, m), orders, signs) for m in (full, reduced)]
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)


def test_constant_voxel_gives_zero_not_nan(rng):
    data = rng.normal(size=(15, 4))
    data[:, 1] = 1234.5
    data[:, 2] = 0.0
    got = _stat(data, np.c_[np.ones(15), rng.normal(size=15)], [0.0, 1.0], "cpu")
    assert np.all(np.isfinite(got)) and got[1] == 0 and got[2] == 0


def test_dof_ignores_redundant_rank():
    model = contrast_model(np.c_[np.ones(10), np.arange(10.0)], np.array([0.0, 1.0]), kind="t",
                           device=torch.device("cpu"))
    assert model.df == (1, 8)


@pytest.mark.parametrize("dof", [3, 12, 180])
def test_t_to_z_matches_scipy_and_is_symmetric(dof):
    t = np.array([-6.0, -2.0, -0.3, 0.0, 0.3, 2.0, 6.0])
    expected = stats.norm.isf(stats.t.sf(t, dof))
    np.testing.assert_allclose(t_to_z(t, dof), expected, rtol=1e-9, atol=1e-12)


def test_t_to_z_extreme_tails_are_finite_and_monotone():
    t = np.array([50.0, 1e3, 1e6, 1e20, 1e300])
    z = t_to_z(t, 10)
    assert np.all(np.isfinite(z)) and np.all(np.diff(z) > 0)
    np.testing.assert_allclose(t_to_z(-t, 10), -z)
    # scipy's sf underflows to 0 (z = inf) here; the log-survival path does not.
    assert stats.t.sf(1e40, 10) == 0 and np.isfinite(t_to_z(np.array([1e40]), 10)).all()


@pytest.mark.parametrize(("df1", "df2"), [(1, 10), (3, 40), (5, 180)])
def test_f_to_z_matches_scipy(df1, df2):
    f = np.array([0.2, 1.0, 4.0, 15.0])
    expected = stats.norm.isf(stats.f.sf(f, df1, df2))
    np.testing.assert_allclose(f_to_z(f, df1, df2), expected, rtol=1e-9)


def test_f_to_z_extremes_are_finite():
    z = f_to_z(np.array([0.0, 1e-12, 1e8, 1e200, 1e300]), 2, 20)
    assert np.all(np.isfinite(z)) and np.all(np.diff(z) > 0)
