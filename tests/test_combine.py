"""Inference across contrasts and inputs (--corrcon, --corrmod, --npc, --save-parametric) against NumPy/SciPy."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats as sps

from gpuconn.core.errors import InputError
from gpuconn.stats.combine import (
    combine_statistics,
    combined_fwe_across,
    fwe_across,
    npc_test,
    parametric_p,
    randomise_inputs,
)
from gpuconn.stats.randomise import prepare_permutation_test, randomise, run_chunk_loop
from gpuconn.stats.options import PermutationOptions

N, V = 20, 40


@pytest.fixture
def study(rng):
    """Two inputs of one design [group, age, intercept]; contrasts group, age, -group; F of group and age."""
    group = np.r_[np.ones(10), np.zeros(10)]
    age = rng.normal(size=N)
    design = np.c_[group, age, np.ones(N)]
    contrasts = np.array([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0]])
    ftests = np.array([[1, 1, 0]])
    a = rng.normal(size=(N, V)) + 0.4 * age[:, None]
    a[:10, :6] += 0.9
    b = 0.5 * a + rng.normal(size=(N, V))
    return design, contrasts, ftests, [a.astype(np.float32), b.astype(np.float32)]


def _fit(y, design):
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    dof = design.shape[0] - np.linalg.matrix_rank(design)
    return beta, ((y - design @ beta) ** 2).sum(0) / dof, dof


def _reference_stats(y, design, contrasts, ftests, orders, signs):
    """Freedman-Lane by hand: per statistic, (n_perm, n_voxels) t or F and its (kind, df1, dof)."""
    y = np.asarray(y, dtype=np.float64)
    xtx = np.linalg.pinv(design.T @ design)
    specs = [(c[None], "t") for c in contrasts] + [(contrasts[f == 1], "f") for f in ftests]
    out = []
    for c, kind in specs:
        interest = np.any(c != 0, axis=0)
        z = design[:, ~interest]
        resid = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]
        rows = []
        for o, s in zip(orders, signs):
            beta, sigma2, dof = _fit(s[:, None] * resid[o], design)
            cb = c @ beta
            if kind == "t":
                rows.append(cb[0] / np.sqrt(sigma2 * (c @ xtx @ c.T)[0, 0]))
            else:
                middle = np.linalg.inv(c @ xtx @ c.T)
                rows.append(np.einsum("iv,ij,jv->v", cb, middle, cb) / c.shape[0] / sigma2)
        out.append((np.array(rows), kind, c.shape[0], dof))
    return out


def _z(values, kind, df1, dof):
    """z of the same upper tail, by SciPy."""
    sf = sps.t.sf(values, dof) if kind == "t" else sps.f.sf(values, df1, dof)
    return sps.norm.isf(sf)


def _run(data, design, contrasts, ftests, **kw):
    prepared = prepare_permutation_test(data, design, contrasts, ftests=ftests,
                                        permutation=PermutationOptions(n_perm=150, seed=5), **kw)
    return prepared, run_chunk_loop(prepared, False)


def _reference(study, k):
    design, contrasts, ftests, inputs = study
    _, result = _run(inputs[k], design, contrasts, ftests)
    orders, signs = result.scheme.chunk(0, result.scheme.n_perm)
    return result, _reference_stats(inputs[k], design, contrasts, ftests, orders, signs)


def test_corrcon_matches_numpy_max_over_contrasts(study):
    result, ref = _reference(study, 0)
    zs = [_z(s, kind, df1, dof) for s, kind, df1, dof in ref]
    null = np.max([z.max(1) for z in zs], axis=0)
    got = fwe_across(result.contrasts)
    for (p, _), z, c, (s, *_) in zip(got, zs, result.contrasts, ref):
        np.testing.assert_allclose(c.stat, s[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(p, (null[None] >= z[0][:, None]).mean(1))
        assert np.all(p >= c.p_fwe) and np.any(p > c.p_fwe)


def test_corrcon_of_one_contrast_is_its_own_fwer(study):
    design, contrasts, ftests, inputs = study
    _, result = _run(inputs[0], design, contrasts[:1], None)
    ((p, _),) = fwe_across(result.contrasts)
    np.testing.assert_array_equal(p, result.contrasts[0].p_fwe)


def test_variance_groups_are_compared_as_the_z_the_engine_uses(study):
    """With --vg the engine's statistic is already the z of v/G: corrcon, parametric p and NPC take it as it is."""
    design, contrasts, ftests, inputs = study
    groups = design[:, 0].astype(int) + 1
    prepared = [_run(y, design, contrasts[:1], None, variance_groups=groups)[0] for y in inputs]
    results = [run_chunk_loop(test, False) for test in prepared]
    c = results[0].contrasts[0]
    assert c.statistic == "Aspin-Welch v"
    ((p, _),) = fwe_across([c])
    np.testing.assert_array_equal(p, c.p_fwe)
    np.testing.assert_allclose(parametric_p(c), sps.norm.sf(c.z), rtol=1e-6)
    (combined,) = npc_test(prepared, "stouffer")
    expected = (results[0].contrasts[0].z.astype(np.float64) + results[1].contrasts[0].z) / np.sqrt(2)
    np.testing.assert_allclose(combined.stat, expected, rtol=1e-5, atol=1e-6)


def test_corrmod_and_both_match_numpy_on_the_same_rearrangements(study):
    (r1, ref1), (r2, ref2) = _reference(study, 0), _reference(study, 1)
    np.testing.assert_array_equal(r1.scheme.chunk(0, 150)[0], r2.scheme.chunk(0, 150)[0])
    z1 = [_z(s, kind, df1, dof) for s, kind, df1, dof in ref1]
    z2 = [_z(s, kind, df1, dof) for s, kind, df1, dof in ref2]
    for j in range(len(z1)):
        null = np.maximum(z1[j].max(1), z2[j].max(1))
        got = fwe_across([r1.contrasts[j], r2.contrasts[j]])
        for (p, _), z in zip(got, (z1[j], z2[j])):
            np.testing.assert_array_equal(p, (null[None] >= z[0][:, None]).mean(1))
    null = np.max([z.max(1) for z in z1 + z2], axis=0)
    got = fwe_across(r1.contrasts + r2.contrasts)
    for (p, _), z in zip(got, z1 + z2):
        np.testing.assert_array_equal(p, (null[None] >= z[0][:, None]).mean(1))


def test_spatial_statistics_are_corrected_across_contrasts(study):
    design, contrasts, ftests, inputs = study
    _, result = _run(inputs[0], design, contrasts, None, spatial={"same": lambda s: s})
    null = np.max([c.spatial["same"].null_max for c in result.contrasts], axis=0)
    for (_, spatial), c in zip(fwe_across(result.contrasts), result.contrasts):
        np.testing.assert_array_equal(spatial["same"], (null[None] >= c.stat[:, None]).mean(1))


def test_parametric_p_matches_scipy(study):
    design, contrasts, ftests, inputs = study
    _, result = _run(inputs[0], design, contrasts, ftests)
    for c in result.contrasts:
        dof = c.df[1]
        expected = sps.t.sf(c.stat.astype(np.float64), dof) if c.kind == "t" else sps.f.sf(c.stat, c.df[0], dof)
        np.testing.assert_allclose(parametric_p(c), expected, rtol=1e-9, atol=1e-300)


def test_combining_functions_by_hand():
    z = torch.tensor([[1.0, -0.5], [2.0, 0.25], [0.3, 3.0]], dtype=torch.float64)  # 3 inputs, 2 voxels
    p = sps.norm.sf(z.numpy())
    np.testing.assert_allclose(combine_statistics(z, "fisher").numpy(), -2 * np.log(p).sum(0), rtol=1e-12)
    np.testing.assert_allclose(combine_statistics(z, "stouffer").numpy(), z.numpy().sum(0) / np.sqrt(3), rtol=1e-12)
    np.testing.assert_allclose(sps.norm.sf(combine_statistics(z, "tippett").numpy()), p.min(0), rtol=1e-12)


def _hand_npc(method, partial_p):
    """(score, larger is more significant) from partial p ``(K, n_perm, V)``, and its parametric p."""
    k = partial_p.shape[0]
    if method == "fisher":
        t = -2 * np.log(partial_p).sum(0)
        return t, sps.chi2.sf(t[0], 2 * k)
    if method == "stouffer":
        t = sps.norm.isf(partial_p).sum(0) / np.sqrt(k)
        return t, sps.norm.sf(t[0])
    t = partial_p.min(0)  # Tippett: smaller is more significant
    return -t, 1 - (1 - t[0]) ** k


@pytest.mark.parametrize("method", ["fisher", "stouffer", "tippett"])
def test_npc_matches_hand_computation(study, method):
    design, contrasts, ftests, inputs = study
    prepared = [_run(y, design, contrasts, ftests)[0] for y in inputs]
    got = npc_test(prepared, method)
    orders, signs = prepared[0].scheme.chunk(0, prepared[0].scheme.n_perm)
    refs = [_reference_stats(y, design, contrasts, ftests, orders, signs) for y in inputs]
    scores = []
    for j, r in enumerate(got):
        partial = np.array([
            sps.t.sf(ref[j][0], ref[j][3]) if ref[j][1] == "t" else sps.f.sf(ref[j][0], ref[j][2], ref[j][3])
            for ref in refs
        ])
        score, para = _hand_npc(method, partial)
        scores.append(score)
        p_unc = (score >= score[0]).mean(0)
        p_fwe = (score.max(1)[None] >= score[0][:, None]).mean(1)
        # float32 statistics: a voxel whose count differs sits within rounding of a tie; none expected here.
        np.testing.assert_array_equal(r.p_uncorrected, p_unc)
        np.testing.assert_array_equal(r.p_fwe, p_fwe)
        np.testing.assert_allclose(r.p_parametric, para, rtol=1e-3)
        if method != "tippett":
            np.testing.assert_allclose(r.stat, score[0], rtol=1e-4)
    null = np.max([score.max(1) for score in scores], axis=0)  # --corrcon of the combined statistics
    for p, score in zip(combined_fwe_across(got), scores):
        np.testing.assert_array_equal(p, (null[None] >= score[0][:, None]).mean(1))


def test_npc_does_not_depend_on_chunk_size(study):
    design, contrasts, ftests, inputs = study
    prepared = [_run(y, design, contrasts, ftests)[0] for y in inputs]
    whole = npc_test(prepared, "fisher")
    chunked = npc_test([replace(p, chunk=7) for p in prepared], "fisher")
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a.null_max, b.null_max)
        np.testing.assert_array_equal(a.p_uncorrected, b.p_uncorrected)


def _write_inputs(tmp_path, rng, n_vol=16):
    from gpuconn.stats.design import write_vest

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    paths = []
    for k in range(2):
        data = rng.normal(size=(5, 6, 4, n_vol)).astype(np.float32)
        data[1:3, 1:3, 1:3, :8] += 1.5
        paths.append(tmp_path / f"in{k}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), paths[-1])
    mask = np.zeros((5, 6, 4), np.uint8)
    mask[:, :, 1:] = 1
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    group = np.r_[np.ones(8), np.zeros(8)]
    write_vest(tmp_path / "d.mat", np.c_[group, 1 - group])
    write_vest(tmp_path / "d.con", np.array([[1.0, -1.0], [-1.0, 1.0]]), kind="con")
    return paths, {"design_path": tmp_path / "d.mat", "contrast_path": tmp_path / "d.con",
                   "mask_path": tmp_path / "mask.nii.gz", "permutation": PermutationOptions(n_perm=100, seed=2),
                   "progress": False}


def _outputs(folder):
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".nii.gz"):
            out[path.name] = np.asarray(nib.load(path).dataobj).tobytes()
        elif path.name.endswith(".txt"):
            out[path.name] = path.read_bytes()
    return out


def test_single_input_outputs_are_unchanged(tmp_path, rng):
    paths, options = _write_inputs(tmp_path, rng)
    randomise(paths[0], tmp_path / "old" / "r", uncorrp=True, **options)
    randomise_inputs(paths[:1], tmp_path / "new" / "r", uncorrp=True, **options)
    old, new = _outputs(tmp_path / "old"), _outputs(tmp_path / "new")
    assert old == new and len(old) > 5
    sidecar = json.loads((tmp_path / "old" / "r.json").read_text())["Parameters"]
    extended = json.loads((tmp_path / "new" / "r.json").read_text())["Parameters"]
    assert {k: v for k, v in extended.items() if k in sidecar and k != "permutation_seconds"} == \
           {k: v for k, v in sidecar.items() if k != "permutation_seconds"}
    assert extended["corrcon"] is False and extended["npc"] is None


def test_bad_inputs_are_refused_by_name(tmp_path, rng):
    paths, options = _write_inputs(tmp_path, rng)
    with pytest.raises(InputError, match="^npc works across several inputs; give two or more input_paths images, or drop npc$"):
        randomise_inputs(paths[:1], tmp_path / "o", npc="fisher", **options)
    with pytest.raises(InputError, match="^corrmod works across several inputs"):
        randomise_inputs(paths[:1], tmp_path / "o", corrmod=True, **options)
    with pytest.raises(InputError, match="^npc 'min' is not one of"):
        randomise_inputs(paths, tmp_path / "o", npc="min", **options)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(size=(5, 6, 4, 16)).astype(np.float32), affine), tmp_path / "grid.nii.gz")
    with pytest.raises(InputError, match=r"grid\.nii\.gz is not on the grid of .*in0\.nii\.gz"):
        randomise_inputs([paths[0], tmp_path / "grid.nii.gz"], tmp_path / "o", **options)
    nib.save(nib.Nifti1Image(rng.normal(size=(5, 6, 4, 14)).astype(np.float32), np.diag([3.0, 3, 3, 1])),
             tmp_path / "short.nii.gz")
    with pytest.raises(InputError, match=r"short\.nii\.gz has 14 volumes but .*in0\.nii\.gz has 16"):
        randomise_inputs([paths[0], tmp_path / "short.nii.gz"], tmp_path / "o", **options)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_cli_two_inputs_write_per_input_and_combined_outputs(tmp_path, rng):
    from gpuconn.cli.app import run

    paths, _ = _write_inputs(tmp_path, rng)
    root = tmp_path / "out" / "r"
    rc = run(["randomise", "-i", str(paths[0]), "-i", str(paths[1]), "-o", str(root), "-d", str(tmp_path / "d.mat"),
              "-t", str(tmp_path / "d.con"), "-m", str(tmp_path / "mask.nii.gz"), "-n", "100", "--seed", "2",
              "--corrcon", "--corrmod", "--npc", "stouffer", "--save-parametric", "-q"])
    assert rc == 0
    names = {p.name for p in root.parent.iterdir()}
    for k in (1, 2):
        for prefix in ("", "vox_corrp_", "vox_ccorrp_", "vox_mcorrp_", "vox_mccorrp_", "vox_parap_"):
            assert f"r_m{k}_{prefix}tstat1.nii.gz" in names
    for prefix in ("", "vox_corrp_", "vox_ccorrp_", "vox_parap_"):
        assert f"r_npc_stouffer_{prefix}tstat2.nii.gz" in names
    assert {"r.json", "r_m1.json", "r_perm_npc_stouffer_tstat1.txt"} <= names
    assert not any("checkpoint" in n for n in names)
    sidecar = json.loads((root.parent / "r.json").read_text())["Parameters"]
    assert sidecar["npc"] == "stouffer" and sidecar["corrmod"] and sidecar["input_roots"][1].endswith("r_m2")
    mcc = nib.load(root.parent / "r_m1_vox_mccorrp_tstat1.nii.gz").get_fdata()
    mc = nib.load(root.parent / "r_m1_vox_mcorrp_tstat1.nii.gz").get_fdata()
    own = nib.load(root.parent / "r_m1_vox_corrp_tstat1.nii.gz").get_fdata()
    assert np.all(mcc <= mc + 1e-7) and np.all(mc <= own + 1e-7)  # 1 - p: more correction, smaller values

