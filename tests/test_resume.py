"""Checkpoints and ``gpuconn randomise --resume``: a killed run continues and ends identical.

Chunks are kept small with ``--max-memory`` (the chunk size is planned
from it) and checkpoints are written after every chunk
(``--checkpoint-interval 0``). "Identical" means byte-equal NIfTI data and
equal null-distribution text files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import gpuconn.stats.randomise as engine
from gpuconn.stats.checkpoint import checkpoint_path
from gpuconn.cli.app import run

SHAPE = (8, 8, 6)
N_SUBJECTS = 12
N_PERM = 300
# Per-rearrangement working memory is ~4 bytes x ~300 voxels x ~20 rows; 256 KB -> chunks of a few.
SMALL = "256KB"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resume_in")
    rng = np.random.default_rng(5)
    data = gaussian_filter(rng.standard_normal(SHAPE + (N_SUBJECTS,)), (1, 1, 1, 0))
    x = rng.standard_normal(N_SUBJECTS)
    data[2:5, 2:5, 2:4] += 0.8 * x  # an effect, so p-values are not all 1
    mask = np.zeros(SHAPE)
    mask[1:7, 1:7, 1:5] = 1
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(d / "maps.nii.gz"))
    nib.save(nib.Nifti1Image(mask.astype(np.float32), np.eye(4)), str(d / "mask.nii.gz"))
    rows = "".join(f"1 {v:.6f}\n" for v in x)
    (d / "design.mat").write_text(f"/NumWaves 2\n/NumPoints {N_SUBJECTS}\n/Matrix\n{rows}")
    (d / "design.con").write_text("/NumWaves 2\n/NumContrasts 2\n/Matrix\n0 1\n0 -1\n")
    return {"maps": d / "maps.nii.gz", "mask": d / "mask.nii.gz", "design": d / "design.mat", "con": d / "design.con"}


def _argv(inputs: dict, root: Path, *extra: str) -> list[str]:
    return ["randomise", "-i", str(inputs["maps"]), "-d", str(inputs["design"]), "-t", str(inputs["con"]),
            "-m", str(inputs["mask"]), "-n", str(N_PERM), "--seed", "7", "-o", str(root), "-q",
            "--device", "cpu", "--max-memory", SMALL, "--checkpoint-interval", "0", *extra]


def _outputs(root: Path) -> dict[str, object]:
    """Every output of ``root`` but the JSON sidecar (which records timings): image data and null files."""
    found = {}
    for path in sorted(root.parent.glob(root.name + "_*")):
        if path.name.endswith(".nii.gz"):
            found[path.name] = np.asarray(nib.load(str(path)).dataobj).tobytes()
        elif path.suffix == ".txt":
            found[path.name] = path.read_text()
    return found


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict:
    """Uninterrupted runs (plain and with TFCE), for comparison."""
    out = tmp_path_factory.mktemp("reference")
    assert run(_argv(inputs, out / "plain")) == 0
    assert run(_argv(inputs, out / "tfce", "-T")) == 0
    assert not list(out.glob("*checkpoint*")), "the checkpoint is deleted after success"
    return {"plain": _outputs(out / "plain"), "tfce": _outputs(out / "tfce")}


def _interrupt_after(monkeypatch, stop_at: int) -> list[int]:
    """Make the engine raise KeyboardInterrupt (Ctrl-C) at the first chunk starting at or after ``stop_at``."""
    original = engine.evaluate_chunk
    starts: list[int] = []

    def evaluate(prepared, start, stop):
        starts.append(start)
        if start >= stop_at:
            raise KeyboardInterrupt
        return original(prepared, start, stop)

    monkeypatch.setattr(engine, "evaluate_chunk", evaluate)
    return starts


@pytest.mark.parametrize("kind", ["plain", "tfce"])
def test_interrupt_then_resume_is_identical(kind, inputs, reference, tmp_path, monkeypatch, capsys):
    root = tmp_path / kind
    extra = ("-T",) if kind == "tfce" else ()
    starts = _interrupt_after(monkeypatch, N_PERM // 2)
    assert run(_argv(inputs, root, *extra)) == 130  # Ctrl-C: "Aborted!", exit 130
    assert len(starts) > 3, "the chunks must be small for this test"
    checkpoint = checkpoint_path(root)
    assert checkpoint.exists()
    assert not _outputs(root), "an interrupted run leaves no output"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    with np.load(checkpoint) as npz:
        done = json.loads(str(npz["meta"]))["done"]
    assert 0 < done < N_PERM

    monkeypatch.undo()
    resumed = _interrupt_after(monkeypatch, N_PERM + 1)  # count the chunks, interrupt none
    assert run(_argv(inputs, root, *extra, "--resume")) == 0, capsys.readouterr().err
    assert min(resumed) == done, "the resumed run starts after the checkpoint"
    assert not checkpoint.exists()
    _assert_same(_outputs(root), reference[kind])


def test_two_inputs_interrupt_then_resume_is_identical(inputs, tmp_path, monkeypatch, capsys):
    """Several inputs: one checkpoint per input root (<root>_m1_checkpoint.npz); --corrmod after the resume."""
    img = nib.load(str(inputs["maps"]))
    second = tmp_path / "maps2.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2.0 + 1.0, img.affine), str(second))
    extra = ("-i", str(second), "--corrmod")
    assert run(_argv(inputs, tmp_path / "ref" / "r", *extra)) == 0
    root = tmp_path / "two" / "r"
    _interrupt_after(monkeypatch, N_PERM // 2)
    assert run(_argv(inputs, root, *extra)) == 130
    assert checkpoint_path(f"{root}_m1").exists()
    monkeypatch.undo()
    assert run(_argv(inputs, root, *extra, "--resume")) == 0, capsys.readouterr().err
    assert not list(root.parent.glob("*checkpoint*"))
    reference = _outputs(tmp_path / "ref" / "r")
    assert "r_m2_vox_mcorrp_tstat1.nii.gz" in reference
    _assert_same(_outputs(root), reference)


def test_resume_with_another_chunk_size(inputs, reference, tmp_path, monkeypatch):
    """Chunk boundaries after the resume differ from those before: same results."""
    root = tmp_path / "plain"
    _interrupt_after(monkeypatch, 100)
    assert run(_argv(inputs, root)) == 130
    monkeypatch.undo()
    assert run(_argv(inputs, root, "--resume", "--max-memory", "1MB")) == 0
    _assert_same(_outputs(root), reference["plain"])


def test_resume_rejects_other_options(inputs, tmp_path, monkeypatch, capsys):
    root = tmp_path / "plain"
    _interrupt_after(monkeypatch, 100)
    assert run(_argv(inputs, root)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    argv = _argv(inputs, root, "--resume")
    argv[argv.index("--seed") + 1] = "8"
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint" in err and "--resume" in err and str(checkpoint_path(root)) in err
    assert checkpoint_path(root).exists(), "a rejected checkpoint is kept"
    assert not _outputs(root)
    # Without --resume the run starts over and replaces the old checkpoint.
    assert run(argv[:-1]) == 0
    assert not checkpoint_path(root).exists()


def test_resume_without_checkpoint_starts_over(inputs, reference, tmp_path):
    root = tmp_path / "plain"
    stale = tmp_path / f".{checkpoint_path(root).name}.x1y2z3.tmp"  # as a kill mid-write leaves it
    stale.write_bytes(b"partial")
    assert run(_argv(inputs, root, "--resume")) == 0
    assert not stale.exists()
    _assert_same(_outputs(root), reference["plain"])


_SLOW_RUN = """
import sys, time
import gpuconn.stats.randomise as engine
original = engine.evaluate_chunk
def slow(*args, **kwargs):
    time.sleep(0.05)
    return original(*args, **kwargs)
engine.evaluate_chunk = slow
from gpuconn.cli.app import main
sys.argv = ["gpuconn", *sys.argv[1:]]
main()
"""


def test_sigkill_then_resume_is_identical(inputs, reference, tmp_path):
    """A run killed with SIGKILL (no clean-up at all) resumes from its last checkpoint."""
    root = tmp_path / "plain"
    checkpoint = checkpoint_path(root)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *_argv(inputs, root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few more chunks (and checkpoint rewrites) before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    proc.stderr.close()
    assert checkpoint.exists() and not _outputs(root)
    # (A kill during a checkpoint write may leave its temporary file; the resumed run removes it.)
    with np.load(checkpoint) as npz:
        assert 0 < json.loads(str(npz["meta"]))["done"] < N_PERM
    assert run(_argv(inputs, root, "--resume")) == 0
    assert not checkpoint.exists()
    _assert_same(_outputs(root), reference["plain"])
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """A SIGKILL mid-write leaves ``.<stem>.XXXX.tmp.nii.gz``; writing that output again removes it."""
    from gpuconn.core.io import save_image

    reference = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.float32), np.eye(4))
    stale = tmp_path / ".r_tstat1.abc12345.tmp.nii.gz"
    other = tmp_path / ".r_tstat10.abc12345.tmp.nii.gz"  # another output's temporary: kept
    stale.write_bytes(b"partial")
    other.write_bytes(b"partial")
    save_image(np.ones((2, 2, 2)), reference, tmp_path / "r_tstat1.nii.gz", sidecar=False)
    assert not stale.exists() and other.exists()
