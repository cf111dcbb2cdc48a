"""Data safety and sharing: file modes, inputs never overwritten, output locks, Ctrl-C, estimates, caches.

Each test here failed before the fix it covers (issue: a tool people can
share, interrupt and trust with their data).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import gpuconn.stats.randomise as engine
from gpuconn.cli.app import run
from gpuconn.core.io import output_lock, write_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_sample(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(0.5, 1.0, size=(6, 5, 4, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "maps.nii.gz")
    return tmp_path


def _randomise(folder: Path, root: Path | str, *extra: str) -> list[str]:
    return ["randomise", "-i", str(folder / "maps.nii.gz"), "-o", str(root), "-1", "-n", "20", "--device", "cpu",
            "-q", *extra]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_get_the_mode_of_a_plain_open(one_sample, umask, mode):
    previous = os.umask(umask)
    try:
        assert run(_randomise(one_sample, one_sample / "grp")) == 0
        written = write_text(one_sample / "note.txt", "x")
    finally:
        os.umask(previous)
    outputs = list(one_sample.glob("grp*")) + [written]
    assert len(outputs) > 3
    for path in outputs:
        assert path.stat().st_mode & 0o777 == mode, path.name


def test_a_command_never_writes_over_its_input(one_sample, capsys):
    first = one_sample / "x"
    assert run(_randomise(one_sample, first)) == 0
    before = (one_sample / "x_tstat1.nii.gz").read_bytes()
    argv = ["randomise", "-i", str(one_sample / "x_tstat1.nii.gz"), "-o", str(first), "-1", "-n", "5", "-q"]
    import shutil

    shutil.copy(one_sample / "maps.nii.gz", one_sample / "x_tstat1.nii.gz")  # a 4D input with an output's name
    before = (one_sample / "x_tstat1.nii.gz").read_bytes()
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "x_tstat1.nii.gz is an input of this command" in err and err.count("\n") == 1
    assert (one_sample / "x_tstat1.nii.gz").read_bytes() == before


def test_an_image_extension_on_the_output_root_is_stripped(one_sample):
    assert run(_randomise(one_sample, one_sample / "grp.nii.gz")) == 0
    assert (one_sample / "grp_tstat1.nii.gz").exists()
    assert not list(one_sample.glob("grp.nii.gz_*"))


def test_a_second_writer_of_the_same_outputs_stops_naming_the_first(one_sample, capsys):
    root = one_sample / "busy" / "grp"
    root.parent.mkdir()
    with output_lock(root):
        assert run(_randomise(one_sample, root)) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on " in err and "wait for it to finish" in err and err.count("\n") == 1
    assert not list(root.parent.glob("grp_*"))
    # A lock file left by a killed process (no one holds its flock) is taken over.
    root.with_name("grp.lock").write_text("pid 999999 on elsewhere, started long ago\n")
    assert run(_randomise(one_sample, root)) == 0
    assert not root.with_name("grp.lock").exists()


def test_ctrl_c_saves_the_checkpoint_now_and_says_how_to_resume(one_sample, monkeypatch, capsys):
    original = engine.evaluate_chunk

    def evaluate(prepared, start, stop):
        if start >= 8:
            raise KeyboardInterrupt
        return original(prepared, start, stop)

    monkeypatch.setattr(engine, "evaluate_chunk", evaluate)
    root = one_sample / "grp"
    # checkpoints are due only every hour: the interrupt itself must write one
    argv = _randomise(one_sample, root, "--max-memory", "10KB", "--checkpoint-interval", "3600")
    assert run(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted after 8 of 20 rearrangements" in err and "--resume" in err
    assert (one_sample / "grp_checkpoint.npz").exists()
    monkeypatch.setattr(engine, "evaluate_chunk", original)
    assert run(argv) == 0  # without --resume: says it starts over
    assert "holds the permutations of an interrupted run; starting over" in capsys.readouterr().err


def test_n_accepts_scientific_notation_and_the_estimate_is_printed_in_logs(one_sample, capsys, monkeypatch):
    from gpuconn.core import progress

    monkeypatch.setattr(progress, "ESTIMATE_FROM_S", 0.0)  # this run is short; say it anyway
    argv = [a for a in _randomise(one_sample, one_sample / "g", "--max-memory", "10KB") if a != "-q"]
    argv[argv.index("20")] = "2e1"
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "randomise: " in err and " of 20 in " in err and "in all" in err  # stderr is not a terminal here
    assert "\n\n" not in err
    monkeypatch.setattr(progress, "ESTIMATE_FROM_S", 1e9)  # expected to take less: nothing to say
    assert run(argv) == 0
    assert "in all" not in capsys.readouterr().err


def test_version():
    result = subprocess.run([sys.executable, "-m", "gpuconn.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("gpuconn ")


def test_numba_caches_stay_out_of_the_installed_package(tmp_path):
    """A non-editable install, a Numba path run from it: no compiled cache inside the package.

    Numba's default cache (__pycache__ beside the source) survived pip's
    reinstall and turned site-packages/gpuconn into a namespace package that
    shadowed a later editable install (the CLI could not start).
    """
    import shutil

    source = tmp_path / "src"  # setuptools builds in the source tree: build a copy, not the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "tests", "bench", "*.egg-info",
                                                                 "__pycache__", "demo-out"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(target), XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = ("import numpy as np; from gpuconn.stats.clusters import label_maps; "
            "print(int(label_maps(np.ones((1, 8)), np.ones((2, 2, 2), bool), threshold=0.5).max()))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    package = target / "gpuconn"
    cached = [p for p in package.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert not cached, cached
    assert list((tmp_path / "cache" / "gpuconn" / "numba").rglob("*.nbi"))


def test_repetition_time_falls_back_to_the_bids_sidecar(tmp_path):
    """A header TR of 0 (some converters write it) takes RepetitionTime from the BOLD's JSON, and says so."""
    import json

    from gpuconn.core.errors import InputError
    from gpuconn.subject.denoise import repetition_time

    img = nib.Nifti1Image(np.zeros((2, 2, 2, 5), np.float32), np.eye(4))
    img.header.set_zooms((2.0, 2.0, 2.0, 0.0))
    bold = tmp_path / "sub-01_task-rest_desc-preproc_bold.nii.gz"
    with pytest.raises(InputError, match="nor a RepetitionTime in sub-01_task-rest_desc-preproc_bold.json; pass tr"):
        repetition_time(img, bold)
    (tmp_path / "sub-01_task-rest_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 2.5}))
    with pytest.warns(UserWarning, match=r"using RepetitionTime = 2.5 s from sub-01_task-rest_desc-preproc_bold.json"):
        assert repetition_time(img, bold) == 2.5
    img.header.set_zooms((2.0, 2.0, 2.0, 3.0))
    assert repetition_time(img, bold) == 3.0  # the header wins when it has one


def test_denoised_outputs_are_a_derivatives_folder_with_their_mask(tmp_path):
    """denoise --derivatives writes the mask it used beside each run: seed reads the output without --mask."""
    from gpuconn.study.simulate import simulate_study

    simulate_study(tmp_path / "data", n_patients=3, n_controls=2, n_volumes=30, voxel_size=8.0, seed=2)
    assert run(["denoise", "--derivatives", str(tmp_path / "data"), "-o", str(tmp_path / "den"), "--acompcor", "0",
                "--device", "cpu", "-q"]) == 0
    masks = sorted((tmp_path / "den").rglob("*_desc-brain_mask.nii.gz"))
    bolds = sorted((tmp_path / "den").rglob("*_desc-denoised_bold.nii.gz"))
    assert len(masks) == len(bolds) > 0
    assert run(["seed", "--derivatives", str(tmp_path / "den"), "--bold-desc", "denoised", "--seed-coord", "-18,-38,72",
                "--radius", "8", "-o", str(tmp_path / "seeds"), "--device", "cpu", "-q"]) == 0
    assert len(list((tmp_path / "seeds").glob("*_stat-z_seedmap.nii.gz"))) == len(bolds)


def test_participant_label_takes_several_values_after_one_flag(tmp_path):
    """The BIDS-App form --participant-label 001 sub-004 (with or without sub-), then a path that is no label."""
    import pandas as pd

    from gpuconn.study.simulate import simulate_study

    simulate_study(tmp_path / "data", n_patients=3, n_controls=2, n_volumes=20, voxel_size=8.0, seed=2)
    out = tmp_path / "qc.tsv"
    assert run(["qc", "--derivatives", str(tmp_path / "data"), "--participant-label", "001", "sub-004", "-o", str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert sorted(set(table["participant_id"])) == ["sub-001", "sub-004"]
