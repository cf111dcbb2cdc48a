"""``gpuconn flame``: flameo's outputs on small images, GRF clusters, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gpuconn.cli.app import run
from gpuconn.core.io import masked_data
from gpuconn.stats.design import write_vest
from gpuconn.stats.flame import flame

SHAPE = (14, 14, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
N_SUBJECTS = 16


def _smooth(rng, n, fwhm=2.5):
    sigma = fwhm / math.sqrt(8 * math.log(2))
    return np.stack([ndimage.gaussian_filter(rng.standard_normal(SHAPE), sigma) for _ in range(n)], axis=-1)


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), AFFINE), str(path))
    return path


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(3)
    copes = _smooth(rng, N_SUBJECTS) * 2.0
    copes[4:9, 4:9, 3:7] += 1.5  # a planted group effect
    varcopes = rng.uniform(0.2, 1.0, SHAPE + (N_SUBJECTS,))
    mask = np.zeros(SHAPE)
    mask[1:-1, 1:-1, 1:-1] = 1
    design = np.column_stack([np.ones(N_SUBJECTS), rng.standard_normal(N_SUBJECTS)])
    files = {
        "cope": _save(tmp_path / "cope.nii.gz", copes),
        "varcope": _save(tmp_path / "varcope.nii.gz", varcopes),
        "mask": _save(tmp_path / "mask.nii.gz", mask),
        "dm": write_vest(tmp_path / "design.mat", design),
        "tc": write_vest(tmp_path / "design.con", np.array([[1.0, 0.0], [0.0, 1.0]]), kind="con"),
        "cs": write_vest(tmp_path / "design.grp", np.repeat([1, 2], N_SUBJECTS // 2)[:, None], kind="grp"),
    }
    return files


def _argv(files, out, **extra):
    argv = ["flame", "--ld", str(out)]
    for key in ("cope", "varcope", "dm", "tc", "mask"):
        argv += [f"--{key}", str(files[key])]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_flame_writes_flameo_outputs_and_matches_library(inputs, tmp_path, capsys):
    out = tmp_path / "stats"
    assert run(_argv(inputs, out, cs=inputs["cs"])) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    for expected in ("pe1.nii.gz", "pe2.nii.gz", "cope1.nii.gz", "varcope2.nii.gz", "tstat1.nii.gz",
                     "zstat2.nii.gz", "tdof_t1.nii.gz", "mean_random_effects_var1.nii.gz",
                     "mean_random_effects_var2.nii.gz", "res4d.nii.gz", "mask.nii.gz", "thresh_zstat1.nii.gz",
                     "cluster_index_zstat1.nii.gz", "cluster_zstat1.tsv", "smoothness.json", "flame.json"):
        assert expected in names
    assert not any(name.startswith(".") for name in names)  # no temporary files left
    mask = np.asarray(nib.load(inputs["mask"]).dataobj) > 0
    copes = masked_data(nib.load(inputs["cope"]), mask)
    varcopes = masked_data(nib.load(inputs["varcope"]), mask)
    design = np.loadtxt(inputs["dm"], skiprows=5)
    ref = flame(copes, varcopes, design, np.eye(2), groups=np.repeat([1, 2], N_SUBJECTS // 2), device="cpu")
    z = np.asarray(nib.load(out / "zstat1.nii.gz").dataobj)[mask]
    np.testing.assert_allclose(z, ref.zstat[0], rtol=1e-5, atol=1e-5)  # float32 output of a float64 result
    table = (out / "cluster_zstat1.tsv").read_text().splitlines()
    assert len(table) >= 2 and "p" in table[0].split("\t")  # the planted effect is found
    record = json.loads((out / "flame.json").read_text())
    assert record["Parameters"]["run_mode"] == "flame1" and record["Parameters"]["dof"] == N_SUBJECTS - 2
    assert "flame: zstat1:" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["fe", "ols"])
def test_flame_run_modes(inputs, tmp_path, capsys, mode):
    out = tmp_path / mode
    assert run(_argv(inputs, out, runmode=mode) + ["--no-clusters"]) == 0, capsys.readouterr().err
    dof = np.asarray(nib.load(out / "tdof_t1.nii.gz").dataobj)[5, 5, 5]
    assert dof == (1000 if mode == "fe" else N_SUBJECTS - 2)
    assert not (out / "cluster_zstat1.tsv").exists()


def _break(case, files, tmp_path):
    if case == "grid":
        data = np.asarray(nib.load(files["varcope"]).dataobj)[:-1]
        nib.save(nib.Nifti1Image(data, AFFINE), str(files["varcope"]))
    elif case in ("negative", "nan"):
        data = np.asarray(nib.load(files["varcope"]).dataobj).copy()
        data[5, 5, 5, 3] = -1.0 if case == "negative" else np.nan
        nib.save(nib.Nifti1Image(data, AFFINE), str(files["varcope"]))
    elif case == "columns":
        write_vest(files["dm"], np.random.default_rng(0).standard_normal((N_SUBJECTS, N_SUBJECTS + 1)))
        write_vest(files["tc"], np.eye(N_SUBJECTS + 1)[:1], kind="con")
    elif case == "groups":
        write_vest(files["cs"], np.ones((N_SUBJECTS - 1, 1)), kind="grp")
    return ["--cs", str(files["cs"])] if case == "groups" else []


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("grid", ["grid mismatch", "varcope.nii.gz", "resample"]),
        ("negative", ["varcope.nii.gz", "negative, NaN or Inf variances", "must be finite and >= 0"]),
        ("nan", ["varcope.nii.gz", "NaN or Inf"]),
        ("columns", ["design.mat"]),
        ("groups", ["design.grp", "15 rows but there are 16 subjects", "one variance group per subject"]),
        ("runmode", ["--runmode 'flame3'", "not one of fe, ols, flame1, flame12"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, capsys, case, expect):
    extra = _break(case, inputs, tmp_path)
    out = tmp_path / "stats"
    argv = _argv(inputs, out) + extra + (["--runmode", "flame3"] if case == "runmode" else [])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for text in expect:
        assert text in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even stats/


def test_flame12_from_the_command_line(inputs, tmp_path, capsys):
    out = tmp_path / "f12"
    argv = _argv(inputs, out, runmode="flame12", nj=300, bi=50, zlt=0.3, zut=3.0) + ["--no-clusters"]
    assert run(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "flame.json").read_text())["Parameters"]
    assert record["n_stage2_voxels"] > 0 and record["mcmc"]["n_jumps"] == 300
    mask = np.asarray(nib.load(inputs["mask"]).dataobj) > 0
    dof = np.asarray(nib.load(out / "tdof_t1.nii.gz").dataobj)[mask]
    assert np.any(dof != N_SUBJECTS - 2) and np.all(dof >= 1)  # stage-2 voxels carry their fitted, smoothed dof


def test_mcmc_and_cluster_options_are_checked_once_and_named_as_flags(inputs, tmp_path, capsys):
    """McmcOptions and GrfOptions check the values; the CLI shows the flags the user typed."""
    assert run(_argv(inputs, tmp_path / "stats", runmode="flame12", nj=100, bi=200)) == 2
    assert "error: --nj 100, --bi 200, --se 1: need 0 <= --bi < --nj and --se >= 1\n" in capsys.readouterr().err
    assert run(_argv(inputs, tmp_path / "stats") + ["--cluster-p", "1.5"]) == 2
    assert "error: --cluster-p must be in (0, 1], got 1.5\n" in capsys.readouterr().err
    assert not (tmp_path / "stats").exists()

