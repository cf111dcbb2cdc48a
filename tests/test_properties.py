"""Property tests (hypothesis) of the core numerics.

- GLM t and F statistics are invariant to rescaling design columns (t
  changes sign with the sign of the tested column's scale) and equivariant
  to voxel order;
- permutation p-values (uncorrected, FWER, FDR, spatial) lie in [1/n, 1]
  and FWER p >= uncorrected p;
- TFCE is monotone in the input map: raising any voxels never lowers any
  voxel's TFCE (exact integral, and the stepped sum with a fixed step as
  randomise uses; the stepped sum with a per-map step is not monotone, as
  its thresholds move with the map's maximum).

Tolerances: statistics are float32 maps computed from float64 designs;
``rtol=1e-4, atol=1e-4`` is the design's t error budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpuconn.stats.glm import glm_statistic
from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.tfce import tfce
from gpuconn.stats.options import PermutationOptions

SETTINGS = settings(max_examples=30, deadline=None)
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _problem(seed: int, n_obs: int, n_reg: int, n_vox: int):
    rng = np.random.default_rng(seed)
    design = np.c_[np.ones(n_obs), rng.standard_normal((n_obs, n_reg - 1))]
    data = (rng.standard_normal((n_obs, n_vox)) + design[:, 1:2] * rng.standard_normal(n_vox)).astype(np.float32)
    return design, data


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n_obs=st.integers(8, 20),
    n_reg=st.integers(2, 4),
    scales=arrays(np.float64, 4, elements=st.floats(0.05, 20.0)),
    negate=arrays(np.bool_, 4),
    tested=st.integers(1, 3),
)
def test_glm_statistics_invariant_to_column_scaling(seed, n_obs, n_reg, scales, negate, tested):
    design, data = _problem(seed, n_obs, n_reg, 15)
    tested = min(tested, n_reg - 1)
    factors = np.where(negate, -scales, scales)[:n_reg]
    contrast = np.eye(n_reg)[tested]
    t = glm_statistic(data, design, contrast, kind="t").numpy()
    t_scaled = glm_statistic(data, design * factors, contrast, kind="t").numpy()
    np.testing.assert_allclose(t_scaled, np.sign(factors[tested]) * t, **TOL)
    f_contrast = np.eye(n_reg)[1:]
    f = glm_statistic(data, design, f_contrast, kind="f").numpy()
    np.testing.assert_allclose(glm_statistic(data, design * factors, f_contrast, kind="f").numpy(), f,
                               rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(f).max())))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_obs=st.integers(8, 20), n_vox=st.integers(2, 40), data=st.data())
def test_glm_statistics_equivariant_to_voxel_order(seed, n_obs, n_vox, data):
    design, values = _problem(seed, n_obs, 3, n_vox)
    order = np.asarray(data.draw(st.permutations(range(n_vox))))
    contrast = np.array([0.0, 1.0, -0.5])
    t = glm_statistic(values, design, contrast, kind="t").numpy()
    np.testing.assert_allclose(glm_statistic(values[:, order], design, contrast, kind="t").numpy(), t[order], **TOL)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n_obs=st.integers(6, 14),
    n_vox=st.integers(1, 30),
    n_perm=st.integers(1, 60),
    one_sample=st.booleans(),
)
def test_permutation_p_values_within_bounds(seed, n_obs, n_vox, n_perm, one_sample):
    design, data = _problem(seed, n_obs, 2, n_vox)
    if one_sample:
        design, contrast = np.ones((n_obs, 1)), np.array([[1.0]])
    else:
        contrast = np.array([[0.0, 1.0]])
    spatial = {"pos": lambda stats: stats.clamp(min=0)}
    result = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=seed),
                                  device="cpu", spatial=spatial)
    n = result.scheme.n_perm
    assert 1 <= n <= n_perm
    r = result["tstat1"]
    for p in (r.p_uncorrected, r.p_fwe, r.p_fdr, r.spatial["pos"].p_fwe):
        assert np.all(p >= 1.0 / n - 1e-12) and np.all(p <= 1.0 + 1e-12)
    assert np.all(r.p_fwe >= r.p_uncorrected - 1e-12)
    assert len(r.null_max) == n and r.null_max[0] == pytest.approx(float(r.stat.max()))


def _mask_and_maps(data, shape=(4, 4, 3)):
    mask = np.zeros(shape, dtype=bool)
    flat = data.draw(arrays(np.bool_, int(np.prod(shape))))
    flat[0] = True
    mask.reshape(-1)[:] = flat
    n_vox = int(mask.sum())
    base = data.draw(arrays(np.float32, n_vox, elements=st.floats(-2.0, 6.0, width=32)))
    bump = data.draw(arrays(np.float32, n_vox, elements=st.floats(0.0, 3.0, width=32)))
    return mask, base, base + bump


@SETTINGS
@given(data=st.data(), method=st.sampled_from(["exact", "stepped"]), connectivity=st.sampled_from([6, 26]))
def test_tfce_monotone_in_the_input_map(data, method, connectivity):
    mask, low, high = _mask_and_maps(data)
    dh = 0.1 if method == "stepped" else None  # fixed step, as randomise (max of the observed map / 100)
    maps = torch.as_tensor(np.stack([low, high]))
    out = tfce(maps, mask, connectivity=connectivity, method=method, dh=dh).numpy().astype(np.float64)
    # float32 sums of up to ~90 steps: allow a relative 1e-5 of the larger value.
    assert np.all(out[0] <= out[1] * (1 + 1e-5) + 1e-6)
    assert np.all(out >= 0) and np.all(out[0][low <= 0] == 0)
