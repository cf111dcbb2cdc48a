"""``randomise --accel``: PALM's tail, gamma and negbin (Winkler et al. 2016), held to plain references.

- The fits (:mod:`gpuconn.stats.accel`) against references written from the
  definitions on the whole null: PALM's ``palm_pareto`` loop with SciPy's
  ``genpareto`` survival and ``interp1d`` for the Anderson-Darling table,
  SciPy's ``pearson3`` (the gamma by mean, sd and skewness) for ``gamma``,
  a sequential loop for ``negbin``.
- The engine on the same rearrangements (every statistic of every
  rearrangement recomputed here), chunk-size independence, checkpoint/resume
  and the Dask tasks' sub-chunk merge.
- PALM's own accelerated outputs (case A, ``tests/data/palm``).
- Accuracy: 500 accelerated rearrangements against 50,000 plain ones.
- The CLI on simulated data: same files as a plain run, the mode in the sidecar.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import interpolate, stats

from gpuconn.cli.app import run
from gpuconn.core.errors import InputError
from gpuconn.stats import accel as A
from gpuconn.stats import dask_runner as dr
from gpuconn.stats import randomise as engine
from gpuconn.stats.checkpoint import load_checkpoint, run_key, save_checkpoint
from gpuconn.stats.design import load_design
from gpuconn.stats.randomise import (
    ChunkMerger,
    evaluate_chunk,
    prepare_permutation_test,
    run_chunk_loop,
    run_permutation_test,
)
from gpuconn.stats.options import PermutationOptions

PALM = Path(__file__).parent / "data" / "palm"
LEVELS = (np.arange(751, 1000, 10) / 1000)[:-2]
AD_K = [0.9, 0.5, 0.2, 0.1, 0, -0.1, -0.2, -0.3, -0.4, -0.5]
AD_P = [0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001]


# ---------------------------------------------------------------- references

def _pareto_reference(observed, null, threshold=0.10):
    """PALM's palm_pareto from its definition, on the whole null (one column), SciPy's GPD."""
    null = np.asarray(null, np.float64)
    n = null.size
    p = np.array([(null >= g).mean() for g in observed])
    small = p < threshold
    if not small.any():
        return p
    ordered = np.sort(null)
    cdf = np.array([(null <= x).sum() for x in ordered]) / n
    for q in LEVELS:
        first = int(np.argmax(cdf >= q))
        if first == 0:
            continue
        tail = ordered[first:]
        u = (ordered[first - 1] + ordered[first]) / 2
        y = tail - u
        mean, var = y.mean(), y.var(ddof=1)
        if var == 0:
            continue
        a, k = mean * (mean ** 2 / var + 1) / 2, (mean ** 2 / var - 1) / 2
        z = np.sort(stats.genpareto.sf(y, -k, scale=a))
        m = z.size
        j = np.arange(1, m + 1)
        with np.errstate(divide="ignore"):
            a2 = -m - np.sum((2 * j - 1) * (np.log(z) + np.log(1 - z[::-1]))) / m
        critical = interpolate.interp1d(AD_K, np.array(A._AD_A2), axis=0, fill_value="extrapolate")(max(0.5, k))
        if not np.isfinite(a2):
            continue
        fit_p = float(np.clip(interpolate.interp1d(critical, AD_P, fill_value="extrapolate")(a2), 0, 1))
        if fit_p > 0.05:
            use = small & (observed > u)
            p[use] = m / n * stats.genpareto.sf(observed[use] - u, -k, scale=a)
            return p
    return p


def _gamma_reference(observed, null, n_perm=None):
    """PALM's approxgamma: a Pearson type III (gamma) with the null's mean, sd and unbiased skewness."""
    null = np.asarray(null, np.float64)
    n_perm = n_perm or null.size
    skew = stats.skew(null, bias=False)
    loc, scale = null.mean(), null.std(ddof=1)
    p = stats.pearson3.sf(observed, skew, loc=loc, scale=scale)
    above = (skew < 0) & (observed > loc - 2 * scale / skew)  # beyond a left-skewed gamma's support
    return np.where(above, 1 / n_perm, p)


def _all_statistics(prepared, contrast=0, key="vox"):
    """Every rearrangement's statistic (n_perm, n_voxels), rearrangement 0 the observed map."""
    c = prepared.contrasts[contrast]
    values = engine.contrast_statistics(c, engine.chunk_rearrangements(prepared, 0, prepared.scheme.n_perm), 0)
    if key != "vox":
        values = c.transforms[key](values)
    return values.cpu().numpy().astype(np.float64)


def _data(seed=0, n=24, v=80, effect=1.5):
    rng = np.random.default_rng(seed)
    group = np.repeat([0.0, 1.0], n // 2)
    design = np.c_[np.ones(n), group, rng.standard_normal(n)]
    data = rng.standard_normal((n, v)) + group[:, None] * np.linspace(0, effect, v)[None]
    return data.astype(np.float32), design, np.array([[0.0, 1.0, 0.0]])


def _square(values):
    return values * values


SPATIAL = {"sq": _square}  # a row-wise "spatial" statistic, to check the spatial hook


# ---------------------------------------------------------------- the fits

@pytest.mark.parametrize("dist", ["normal", "t3", "exponential", "uniform"])
def test_tail_fit_equals_palms_definition(dist):
    rng = np.random.default_rng(1)
    n, columns = 500, 40
    draw = {"normal": lambda s: rng.standard_normal(s), "t3": lambda s: rng.standard_t(3, s),
            "exponential": lambda s: rng.exponential(size=s), "uniform": lambda s: rng.uniform(size=s)}[dist]
    nulls = draw((n, columns))
    observed = np.quantile(nulls, np.linspace(0.85, 1.0, columns), axis=0).diagonal() * np.linspace(1, 1.6, columns)
    expected = np.array([_pareto_reference(observed[j:j + 1], nulls[:, j])[0] for j in range(columns)])
    p_empirical = (nulls >= observed).mean(0)
    ordered = -np.sort(-nulls, axis=0)
    whole = A.tail_p(observed, p_empirical, A.gpd_fit(ordered, n))
    kept = A.tail_p(observed, p_empirical, A.gpd_fit(ordered[:A.tail_keep(n)], n))
    np.testing.assert_allclose(whole, expected, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(kept, whole)
    assert (whole < p_empirical).sum() > 3  # some p refined, not only the empirical p passed through


def test_tail_keeps_empirical_p_where_no_level_fits():
    # Two values only: no tail can be fitted (fewer than 2 tail values at every level with n = 4).
    null = np.array([[1.0], [1.0], [0.0], [0.0]])
    fit = A.gpd_fit(null, 4)
    assert not fit.accepted[0]
    np.testing.assert_array_equal(A.tail_p(np.array([1.0]), np.array([0.05]), fit), [0.05])


def test_gamma_equals_pearson3_from_power_sums():
    rng = np.random.default_rng(2)
    nulls = np.c_[rng.gamma(2.0, size=(300, 5)), -rng.gamma(3.0, size=(300, 5)), rng.standard_normal((300, 5))]
    observed = np.quantile(nulls, 0.97, axis=0) + np.linspace(-1, 3, nulls.shape[1])
    sums = A.power_sums(torch.as_tensor(nulls), torch.as_tensor(observed)).numpy()
    shift, variance, skew = A.gamma_moments(sums, 300)
    np.testing.assert_allclose(shift, nulls.mean(0) - observed, rtol=1e-10)
    np.testing.assert_allclose(variance, nulls.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(skew, stats.skew(nulls, axis=0, bias=False), rtol=1e-9)
    counts = (nulls >= observed).sum(0)
    got = A.accel_p(A.Accel("gamma", 300), observed, counts, sums)
    expected = np.array([_gamma_reference(observed[j], nulls[:, j]) for j in range(nulls.shape[1])])
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-300)


def test_negbin_rule():
    p = A.negbin_p(np.array([2, 2, 0, 1]), np.array([4, 100, 0, 0]), 500, 2)
    np.testing.assert_allclose(p, [2 / 4, 2 / 100, 1 / 500, 2 / 500])


def _enumerated(a, u):
    """G = (P u)' A (P u) over every permutation of the rows of u (n!), one column per voxel."""
    perms = np.array(list(itertools.permutations(range(u.shape[0]))))
    return np.stack([np.einsum("pi,ij,pj->p", u[perms, v], a, u[perms, v]) for v in range(u.shape[1])], 1)


def test_permutation_moments_equal_all_permutations():
    rng = np.random.default_rng(3)
    n = 7
    x = rng.standard_normal((n, 2))
    q, _ = np.linalg.qr(x - x.mean(0))
    u = rng.standard_normal((n, 4)) ** 3
    u -= u.mean(0)
    u /= np.linalg.norm(u, axis=0)
    g = _enumerated(q @ q.T, u)
    mean, variance, skew = A.permutation_moments(q @ q.T, u)
    np.testing.assert_allclose(mean, g.mean(0), rtol=1e-12)
    np.testing.assert_allclose(variance, g.var(0), rtol=1e-10)
    np.testing.assert_allclose(skew, stats.skew(g, axis=0), rtol=1e-9)


def test_noperm_equals_gamma_of_the_enumerated_distribution():
    rng = np.random.default_rng(4)
    n, v = 8, 12
    design = np.c_[np.ones(n), np.repeat([0.0, 1.0], n // 2)]
    data = (rng.standard_normal((n, v)) + design[:, 1:] * np.linspace(-2, 2, v)).astype(np.float32)
    result = run_permutation_test(data, design, np.array([[0.0, 1.0]]), device="cpu",
                                  permutation=PermutationOptions(accel="noperm") ).contrasts[0]
    prepared = prepare_permutation_test(data, design, np.array([[0.0, 1.0]]), device="cpu")
    c = prepared.contrasts[0]
    interest = c.model.rows[:1].numpy()
    u = c.residuals.numpy() / np.linalg.norm(c.residuals.numpy(), axis=0)
    g = _enumerated(interest.T @ interest, u)
    observed = np.sum((interest @ u) ** 2, 0)
    two_sided = np.array([_gamma_reference(observed[j], g[:, j]) for j in range(v)])  # floor 1 / 8!, as noperm's
    expected = np.where(result.stat >= 0, two_sided / 2, 1 - two_sided / 2)
    # _gamma_reference uses the sample skewness of the n! values; the closed form is the population one
    np.testing.assert_allclose(result.p_uncorrected, expected, rtol=2e-3)
    exact = np.where(result.stat >= 0, (g >= observed - 1e-12).mean(0) / 2, 1 - (g >= observed - 1e-12).mean(0) / 2)
    assert np.max(np.abs(result.p_uncorrected - exact)) < 0.05  # the gamma is close to the exact distribution
    assert np.isnan(result.p_fwe).all() and result.null_max.size == 0


def test_noperm_applies_only_where_it_can():
    data, design, contrast = _data()
    with pytest.raises(InputError, match="plain permutation only"):
        run_permutation_test(data, np.ones((24, 1)), np.ones((1, 1)), device="cpu",
                             permutation=PermutationOptions(accel="noperm") )
    with pytest.raises(InputError, match="plain permutation only"):
        run_permutation_test(data, design, contrast, device="cpu", permutation=PermutationOptions(accel="noperm"),
                             groups=np.repeat([1, 2], 12))
    with pytest.raises(InputError, match="needs the intercept among the nuisance"):
        run_permutation_test(data, design[:, 1:], contrast[:, 1:], device="cpu",
                             permutation=PermutationOptions(accel="noperm") )
    with pytest.raises(InputError, match=r"^accel noperm gives uncorrected p only \(.*\); drop spatial or use accel tail$"):
        run_permutation_test(data, design, contrast, device="cpu", permutation=PermutationOptions(accel="noperm"),
                             spatial=SPATIAL)


# ---------------------------------------------------------------- the engine

@pytest.mark.parametrize("g1out", [False, True])
@pytest.mark.parametrize("mode", ["tail", "gamma"])
def test_engine_equals_reference_on_the_same_rearrangements(mode, g1out, device):
    data, design, contrast = _data()
    prepared = prepare_permutation_test(data, design, contrast,
                                        permutation=PermutationOptions(n_perm=300, seed=4, accel=mode, accel_g1out=g1out),
                                        device=device, chunk=37, spatial=SPATIAL)
    result = run_chunk_loop(prepared, False).contrasts[0]
    reference = _pareto_reference if mode == "tail" else lambda g, null: _gamma_reference(g, null, 300)
    for key, got in (("vox", result), ("sq", result.spatial["sq"])):
        values = _all_statistics(prepared, key=key)
        observed, null = values[0], values[int(g1out):]
        unc = np.array([reference(observed[v:v + 1], null[:, v])[0] for v in range(values.shape[1])])
        fwe = reference(observed, null.max(1))
        np.testing.assert_allclose(got.p_uncorrected, unc, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(got.p_fwe, fwe, rtol=1e-6, atol=1e-12)
        assert (got.p_uncorrected < 0.01).any()


def test_tail_with_variance_groups_fits_the_z_of_v():
    data, design, contrast = _data(n=24)
    groups = np.r_[np.ones(8), np.full(16, 2)]
    result = run_permutation_test(data, design, contrast,
                                  permutation=PermutationOptions(n_perm=300, seed=4, accel="tail"),
                                  device="cpu", chunk=50,
                                  variance_groups=groups).contrasts[0]
    prepared = prepare_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=300, seed=4),
                                        device="cpu",
                                        variance_groups=groups)
    values = _all_statistics(prepared)  # the z of Aspin-Welch v, the compared statistic
    observed = values[0]
    unc = np.array([_pareto_reference(observed[v:v + 1], values[:, v])[0] for v in range(values.shape[1])])
    np.testing.assert_allclose(result.p_uncorrected, unc, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.p_fwe, _pareto_reference(observed, values.max(1)), rtol=1e-6, atol=1e-12)
    assert result.statistic == "Aspin-Welch v"


def test_negbin_equals_sequential_rule_and_evaluates_fewer_voxels(monkeypatch, device):
    data, design, contrast = _data(effect=0.8)
    prepared = prepare_permutation_test(data, design, contrast,
                                        permutation=PermutationOptions(n_perm=400, seed=5, accel="negbin"),
                                        device=device, chunk=16)
    values = _all_statistics(prepared)
    observed = values[0]
    expected = np.empty(values.shape[1])
    for v in range(values.shape[1]):  # PALM's loop: identity not counted, stop at the r-th exceedance
        hits = np.cumsum(values[1:, v] >= observed[v])
        where = np.flatnonzero(hits >= 2)
        expected[v] = 2 / (where[0] + 1) if where.size else (hits[-1] + 1) / 400
    evaluated = []
    original = engine.permuted_statistics
    monkeypatch.setattr(engine, "permuted_statistics",
                        lambda model, res, ss, o, s: evaluated.append(o.shape[0] * res.shape[1]) or
                        original(model, res, ss, o, s))
    result = run_chunk_loop(prepared, False)
    np.testing.assert_array_equal(result.contrasts[0].p_uncorrected, expected)
    assert sum(evaluated) < 0.5 * 400 * values.shape[1]  # stopped voxels are not evaluated again
    assert np.isnan(result.contrasts[0].p_fwe).all() and result.contrasts[0].null_max.size == 0


def test_negbin_stops_the_loop_when_every_voxel_has_stopped():
    rng = np.random.default_rng(6)
    data = rng.standard_normal((20, 30)).astype(np.float32)  # null data: every voxel stops early
    design = np.c_[np.ones(20), np.repeat([0.0, 1.0], 10)]
    prepared = prepare_permutation_test(data, design, np.array([[-1.0, 1.0]]),
                                        permutation=PermutationOptions(n_perm=5000, seed=1, accel="negbin") ,
                                        device="cpu", chunk=50)
    result = run_chunk_loop(prepared, False)
    done = result.accel["rearrangements_evaluated"]
    assert done < 5000 and done % 50 == 0
    assert (result.contrasts[0].p_uncorrected >= 2 / done).all()


@pytest.mark.parametrize("mode", ["tail", "gamma", "negbin"])
def test_chunk_size_independence(mode):
    data, design, contrast = _data()
    spatial = None if mode == "negbin" else SPATIAL
    results = [run_permutation_test(data, design, contrast,
                                    permutation=PermutationOptions(n_perm=250, seed=2, accel=mode),
                                    device="cpu", chunk=chunk, spatial=spatial).contrasts[0] for chunk in (7, 64, 250)]
    for other in results[1:]:
        for name in ("p_uncorrected", "p_fwe"):
            a, b = getattr(results[0], name), getattr(other, name)
            if mode == "gamma":  # float64 power sums over other groupings: rounding only
                np.testing.assert_allclose(a, b, rtol=1e-9)
            else:
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["tail", "gamma", "negbin"])
def test_checkpoint_resume_is_identical(mode, tmp_path):
    data, design, contrast = _data(effect=0.8)
    spatial = None if mode == "negbin" else SPATIAL
    prepared = prepare_permutation_test(data, design, contrast,
                                        permutation=PermutationOptions(n_perm=240, seed=3, accel=mode),
                                        device="cpu", chunk=20, spatial=spatial)
    whole = run_chunk_loop(prepared, False)
    merger = ChunkMerger(prepared)
    for start in range(0, 100, 20):
        merger.add(start, start + 20, evaluate_chunk(prepared, start, start + 20, running=merger.running()
                                                     if mode == "negbin" else None))
    key = run_key(prepared)
    other = "tail" if mode != "tail" else "gamma"
    assert run_key(prepare_permutation_test(data, design, contrast,
                                            permutation=PermutationOptions(n_perm=240, seed=3, accel=other),
                                            device="cpu", chunk=20)) != key  # a checkpoint of another mode is refused
    save_checkpoint(tmp_path / "c.npz", key, merger, 100)
    restored, done = load_checkpoint(tmp_path / "c.npz", key, prepared)
    resumed = run_chunk_loop(prepared, False, merger=restored, done=done)
    for a, b in zip(whole.contrasts, resumed.contrasts):
        np.testing.assert_array_equal(a.p_uncorrected, b.p_uncorrected)
        np.testing.assert_array_equal(a.p_fwe, b.p_fwe)
        for k in a.spatial:
            np.testing.assert_array_equal(a.spatial[k].p_uncorrected, b.spatial[k].p_uncorrected)
            np.testing.assert_array_equal(a.spatial[k].p_fwe, b.spatial[k].p_fwe)


@pytest.mark.parametrize("mode", ["tail", "gamma"])
def test_dask_task_merges_sub_chunks_like_the_merger(mode, monkeypatch):
    data, design, contrast = _data()
    prepared = prepare_permutation_test(data, design, contrast,
                                        permutation=PermutationOptions(n_perm=120, seed=3, accel=mode),
                                        device="cpu", spatial=SPATIAL)
    monkeypatch.setattr(dr, "plan_chunk", lambda contrasts, device, n: 9)  # sub-chunks of 9
    task = dr._evaluate_task(prepared, 10, 100)
    whole = evaluate_chunk(prepared, 10, 100)
    for key in ("vox", "sq"):
        a, b = task["tstat1"]["accel"][key].numpy(), whole["tstat1"]["accel"][key].numpy()
        if mode == "tail":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-12)
        np.testing.assert_array_equal(task["tstat1"]["count"][key], whole["tstat1"]["count"][key])


def test_negbin_refuses_what_it_cannot_give():
    data, design, contrast = _data()
    with pytest.raises(InputError, match="uncorrected p only"):
        prepare_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=100, accel="negbin"),
                                 device="cpu", spatial=SPATIAL)
    with pytest.raises(InputError, match="not one of tail, gamma, negbin"):
        prepare_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=100, accel="lowrank"),
                                 device="cpu")
    with pytest.raises(InputError, match="^accel_g1out leaves .* give accel tail or accel gamma$"):  # CLI: --accel-out
        prepare_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=100, accel_g1out=True),
                                 device="cpu")
    with pytest.raises(InputError, match=r"^accel negbin is for t and F statistics, not variance groups \(variance_groups\)"):
        prepare_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=100, accel="negbin"),
                                 device="cpu",
                                 variance_groups=np.repeat([1, 2], 12))


# ---------------------------------------------------------------- PALM and accuracy

MASK = nib.load(PALM / "mask.nii.gz").get_fdata() > 0


@pytest.fixture(scope="module")
def palm_case_a():
    data = nib.load(PALM / "A_data.nii.gz").get_fdata(dtype=np.float32)[MASK].T
    design = load_design(PALM / "A_design.mat", PALM / "A_design.con", n_obs=data.shape[0])
    return data, design


@pytest.mark.parametrize("mode", ["tail", "gamma"])
def test_palm_accelerated_outputs_within_monte_carlo_error(mode, palm_case_a):
    """PALM's -n 500 -accel tail/gamma on case A: the README's bound for two independent sets of 500."""
    data, design = palm_case_a
    result = run_permutation_test(data, design, permutation=PermutationOptions(n_perm=500, seed=1, accel=mode),
                                  device="cpu").contrasts[0]
    for ours, name in ((result.p_fwe, "fwep"), (result.p_uncorrected, "uncp")):
        palm = nib.load(PALM / f"palmA_accel-{mode}_vox_tstat_{name}.nii.gz").get_fdata()[MASK]
        middle = (ours + palm) / 2
        bound = 3 * np.sqrt(2 * middle * (1 - middle) / 500) + 1 / 500
        assert np.mean(np.abs(ours - palm) > bound + 1e-7) <= 0.01
    # Uncorrected p below 0.01 (about 100 voxels; the FWER p has 2): two independent 500-rearrangement fits
    # differ by a median factor of ~2 (tail; over seeds 1-4 median |log10 ratio| 0.29-0.36, gamma 0.23-0.27).
    small = palm < 0.01
    assert small.sum() >= 20
    assert np.median(np.abs(np.log10(result.p_uncorrected[small] / palm[small]))) <= 0.5


@pytest.fixture(scope="module")
def long_run():
    """Small data with p from 1e-4 to 0.05, and its 50,000-rearrangement plain p."""
    data, design, contrast = _data(seed=11, n=30, v=200, effect=1.5)
    design = design[:, :2]
    contrast = contrast[:, :2]
    reference = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=50_000, seed=9),
                                     device="cpu").contrasts[0]
    return data, design, contrast, reference


@pytest.mark.parametrize("mode", ["tail", "gamma"])
def test_500_accelerated_match_50000_plain(mode, long_run):
    """Stated error, for p in 1e-4..0.05 (uncorrected and FWER): median |log10(p500 / p50000)| <= 0.35 (a
    factor of 2.2), 90th percentile <= 1 (a factor of 10). PALM's default keeps the unpermuted statistic in
    the null, which makes the fits conservative where effects are strong; bench/bench_accel.py measures it."""
    data, design, contrast, reference = long_run
    result = run_permutation_test(data, design, contrast,
                                  permutation=PermutationOptions(n_perm=500, seed=1, accel=mode),
                                  device="cpu").contrasts[0]
    for ours, ref in ((result.p_uncorrected, reference.p_uncorrected), (result.p_fwe, reference.p_fwe)):
        inside = (ref >= 1e-4) & (ref <= 0.05)
        assert inside.sum() >= 20
        assert (ours > 0).all()  # the unpermuted statistic is in the null: never p = 0
        error = np.abs(np.log10(ours[inside] / ref[inside]))
        assert np.median(error) <= 0.35 and np.quantile(error, 0.9) <= 1.0


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel_cli")
    rng = np.random.default_rng(8)
    shape, n = (6, 6, 5), 16
    data = rng.standard_normal((*shape, n)).astype(np.float32)
    data[1:4, 1:4, 1:3, n // 2:] += 1.5
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "data.nii.gz")
    group = np.repeat([0.0, 1.0], n // 2)
    (root / "design.mat").write_text("/NumWaves 2\n/NumPoints 16\n/Matrix\n"
                                     + "".join(f"1 {g:g}\n" for g in group))
    (root / "design.con").write_text("/NumWaves 2\n/NumContrasts 1\n/Matrix\n0 1\n")
    return root


def _cli(images, root, *extra):
    return run(["randomise", "-i", str(images / "data.nii.gz"), "-d", str(images / "design.mat"),
                "-t", str(images / "design.con"), "-n", "200", "--seed", "1", "--device", "cpu", "-q",
                "-o", str(root), *extra])


def _names(folder, prefix):
    return sorted(p.name[len(prefix):] for p in Path(folder).glob(f"{prefix}_*"))


@pytest.mark.parametrize("mode", ["tail", "gamma"])
def test_cli_writes_the_plain_files_and_records_the_mode(mode, images, tmp_path):
    assert _cli(images, tmp_path / "plain", "-T", "--uncorrp") == 0
    assert _cli(images, tmp_path / "acc", "-T", "--uncorrp", "--accel", mode, "--accel-out") == 0
    assert _names(tmp_path, "acc") == _names(tmp_path, "plain")
    record = json.loads((tmp_path / "acc.json").read_text())["Parameters"]
    assert record["accel"]["mode"] == mode and record["accel"]["unpermuted_in_null"] is False
    assert record["options"]["accel"] == mode


@pytest.mark.parametrize("mode", ["negbin", "noperm"])
def test_cli_uncorrected_only_modes(mode, images, tmp_path):
    assert _cli(images, tmp_path / "nb", "--accel", mode, "--fdr") == 0
    names = _names(tmp_path, "nb")
    assert "_vox_p_tstat1.nii.gz" in names and "_vox_fdrp_tstat1.nii.gz" in names
    assert not any("corrp" in n or "perm_" in n for n in names)
    record = json.loads((tmp_path / "nb.json").read_text())["Parameters"]
    assert record["accel"]["mode"] == mode and record["accel"]["fwer"] is None


def test_cli_reports_what_noperm_ran(images, tmp_path, capsys):
    assert run(["randomise", "-i", str(images / "data.nii.gz"), "-d", str(images / "design.mat"),
                "-t", str(images / "design.con"), "--device", "cpu", "-o", str(tmp_path / "np"),
                "--accel", "noperm"]) == 0
    assert "randomise: 0 random rearrangements (permute) of 1 contrast(s)" in capsys.readouterr().out


def test_cli_negbin_refuses_fwer(images, tmp_path, capsys):
    assert _cli(images, tmp_path / "x", "--accel", "negbin", "-x") != 0
    assert "--accel negbin has no FWER p" in capsys.readouterr().err
    assert _cli(images, tmp_path / "t", "--accel", "negbin", "-T") != 0
    assert "drop -T/-c/-C/-F/-S" in capsys.readouterr().err
    assert _cli(images, tmp_path / "c", "--accel", "tail", "--corrcon") != 0
    assert "--accel tail is not combined with --corrcon/--corrmod/--npc" in capsys.readouterr().err
    assert _cli(images, tmp_path / "w", "--accel", "negbin", "--workers", "2") != 0
    assert "--accel negbin runs chunk after chunk on the voxels still running; drop" in capsys.readouterr().err
