"""Permutation engine: agreement with a plain NumPy loop, the spatial hook, chunking, OOM, outputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from gpuconn.core.errors import InputError
from gpuconn.stats.permute import make_scheme
from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.options import PermutationOptions


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
    result = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=200, seed=3),
                                  device=device, chunk=37)
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
    result = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=100, seed=1),
                                  spatial={"same": lambda s: s})
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

    result = run_permutation_test(data, np.ones((5, 1)), np.ones((1, 1)), permutation=PermutationOptions(n_perm=0),
                                  spatial={"smooth": smooth})
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
        run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=10),
                             spatial={"bad": lambda s: s[:, :3]})


def test_f_null_matches_numpy_loop(two_sample):
    data, design, _ = two_sample
    contrasts = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    result = run_permutation_test(data, design, contrasts, ftests=np.array([[1, 1]]),
                                  permutation=PermutationOptions(n_perm=120, seed=5), chunk=50)
    orders, signs = result.scheme.chunk(0, 120)
    y = data.astype(np.float64)
    resid = y - y.mean(0)  # nuisance of this F test: the intercept only

    def f_stat(yy):
        def rss(x):
            return ((yy - x @ np.linalg.lstsq(x, yy, rcond=None)[0]) ** 2).sum(0)
        return ((rss(np.ones((24, 1))) - rss(design)) / 2) / (rss(design) / 21)

    stats = np.array([f_stat(s[:, None] * resid[o]) for o, s in zip(orders, signs)])
    got = result["fstat1"]
    assert got.df == (2, 21)
    np.testing.assert_allclose(got.null_max, stats.max(1), rtol=1e-4)
    np.testing.assert_array_equal(got.p_fwe, _counting_p(stats)[1])


def test_agrees_with_nilearn_permuted_ols(rng):
    permuted_ols = pytest.importorskip("nilearn.mass_univariate").permuted_ols
    n, v, n_perm = 40, 200, 2000
    group = np.r_[np.ones(20), np.zeros(20)]
    cov = rng.normal(size=(n, 2))
    data = rng.normal(size=(n, v)) + cov @ rng.normal(size=(2, v))
    data[:20, :30] += 1.3
    ref = permuted_ols(group[:, None], data, confounding_vars=cov, model_intercept=True, n_perm=n_perm,
                       two_sided_test=False, random_state=0, output_type="dict")
    got = run_permutation_test(data.astype(np.float32), np.c_[group, 1 - group, cov],
                               np.array([[1.0, -1.0, 0.0, 0.0]]), permutation=PermutationOptions(n_perm=n_perm, seed=0)
                                   )["tstat1"]
    np.testing.assert_allclose(got.stat, ref["t"][0], rtol=1e-4, atol=1e-5)
    p_ref = 10 ** -ref["logp_max_t"][0]
    # Two independent Monte-Carlo estimates of the same p: 4.5 standard errors of their difference.
    p_mid = np.clip((p_ref + got.p_fwe) / 2, 1 / n_perm, None)
    bound = 4.5 * np.sqrt(2 * p_mid * (1 - p_mid) / n_perm) + 2 / n_perm
    assert np.all(np.abs(got.p_fwe - p_ref) <= bound)
    assert (got.p_fwe < 0.05).sum() > 5


def _null_fwer(make_data, design, contrast, n_sim, seed, **kwargs):
    """Share of null data sets with any voxel at FWER p <= 0.05."""
    rng = np.random.default_rng(seed)
    hits = 0
    for sim in range(n_sim):
        result = run_permutation_test(make_data(rng), design, contrast,
                                      permutation=PermutationOptions(n_perm=100, seed=sim), **kwargs)
        hits += result["tstat1"].p_fwe.min() <= 0.05
    return hits / n_sim


@pytest.mark.parametrize("kind", ["one-sample", "two-sample-covariates", "paired"])
def test_null_fwer_is_nominal(kind):
    from scipy.stats import binomtest

    n_sim, v = 150, 15
    base = np.random.default_rng(11)
    if kind == "one-sample":
        design, contrast, extra = np.ones((12, 1)), np.ones((1, 1)), {}

        def make_data(rng):
            return rng.normal(size=(12, v)).astype(np.float32)
    elif kind == "two-sample-covariates":
        group = np.r_[np.ones(10), np.zeros(10)]
        age = base.normal(size=20) + 0.8 * group  # covariate correlated with group
        design, contrast, extra = np.c_[group, 1 - group, age], np.array([[1.0, -1.0, 0.0]]), {}

        def make_data(rng):
            return (2.0 * age[:, None] + rng.normal(size=(20, v))).astype(np.float32)
    else:
        n_sub = 10
        design = np.c_[np.r_[-np.ones(n_sub), np.ones(n_sub)], np.vstack([np.eye(n_sub)] * 2)]
        contrast = np.r_[1.0, np.zeros(n_sub)][None]
        extra = {"groups": np.tile(np.arange(n_sub), 2)}
        subject_means = base.normal(scale=3.0, size=(n_sub, v))

        def make_data(rng):
            return (np.vstack([subject_means] * 2) + rng.normal(size=(2 * n_sub, v))).astype(np.float32)

    rate = _null_fwer(make_data, design, contrast, n_sim, seed=3, **extra)
    # Valid tests have FWER <= 0.05 (discrete p: exactly 0.05 at n_perm=100); 99.9% binomial check.
    assert binomtest(round(rate * n_sim), n_sim, 0.05).pvalue > 1e-3, rate


def test_chunk_size_does_not_change_results(two_sample):
    data, design, contrast = two_sample
    spatial = {"pos": lambda s: s.clamp_min(0)}
    runs = [run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=90, seed=2),
                                 chunk=c, spatial=spatial)["tstat1"]
            for c in (1, 13, 90)]
    for other in runs[1:]:
        for key in ("stat", "p_fwe", "p_uncorrected", "null_max", "z"):
            np.testing.assert_array_equal(getattr(other, key), getattr(runs[0], key))
        np.testing.assert_array_equal(other.spatial["pos"].null_max, runs[0].spatial["pos"].null_max)


def test_out_of_memory_halves_chunk_with_identical_results(two_sample, oom_once_above):
    data, design, contrast = two_sample
    expected = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=64, seed=4),
                                    chunk=64)["tstat1"]
    failed = oom_once_above(16)
    got = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=64, seed=4),
                               chunk=64)["tstat1"]
    assert failed == [64]
    for key in ("stat", "p_fwe", "p_uncorrected", "null_max"):
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))


def test_demean_equals_intercept_as_nuisance(rng):
    n = 20
    x = rng.normal(size=(n, 2)) + 3.0
    data = (rng.normal(size=(n, 25)) + 5.0).astype(np.float32)
    demeaned = run_permutation_test(data, x, np.array([[1.0, 0.0]]),
                                    permutation=PermutationOptions(n_perm=50, seed=0, demean=True) )["tstat1"]
    explicit = run_permutation_test(data, np.c_[x - x.mean(0), np.ones(n)], np.array([[1.0, 0.0, 0.0]]),
                                    permutation=PermutationOptions(n_perm=50, seed=0) )["tstat1"]
    assert demeaned.df == (1, n - 3)
    np.testing.assert_allclose(demeaned.stat, explicit.stat, rtol=1e-5)
    np.testing.assert_array_equal(demeaned.p_fwe, explicit.p_fwe)
    with pytest.raises(InputError, match=r"constant, and demean removes the mean; .* leave demean off$"):
        run_permutation_test(data, np.c_[np.ones(n), x], np.array([[0.0, 1.0, 0.0]]),
                             permutation=PermutationOptions(n_perm=10, demean=True) )


def test_paired_blocks_are_exhaustive_sign_swaps(rng):
    n_sub = 6
    design = np.c_[np.r_[-np.ones(n_sub), np.ones(n_sub)], np.vstack([np.eye(n_sub)] * 2)]
    data = rng.normal(size=(2 * n_sub, 10)).astype(np.float32)
    result = run_permutation_test(data, design, np.r_[1.0, np.zeros(n_sub)][None],
                                  permutation=PermutationOptions(n_perm=5000) ,
                                  groups=np.tile(np.arange(n_sub), 2))
    assert result.scheme.exhaustive and result.scheme.n_perm == 2**n_sub and result.scheme.method == "permute"
    # Only the condition row moves: subject means are invariant under within-subject swaps.
    assert result["tstat1"].p_fwe.min() >= 1 / 64


def test_data_errors_are_clear(two_sample):
    data, design, contrast = two_sample
    with pytest.raises(InputError, match="has 24 rows but the data has 23 volumes"):
        run_permutation_test(data[:23], design, contrast, permutation=PermutationOptions(n_perm=10))
    bad = data.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        run_permutation_test(bad, design, contrast, permutation=PermutationOptions(n_perm=10))


def _write_study(tmp_path, rng):
    from gpuconn.stats.design import write_vest

    data = rng.normal(size=(5, 6, 4, 16)).astype(np.float32)
    data[1:3, 1:3, 1:3, :8] += 2.0
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "in.nii.gz")
    mask = np.zeros((5, 6, 4), np.uint8)
    mask[:, :, 1:] = 1
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    group = np.r_[np.ones(8), np.zeros(8)]
    write_vest(tmp_path / "d.mat", np.c_[group, 1 - group])
    write_vest(tmp_path / "d.con", np.array([[1.0, -1.0], [-1.0, 1.0]]), kind="con", names=["A>B", "B>A"])
    write_vest(tmp_path / "d.fts", np.array([[1, 0]]), kind="fts")
    return mask.astype(bool)


def test_cli_writes_randomise_outputs(tmp_path, rng):
    from gpuconn.cli.app import run

    mask = _write_study(tmp_path, rng)
    root = tmp_path / "out" / "grp"
    rc = run(["randomise", "-i", str(tmp_path / "in.nii.gz"), "-o", str(root), "-d", str(tmp_path / "d.mat"),
              "-t", str(tmp_path / "d.con"), "-f", str(tmp_path / "d.fts"), "-m", str(tmp_path / "mask.nii.gz"),
              "-n", "200", "--seed", "3", "--uncorrp", "--fdr", "-q"])
    assert rc == 0
    names = {p.name for p in root.parent.iterdir()}
    for stat in ("tstat1", "tstat2", "fstat1"):
        for prefix in ("", "vox_p_", "vox_corrp_", "vox_fdrp_"):
            assert f"grp_{prefix}{stat}.nii.gz" in names
        assert f"grp_perm_{stat}.txt" in names
    assert {"grp_zstat1.nii.gz", "grp_zfstat1.nii.gz", "grp.json"} <= names
    corrp = nib.load(root.parent / "grp_vox_corrp_tstat1.nii.gz").get_fdata()
    tstat = nib.load(root.parent / "grp_tstat1.nii.gz").get_fdata()
    null = np.loadtxt(root.parent / "grp_perm_tstat1.txt").astype(np.float32)  # 9 digits round-trip float32
    assert null.shape == (200,) and null[0] == pytest.approx(tstat[mask].max(), rel=1e-6)
    expected = 1 - (null[None, :] >= tstat[mask][:, None].astype(np.float32)).mean(1)
    np.testing.assert_allclose(corrp[mask], expected, atol=1e-6)
    assert np.all(corrp[~mask] == 0)
    sidecar = json.loads((root.parent / "grp.json").read_text())["Parameters"]
    assert sidecar["seed"] == 3 and sidecar["n_perm"] == 200 and sidecar["method"] == "permute"


def test_cli_bad_design_is_one_line_error_and_writes_nothing(tmp_path, rng, capsys):
    from gpuconn.cli.app import run
    from gpuconn.stats.design import write_vest

    _write_study(tmp_path, rng)
    write_vest(tmp_path / "short.mat", np.ones((10, 1)))
    root = tmp_path / "out" / "grp"
    rc = run(["randomise", "-i", str(tmp_path / "in.nii.gz"), "-o", str(root), "-d", str(tmp_path / "short.mat"),
              "-t", str(tmp_path / "d.con"), "-n", "10", "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "short.mat has 10 rows but" in err and "in.nii.gz has 16 volumes" in err
    assert not root.parent.exists()
    rc = run(["randomise", "-i", str(tmp_path / "in.nii.gz"), "-o", str(root), "-1", "-d", str(tmp_path / "d.mat"),
              "-n", "10", "-q"])
    assert rc == 2 and "-1 (one-sample) builds its own design" in capsys.readouterr().err


def test_cli_one_sample_sign_flips(tmp_path, rng):
    from gpuconn.cli.app import run

    _write_study(tmp_path, rng)
    root = tmp_path / "one"
    assert run(["randomise", "-i", str(tmp_path / "in.nii.gz"), "-o", str(root), "-1", "-n", "50", "-q"]) == 0
    sidecar = json.loads((tmp_path / "one.json").read_text())["Parameters"]
    assert sidecar["method"] == "flip" and (tmp_path / "one_vox_corrp_tstat1.nii.gz").exists()


@pytest.mark.parametrize(("method", "whole_blocks"), [("permute", False), ("both", False), ("permute", True)])
def test_blocks_and_flips_match_numpy_loop(rng, method, whole_blocks):
    n = 24
    blocks = np.repeat(np.arange(6), 4)
    x, age = rng.normal(size=n), rng.normal(size=n)
    design = np.c_[np.ones(n), x, age]
    data = (rng.normal(size=(n, 30)) + age[:, None] + 0.5 * blocks[:, None]).astype(np.float32)
    result = run_permutation_test(data, design, np.array([[0.0, 1.0, 0.0]]), groups=blocks,
                                  permutation=PermutationOptions(n_perm=150, seed=9, method=method, permute_blocks=whole_blocks),
                                  chunk=40)
    assert result.scheme.method == {"permute": "permute", "both": "permute+flip"}[method]
    orders, signs = result.scheme.chunk(0, 150)
    if not whole_blocks:
        assert (blocks[orders] == blocks).all()
    stats = _reference_null(data, design, np.array([0.0, 1.0, 0.0]), [0, 2], orders, signs)
    got = result["tstat1"]
    np.testing.assert_allclose(got.null_max, stats.max(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.p_fwe, _counting_p(stats)[1])


def test_planted_effect_is_recovered(rng):
    n, v = 40, 200
    group = np.r_[np.ones(20), np.zeros(20)]
    age = rng.normal(size=n)
    data = rng.normal(size=(n, v)) + 0.5 * age[:, None]
    data[:20, :10] += 2.0  # d = 2: power ~1 at FWER 0.05 over 200 voxels
    got = run_permutation_test(data.astype(np.float32), np.c_[group, 1 - group, age],
                               np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]),
                                   permutation=PermutationOptions(n_perm=500, seed=0) )
    assert (got["tstat1"].p_fwe[:10] < 0.05).all()
    assert (got["tstat1"].p_fwe[10:] < 0.05).sum() <= 2
    assert (got["tstat2"].p_fwe < 0.05).sum() == 0
    assert (got["tstat1"].p_fdr[:10] < 0.05).all()


def test_fdr_adjust_equals_scipy_and_step_up_rule(rng):
    from scipy.stats import false_discovery_control

    from gpuconn.stats.fdr import fdr_adjust

    p = np.r_[rng.uniform(size=200), rng.uniform(0, 1e-3, size=20), [1.0, 0.0, 0.5, 0.5]]
    q = fdr_adjust(p)
    np.testing.assert_allclose(q, false_discovery_control(p, method="bh"), rtol=1e-12)
    # Step-up rule: reject the k smallest, k = max{i : p_(i) <= i alpha / n}.
    alpha, ordered = 0.05, np.sort(p)
    k = np.max(np.flatnonzero(ordered <= np.arange(1, p.size + 1) * alpha / p.size)) + 1
    assert (q <= alpha).sum() == k
    assert fdr_adjust(np.array([])).size == 0
