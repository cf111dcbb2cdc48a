"""Permutation engine: agreement with a plain NumPy loop, the spatial hook, chunking, OOM, outputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from gpuconn.errors import InputError
from gpuconn.stats.permute import make_scheme
from gpuconn.stats.randomise import run_permutation_test


def _reference_t(y: np.ndarray, design: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """Plain OLS t of one contrast for every column of ``y`` (lstsq, float64)."""
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    dof = design.shape[0] - np.linalg.matrix_rank(design)
    var = (resid**2).sum(0) / dof * (contrast @ np.linalg.pinv(design.T @ design) @ contrast)
    return contrast @ beta / np.sqrt(var)


def _reference_null(data, design, contrast, nuisance_cols, orders, signs):
    """Freedman-Lane by hand: residualise on the nuisance, rearrange, refit the full model."""
    y = np.asarray(data, dtype=np.float64)
    z = design[:, nuisance_cols]
    resid = y - z @ np.linalg.lstsq(z, y, rcond=None)[0] if z.shape[1] else y
    stats = np.array([_reference_t(s[:, None] * resid[o], design, contrast) for o, s in zip(orders, signs)])
    return stats


def _counting_p(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """randomise's counting rule over a (n_perm, n_voxels) table, row 0 observed."""
    observed = stats[0]
    p_unc = (stats >= observed).mean(0)
    p_fwe = (stats.max(1)[:, None] >= observed[None]).mean(0)
    return p_unc, p_fwe


@pytest.fixture
def two_sample(rng):
    n, v = 24, 60
    group = np.r_[np.ones(12), np.zeros(12)]
    age = rng.normal(40, 10, n)
    design = np.c_[group, 1 - group, age - age.mean()]
    data = rng.normal(size=(n, v)) + 0.05 * age[:, None]
    data[:12, :10] += 1.0
    return data.astype(np.float32), design, np.array([[1.0, -1.0, 0.0]])


def test_matches_numpy_loop_over_same_permutations(two_sample, device):
    data, design, contrast = two_sample
    result = run_permutation_test(data, design, contrast, n_perm=200, seed=3, device=device, chunk=37)
    scheme = make_scheme(design, n_perm=200, seed=3)
    orders, signs = scheme.chunk(0, scheme.n_perm)
    # Nuisance of contrast [1, -1, 0] spans the intercept (g1 + g2) and age.
    z = np.c_[np.ones(24), design[:, 2]]
    y = data.astype(np.float64)
    resid = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]
    stats = np.array([_reference_t(s[:, None] * resid[o], design, contrast[0]) for o, s in zip(orders, signs)])
    got = result["tstat1"]
    # float32 product: relative error ~1e-6; 1e-4 in t is the documented budget.
    np.testing.assert_allclose(got.stat, stats[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.null_max, stats.max(1), rtol=1e-4, atol=1e-4)
    p_unc, p_fwe = _counting_p(stats)
    np.testing.assert_array_equal(got.p_fwe, p_fwe)
    np.testing.assert_array_equal(got.p_uncorrected, p_unc)


def test_identity_spatial_transform_reproduces_voxelwise(two_sample):
    data, design, contrast = two_sample
    result = run_permutation_test(data, design, contrast, n_perm=100, seed=1, spatial={"same": lambda s: s})
    got = result["tstat1"]
    np.testing.assert_array_equal(got.spatial["same"].p_fwe, got.p_fwe)
    np.testing.assert_array_equal(got.spatial["same"].null_max, got.null_max)
    np.testing.assert_array_equal(got.spatial["same"].stat, got.stat)


def test_spatial_transform_on_exhaustive_sign_flips():
    # One-sample, 5 observations: all 2**5 = 32 sign flips are enumerated.
    data = np.array(
        [[1.0, 0.5, -0.2], [0.8, 0.1, 0.3], [1.2, -0.4, 0.1], [0.9, 0.7, -0.5], [1.1, 0.2, 0.4]], dtype=np.float32
    )

    def smooth(stats: torch.Tensor) -> torch.Tensor:
        """A made-up 'spatial' statistic: each voxel plus half its right-hand neighbour, floored at 0."""
        shifted = torch.nn.functional.pad(stats[:, 1:], (0, 1))
        return (stats + 0.5 * shifted).clamp_min(0)

    result = run_permutation_test(data, np.ones((5, 1)), np.ones((1, 1)), n_perm=0, spatial={"smooth": smooth})
    assert result.scheme.exhaustive and result.scheme.n_perm == 32 and result.scheme.method == "flip"
    orders, signs = result.scheme.chunk(0, 32)
    stats = _reference_null(data, np.ones((5, 1)), np.ones(1), [], orders, signs)
    mapped = np.clip(stats + 0.5 * np.pad(stats[:, 1:], ((0, 0), (0, 1))), 0, None)
    _, p_fwe = _counting_p(mapped)
    got = result["tstat1"].spatial["smooth"]
    np.testing.assert_allclose(got.stat, mapped[0], rtol=1e-5)
    np.testing.assert_array_equal(got.p_fwe, p_fwe)
    # Voxel 0 is positive in every observation: only the identity reaches its value.
    assert got.p_fwe[0] == pytest.approx(1 / 32)


def test_spatial_transform_wrong_shape_is_reported(two_sample):
    data, design, contrast = two_sample
    with pytest.raises(ValueError, match="spatial transform 'bad' on tstat1 returned"):
        run_permutation_test(data, design, contrast, n_perm=10, spatial={"bad": lambda s: s[:, :3]})
