"""Every permutation statistic within 1e-5 (relative) of float64, and byte-identical whatever the chunking.

The float64 reference is written out separately from the engine: for each
rearrangement ``P`` (order and signs) the Freedman-Lane data are ``P e`` with
``e`` the residuals of the data on the nuisance, and the statistic is that of
an ordinary least-squares fit of the full design (``numpy.linalg.lstsq``),
``t = c'b / sqrt(s^2 c'(M'M)^-1 c)`` or the F of the contrast rows. The hard
voxels are those whose model explains almost all of the variance
(``1 - R^2`` down to 1e-6), where ``RSS = ||e||^2 - ||Q'Pe||^2`` cancels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuconn.stats.glm import partition
from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.options import PermutationOptions

# The bound the issue and DESIGN.md set for every statistic, observed or permuted.
RTOL = 1e-5


def _reference(data, design, contrast, orders, signs, kind):
    """Freedman-Lane statistics of each rearrangement, float64 lstsq (slow and plain)."""
    data = np.asarray(data, dtype=np.float64)
    contrast = np.atleast_2d(contrast)
    _, nuisance = partition(design, contrast)
    if nuisance.shape[1]:
        fit = nuisance @ np.linalg.lstsq(nuisance, data, rcond=None)[0]
        resid = data - fit
    else:
        resid = data
    n_obs, n_reg = design.shape
    dof = n_obs - np.linalg.matrix_rank(design)
    xtx_inv = np.linalg.pinv(design.T @ design)
    out = []
    for order, sign in zip(orders, signs):
        y = sign[:, None] * resid[order]
        beta = np.linalg.lstsq(design, y, rcond=None)[0]
        sigma2 = ((y - design @ beta) ** 2).sum(0) / dof
        effect = contrast @ beta
        if kind == "t":
            out.append(effect[0] / np.sqrt(sigma2 * (contrast @ xtx_inv @ contrast.T)[0, 0]))
        else:
            middle = np.linalg.inv(contrast @ xtx_inv @ contrast.T)
            out.append(np.einsum("iv,ij,jv->v", effect, middle, effect) / contrast.shape[0] / sigma2)
    return np.array(out)


def _near_collinear_data(rng, design, n_vox, weight):
    """Voxels whose model explains 1 - R^2 from ~1 down to ~1e-6 of their variance."""
    effects = rng.normal(size=(design.shape[1], n_vox))
    noise = rng.normal(size=(design.shape[0], n_vox)) * np.logspace(0, -3, n_vox)[None]
    return (weight * design @ effects + noise).astype(np.float32)


def _designs(rng, n):
    group = np.r_[np.ones(n // 2), np.zeros(n - n // 2)]
    covariates = rng.normal(size=(n, 2))
    return {
        "one_sample": (np.ones((n, 1)), np.array([[1.0]]), "flip", "t"),
        "two_sample_covariates": (np.c_[group, 1 - group, covariates], np.array([[1.0, -1.0, 0, 0]]), "permute", "t"),
        "regression": (np.c_[np.ones(n), rng.normal(size=n), covariates[:, 0]], np.array([[0, 1.0, 0]]), "permute",
                       "t"),
        "f_two_columns": (np.c_[np.ones(n), covariates], np.array([[0, 1.0, 0], [0, 0, 1.0]]), "permute", "f"),
    }


@pytest.mark.parametrize("n_obs", [8, 13, 40, 400])
@pytest.mark.parametrize("name", ["one_sample", "two_sample_covariates", "regression", "f_two_columns"])
def test_every_statistic_within_1e5_of_float64(rng, name, n_obs):
    design, contrast, method, kind = _designs(rng, n_obs)[name]
    data = _near_collinear_data(rng, design, n_vox=60, weight=3.0)
    if kind == "t":
        result = run_permutation_test(data, design, contrast,
                                      permutation=PermutationOptions(n_perm=40, seed=3, method=method) )
    else:
        ftests = np.ones((1, contrast.shape[0]), dtype=int)
        result = run_permutation_test(data, design, contrast, ftests=ftests,
                                      permutation=PermutationOptions(n_perm=40, seed=3, method=method) )
    scheme = result.scheme
    orders, signs = scheme.chunk(0, scheme.n_perm)
    name_stat = "tstat1" if kind == "t" else "fstat1"
    expected = _reference(data, design, contrast, orders, signs, kind)
    got_observed = result[name_stat].stat
    np.testing.assert_allclose(got_observed, expected[0], rtol=RTOL)
    # The null maxima are statistics of single rearrangements: each within 1e-5 of its float64 value.
    np.testing.assert_allclose(result[name_stat].null_max, expected.max(axis=1), rtol=RTOL)


def test_observed_t_of_a_13_observation_study_design_is_float64_exact(rng):
    """The case the issue measured at 1.9e-4: a strong effect on 13 observations."""
    n = 13
    design = np.c_[np.ones(n), np.linspace(-1, 1, n), rng.normal(size=n)]
    data = (design @ np.array([[5.0], [40.0], [1.0]]) + 1e-3 * rng.normal(size=(n, 1))).astype(np.float32)
    data = np.repeat(data, 3, axis=1)
    result = run_permutation_test(data, design, np.array([[0, 1.0, 0]]), permutation=PermutationOptions(n_perm=1))
    expected = _reference(data, design, np.array([[0, 1.0, 0]]), np.arange(n)[None], np.ones((1, n)), "t")[0]
    np.testing.assert_allclose(result["tstat1"].stat, expected, rtol=RTOL)


@pytest.fixture(scope="module")
def large_problem():
    """50,000 voxels x 100 observations: the size the issue asks the halving test to use."""
    rng = np.random.default_rng(77)
    n, n_vox = 100, 50_000
    group = np.r_[np.ones(50), np.zeros(50)]
    design = np.c_[group, 1 - group, rng.normal(size=(n, 2))]
    data = rng.normal(size=(n, n_vox)).astype(np.float32)
    data[:50, :500] += 0.8
    return data, design, np.array([[1.0, -1.0, 0, 0]])


def test_oom_halving_and_threads_give_byte_identical_results_and_float64_maxima(large_problem, oom_once_above):
    data, design, contrast = large_problem
    n_perm = 48
    unhalved = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=9),
                                    chunk=n_perm)["tstat1"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=9),
                                          chunk=7)["tstat1"]
    finally:
        torch.set_num_threads(threads)
    failed = oom_once_above(12)
    halved = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=9),
                                  chunk=n_perm)["tstat1"]
    assert failed == [n_perm]
    for other in (halved, one_thread):
        for key in ("stat", "null_max", "p_uncorrected", "p_fwe"):
            np.testing.assert_array_equal(getattr(other, key), getattr(unhalved, key))
    scheme = run_permutation_test(data[:, :10], design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=9)
                                  ).scheme
    orders, signs = scheme.chunk(0, n_perm)
    expected = _reference(data, design, contrast, orders, signs, "t").max(axis=1)
    np.testing.assert_allclose(unhalved.null_max, expected, rtol=RTOL)
