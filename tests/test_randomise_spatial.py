"""``gpuconn randomise -T -c -C -F -S``: output names and values against the CPU twins."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gpuconn.cli.app import run
from gpuconn.stats.clusters import cluster_maps
from gpuconn.stats.design import Design, save_design
from gpuconn.stats.spatial import spatial_transforms
from gpuconn.stats.tfce import tfce
from gpuconn.stats.options import ClusterOptions, PermutationOptions, TfceOptions

SHAPE = (10, 9, 8)


@pytest.fixture
def one_sample(tmp_path, rng):
    """12 smoothed noise volumes with a planted positive blob, and an all-ones mask."""
    noise = ndimage.gaussian_filter(rng.normal(size=SHAPE + (12,)), (1, 1, 1, 0))
    noise /= noise.std()
    noise[3:7, 3:6, 2:6] += 1.2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(noise.astype(np.float32), affine), tmp_path / "data.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), affine), tmp_path / "mask.nii.gz")
    return tmp_path


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _corrp_from_null(observed, null):
    """1 - p with randomise's rule: p = #{null >= observed} / n (null includes the identity)."""
    return 1.0 - (null[None, :] >= observed[:, None]).sum(axis=1) / null.size


def test_tfce_and_clusters_outputs(one_sample):
    root = one_sample / "out"
    rc = run([
        "randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-m", str(one_sample / "mask.nii.gz"),
        "-1", "-n", "40", "-T", "-c", "2.3", "-C", "2.3", "--seed", "3", "--device", "cpu", "-q",
    ])
    assert rc == 0
    mask = np.ones(SHAPE, dtype=bool)
    tstat = _load(f"{root}_tstat1.nii.gz")[mask][None]
    # observed TFCE equals the CPU twin on the written t map
    tfce_map = _load(f"{root}_tfce_tstat1.nii.gz")[mask]
    np.testing.assert_allclose(tfce_map, tfce(tstat, mask).numpy()[0], rtol=1e-5, atol=1e-4)
    for name, observed in [
        ("tfce", tfce_map),
        ("clustere", cluster_maps(tstat, mask, threshold=2.3, kind="extent", connectivity=26).numpy()[0]),
        ("clusterm", cluster_maps(tstat, mask, threshold=2.3, kind="mass", connectivity=26).numpy()[0]),
    ]:
        null = np.loadtxt(f"{root}_perm_{name}_tstat1.txt")
        assert null.shape == (40,)
        assert null[0] == pytest.approx(observed.max(), rel=1e-5)  # rearrangement 0 is the identity
        corrp = _load(f"{root}_{name}_corrp_tstat1.nii.gz")[mask]
        np.testing.assert_allclose(corrp, _corrp_from_null(observed.astype(np.float32), null.astype(np.float32)),
                                   atol=1e-6)
    assert _load(f"{root}_clustere_corrp_tstat1.nii.gz").max() > 0.9  # the planted blob
    # voxelwise corrected p only with -x when spatial statistics are asked for
    assert not (one_sample / "out_vox_corrp_tstat1.nii.gz").exists()


def test_f_test_clusters_and_t2(one_sample, rng):
    design = Design(np.column_stack([np.ones(12), rng.normal(size=12)]), np.eye(2), np.array([[1, 1]]))
    save_design(design, one_sample / "design")
    root = one_sample / "f"
    rc = run([
        "randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-m", str(one_sample / "mask.nii.gz"),
        "-d", str(one_sample / "design.mat"), "-t", str(one_sample / "design.con"), "-f", str(one_sample / "design.fts"),
        "-n", "20", "--T2", "--tfce-E", "0.5", "-F", "4.0", "-S", "4.0", "--device", "cpu", "-q", "--method", "flip",
    ])
    assert rc == 0
    for name in ("tfce_tstat1", "tfce_corrp_tstat2", "tfce_fstat1", "tfce_corrp_fstat1", "clustere_corrp_fstat1",
                 "clusterm_corrp_fstat1"):
        assert (one_sample / f"f_{name}.nii.gz").exists(), name
    assert not (one_sample / "f_clustere_corrp_tstat1.nii.gz").exists()
    mask = np.ones(SHAPE, dtype=bool)
    tstat = _load(f"{root}_tstat1.nii.gz")[mask][None]
    # --T2 presets H=2, E=1, C=26; --tfce-E overrides E
    np.testing.assert_allclose(_load(f"{root}_tfce_tstat1.nii.gz")[mask],
                               tfce(tstat, mask, H=2, E=0.5, connectivity=26).numpy()[0], rtol=1e-5, atol=1e-4)


def test_f_cluster_options_without_f_tests_keep_voxelwise_p(one_sample):
    """-F/-S without -f has no F test to act on, so the t contrasts still get their voxelwise corrected p."""
    root = one_sample / "nof"
    rc = run(["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-1", "-n", "10", "-F", "2.0",
              "--device", "cpu", "-q"])
    assert rc == 0
    assert (one_sample / "nof_vox_corrp_tstat1.nii.gz").exists()
    assert not list(one_sample.glob("nof_cluster*"))


def test_fixed_step_option(one_sample, capsys):
    root = one_sample / "dh"
    rc = run(["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-1", "-n", "10", "-T",
              "--tfce-dh", "0.05", "--device", "cpu", "-q"])
    assert rc == 0
    mask = np.ones(SHAPE, dtype=bool)
    tstat = _load(f"{root}_tstat1.nii.gz")[mask][None]
    np.testing.assert_allclose(_load(f"{root}_tfce_tstat1.nii.gz")[mask], tfce(tstat, mask, dh=0.05).numpy()[0],
                               rtol=1e-5, atol=1e-4)
    rc = run(["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-1", "-T", "--tfce-dh", "0"])
    assert rc == 2 and "--tfce-dh must be positive, got 0.0" in capsys.readouterr().err
    rc = run(["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-1", "-T", "--tfce-dh", "0.1",
              "--tfce-exact"])
    assert rc == 2 and "the exact integral has none" in capsys.readouterr().err


def test_exact_tfce_option(one_sample):
    root = one_sample / "exact"
    rc = run(["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-1", "-n", "10", "-T",
              "--tfce-exact", "--device", "cpu", "-q"])
    assert rc == 0
    mask = np.ones(SHAPE, dtype=bool)
    tstat = _load(f"{root}_tstat1.nii.gz")[mask][None]
    np.testing.assert_allclose(_load(f"{root}_tfce_tstat1.nii.gz")[mask], tfce(tstat, mask, method="exact").numpy()[0],
                               rtol=1e-5, atol=1e-5)


def test_spatial_factory_none_and_errors(capsys):
    assert spatial_transforms() is None
    rc = run(["randomise", "-i", "missing.nii.gz", "-o", "x", "-1", "-T", "--tfce-C", "7"])
    assert rc == 2
    assert capsys.readouterr().err == "gpuconn: error: --tfce-C must be one of 6, 18, 26 (got 7)\n"


def test_null_fwer_within_binomial_interval():
    """TFCE / cluster FWER at alpha = 0.05 on many small null datasets (one-sample sign flips)."""
    from scipy import stats

    from gpuconn.stats.randomise import run_permutation_test

    rng = np.random.default_rng(11)
    shape, n_obs, n_sets = (8, 8, 6), 10, 200
    mask = np.ones(shape, dtype=bool)
    spatial = spatial_transforms(tfce=TfceOptions(), clusters=ClusterOptions(extent=1.5, mass=1.5))(mask)
    hits = {name: 0 for name in spatial}
    for i in range(n_sets):
        noise = ndimage.gaussian_filter(rng.normal(size=(n_obs,) + shape), (0, 1, 1, 1))
        result = run_permutation_test(noise[:, mask].astype(np.float32), np.ones((n_obs, 1)), np.ones((1, 1)),
                                      permutation=PermutationOptions(n_perm=100, seed=i, method="flip"),
                                      device="cpu", spatial=spatial)
        for name, mapped in result["tstat1"].spatial.items():
            hits[name] += bool(mapped.p_fwe.min() <= 0.05)
    for name, count in hits.items():
        # exact randomisation test: P(p_fwe <= 0.05) = 0.05; two-sided binomial test at 0.001
        assert stats.binomtest(count, n_sets, 0.05).pvalue > 0.001, (name, count)


def test_uncorrected_tfce_p_and_sidecar_record_the_settings(one_sample):
    """--uncorrp writes <root>_tfce_p_tstat1 (p = #{TFCE_i(v) >= TFCE_0(v)} / n); the sidecar says how to rerun."""
    import json

    import torch

    from gpuconn.stats.randomise import run_permutation_test
    from gpuconn.stats.tfce import tfce_transform

    root = one_sample / "unc"
    argv = ["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(root), "-1", "-n", "30", "-T",
            "-C", "2.5", "--uncorrp", "--seed", "4", "--device", "cpu", "-q"]
    assert run(argv) == 0
    mask = np.ones(SHAPE, dtype=bool)
    data = np.moveaxis(_load(one_sample / "data.nii.gz"), -1, 0)[:, mask]
    result = run_permutation_test(data, np.ones((12, 1)), np.ones((1, 1)),
                                  permutation=PermutationOptions(n_perm=30, seed=4), device="cpu",
                                  spatial={"tfce": tfce_transform(mask)})
    scheme, observed = result.scheme, result["tstat1"]
    orders, signs = scheme.chunk(0, scheme.n_perm)
    resid = data.astype(np.float64)
    t_maps = []
    for order, sign in zip(orders, signs):
        y = sign[:, None] * resid[order]
        t_maps.append(y.mean(0) / (y.std(0, ddof=1) / np.sqrt(12)))
    dh = float(np.float32(observed.stat.max())) / 100  # randomise: the unpermuted maximum / 100 for every map
    tfce_maps = tfce(torch.as_tensor(np.array(t_maps), dtype=torch.float32), mask, dh=dh).numpy()
    expected_p = (tfce_maps >= tfce_maps[0]).mean(0)
    np.testing.assert_allclose(1 - _load(f"{root}_tfce_p_tstat1.nii.gz")[mask], expected_p, atol=1e-6)
    record = json.loads((one_sample / "unc.json").read_text())
    assert record["GeneratedBy"]["CommandLine"].split() == ["gpuconn", *argv]
    params = record["Parameters"]
    assert params["spatial"]["tstat1"]["tfce"] == {"kind": "tfce", "H": 2.0, "E": 0.5, "connectivity": 6,
                                                   "dh": pytest.approx(dh), "method": "stepped", "on": "stat"}
    assert params["spatial"]["tstat1"]["clusterm"] == {"kind": "cluster mass", "threshold": 2.5, "connectivity": 26}
    assert params["uncorrp"] is True and params["resumed"] is False and params["method"] == "flip"
    assert params["options"]["C"] == 2.5


def test_tfce_with_t2_is_refused(one_sample, capsys):
    rc = run(["randomise", "-i", str(one_sample / "data.nii.gz"), "-o", str(one_sample / "x"), "-1", "-T", "--T2"])
    assert rc == 2 and "-T and --T2 are two TFCE settings; give one of them" in capsys.readouterr().err
