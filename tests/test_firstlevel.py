"""First-level GLM (gpuconn.maps.firstlevel): OLS exactness, FILM prewhitening on autocorrelated null data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuconn.core.errors import InputError
from gpuconn.maps.firstlevel import first_level_glm, tukey_autocorrelation


def _ar1(rng, n, v, phi):
    e = rng.standard_normal((n, v))
    out = np.empty_like(e)
    out[0] = e[0] / np.sqrt(1 - phi**2)
    for t in range(1, n):
        out[t] = phi * out[t - 1] + e[t]
    return out


def _seed_design(rng, n=120):
    seed = _ar1(rng, n, 1, 0.8)[:, 0]  # a slow, seed-like regressor
    return np.column_stack([seed - seed.mean(), np.ones(n)])


def test_no_prewhitening_is_ols(rng, device):
    x = _seed_design(rng)
    y = rng.standard_normal((120, 50)) + 0.3 * x[:, :1]
    res = first_level_glm(y, x, np.array([[1.0, 0.0]]), prewhiten="none", device=device)
    beta, rss = np.linalg.lstsq(x, y, rcond=None)[:2]
    varcope = rss / 118 * np.linalg.inv(x.T @ x)[0, 0]
    np.testing.assert_allclose(res.cope[0], beta[0], rtol=1e-10)  # float64 round-off
    np.testing.assert_allclose(res.varcope[0], varcope, rtol=1e-10)
    np.testing.assert_allclose(res.tstat[0], beta[0] / np.sqrt(varcope), rtol=1e-10)
    assert res.dof == 118


def test_tukey_autocorrelation_of_ar1():
    rng = np.random.default_rng(4)
    r = torch.as_tensor(_ar1(rng, 400, 300, 0.5))
    acf = tukey_autocorrelation(r, 10).numpy()
    taper = 0.5 * (1 + np.cos(np.pi * np.arange(10) / 10))
    # Mean over 300 voxels of the lag-1 estimate: E ~ 0.5 - (1 + 3 * 0.5) / 400 (small-sample bias), SE ~ 0.003.
    assert acf[0].min() == 1.0
    assert abs(acf[1].mean() / taper[1] - 0.5) < 0.02


def test_film_restores_null_z_on_autocorrelated_noise():
    rng = np.random.default_rng(8)
    x = _seed_design(rng)
    mask = np.ones((15, 15, 12), dtype=bool)
    y = _ar1(rng, 120, int(mask.sum()), 0.5)
    c = np.array([[1.0, 0.0]])
    ols = first_level_glm(y, x, c, prewhiten="none", device="cpu").zstat[0]
    film = first_level_glm(y, x, c, prewhiten="film", mask=mask, device="cpu").zstat[0]
    raw = first_level_glm(y, x, c, prewhiten="film", device="cpu").zstat[0]
    # OLS ignores the AR(1) noise: sd of z ~ sqrt((1 + 0.5 * 0.8) / (1 - 0.5 * 0.8)) = 1.5.
    # 2700 null voxels give the sd of z to ~0.014 (1 SE). FILM with the autocorrelation smoothed
    # in space should be ~1 (the residual autocorrelation is biased low by ~(1 + 3 phi) / n = 0.02,
    # so a little above 1); each voxel's raw estimate alone leaves it ~15% wide.
    assert ols.std() > 1.3
    assert 0.93 < film.std() < 1.07, film.std()
    assert abs(film.mean()) < 0.06
    assert film.std() < raw.std() < ols.std()


def test_film_on_white_noise_matches_ols_variance():
    rng = np.random.default_rng(9)
    x = _seed_design(rng)
    mask = np.ones((20, 10, 10), dtype=bool)
    y = rng.standard_normal((120, 2000))
    c = np.array([[1.0, 0.0]])
    ols = first_level_glm(y, x, c, prewhiten="none", device="cpu")
    film = first_level_glm(y, x, c, prewhiten="film", mask=mask, device="cpu")
    # White noise: the filter is ~1. OLS residuals have autocorrelation ~ -1/n at every lag, so the
    # tapered sum gives S(0) ~ 1 - 2 * sum(w_k) / n ~ 0.92 and a slow regressor's varcope ~8% low
    # (FILM shares this bias); measured median ratio 0.93.
    assert 0.88 < np.median(film.varcope[0] / ols.varcope[0]) < 1.02
    assert 0.93 < film.zstat[0].std() < 1.07  # 2000 voxels: SE of the sd ~ 0.016


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prewhiten": "ar1"}, "^prewhiten 'ar1' is not one of film, none$"),
    ({"design": np.ones((100, 2))}, "the design has 100 rows but the run has 120 volumes"),
])
def test_first_level_bad_input(rng, kwargs, message):
    args = {"design": _seed_design(rng), "prewhiten": "film"} | kwargs
    with pytest.raises(InputError, match=message):
        first_level_glm(rng.standard_normal((120, 4)), args["design"], np.array([[1.0, 0.0]]),
                        prewhiten=args["prewhiten"])
