"""Determinism and device memory, end to end through the CLI.

- Same inputs + ``--seed`` -> byte-identical NIfTI data across runs and
  across chunk sizes (chunks planned from ``--max-memory``), CPU.
- Permutation sets identical whatever the chunking (exhaustive and block
  schemes; the random scheme is covered in test_permute.py).
- A simulated CUDA out-of-memory error (``torch.cuda.OutOfMemoryError``
  raised on the first big chunk, in the spatial-statistics stage) halves the
  chunk and the outputs stay byte-identical; one that persists down to a
  single rearrangement is a one-line error with no output.
- ``--max-memory`` parsing and its effect on the planned chunk.
- CPU vs CUDA (gpu-marked): statistics within float32 tolerance, the same
  rearrangements, p-values within a few counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from scipy.ndimage import gaussian_filter

import gpuconn.core.backend as backend
import gpuconn.stats.randomise as engine
from gpuconn.cli.app import run
from gpuconn.cli.options import parse_memory
from gpuconn.stats.permute import make_scheme
from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.spatial import spatial_transforms
from gpuconn.stats.options import PermutationOptions, TfceOptions

SHAPE = (8, 8, 6)
N_SUBJECTS = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("det_in")
    rng = np.random.default_rng(9)
    data = gaussian_filter(rng.standard_normal(SHAPE + (N_SUBJECTS,)), (1, 1, 1, 0))
    x = rng.standard_normal(N_SUBJECTS)
    data[2:5, 2:5, 2:4] += x
    mask = np.zeros(SHAPE)
    mask[1:7, 1:7, 1:5] = 1
    bold = 100 + gaussian_filter(rng.standard_normal(SHAPE + (40,)), (1, 1, 1, 0))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for name, values in {"maps": data, "mask": mask, "bold": bold, "bold2": bold[..., ::-1] * 1.01}.items():
        nib.save(nib.Nifti1Image(values.astype(np.float32), affine), str(d / f"{name}.nii.gz"))
    rows = "".join(f"1 {v:.6f}\n" for v in x)
    (d / "design.mat").write_text(f"/NumWaves 2\n/NumPoints {N_SUBJECTS}\n/Matrix\n{rows}")
    (d / "design.con").write_text("/NumWaves 2\n/NumContrasts 1\n/Matrix\n0 1\n")
    return {k: d / v for k, v in {"maps": "maps.nii.gz", "mask": "mask.nii.gz", "design": "design.mat",
                                   "con": "design.con", "bold": "bold.nii.gz", "bold2": "bold2.nii.gz"}.items()}


def _randomise(inputs, root: Path, *extra: str) -> list[str]:
    return ["randomise", "-i", str(inputs["maps"]), "-d", str(inputs["design"]), "-t", str(inputs["con"]),
            "-m", str(inputs["mask"]), "-n", "120", "-T", "-c", "2.0", "-x", "--uncorrp", "-o", str(root),
            "-q", "--device", "cpu", *extra]


def _images(folder: Path, pattern: str = "*.nii.gz") -> dict[str, bytes]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj).tobytes() for p in sorted(folder.glob(pattern))}


def _texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}


def _chunk(root: Path) -> int:
    return json.loads(Path(f"{root}.json").read_text())["Parameters"]["chunk_size"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det_ref")
    assert run(_randomise(inputs, out / "r", "--seed", "3")) == 0
    return out


def test_randomise_byte_identical_across_runs_and_chunk_sizes(inputs, reference, tmp_path):
    expected = _images(reference)
    assert {"r_tstat1.nii.gz", "r_tfce_corrp_tstat1.nii.gz", "r_clustere_corrp_tstat1.nii.gz"} <= set(expected)
    for name, extra in {"again": (), "small_chunks": ("--max-memory", "300KB")}.items():
        folder = tmp_path / name
        assert run(_randomise(inputs, folder / "r", "--seed", "3", *extra)) == 0
        assert _images(folder) == expected, name
        assert _texts(folder) == _texts(reference), name
    assert _chunk(tmp_path / "small_chunks" / "r") < _chunk(reference / "r")
    # The seed matters (the comparison above can fail).
    assert run(_randomise(inputs, tmp_path / "other" / "r", "--seed", "4")) == 0
    assert _texts(tmp_path / "other") != _texts(reference)


@pytest.mark.parametrize("command", ["ica", "dualreg", "denoise"])
def test_other_commands_byte_identical_across_runs(command, inputs, tmp_path):
    common = ["-q", "--device", "cpu"]
    argv = {
        "ica": ["ica", "run", str(inputs["bold"]), str(inputs["bold2"]), "-d", "3", "--seed", "5",
                "--mask", str(inputs["mask"]), *common],
        "dualreg": ["dualreg", str(inputs["maps"]), str(inputs["bold"]), str(inputs["bold2"]),
                    "--mask", str(inputs["mask"]), *common],
        "denoise": ["denoise", "--bold", str(inputs["bold"]), "--mask", str(inputs["mask"]), "--motion", "none",
                    "--acompcor", "0", "--physio-mode", "no", "--outlier-metric", "none", "--fwhm", "5", *common],
    }[command]
    outputs = []
    for i in range(2):
        assert run([*argv, "-o", str(tmp_path / str(i))]) == 0
        outputs.append(_images(tmp_path / str(i), "**/*.nii.gz"))
    assert outputs[0] and outputs[0] == outputs[1]


@pytest.mark.parametrize("kwargs", [
    {"n_perm": 0, "permute": True},  # exhaustive: 12! / (6! 6!)-like enumeration of a two-group design
    {"n_perm": 0, "permute": False, "flip": True},
    {"n_perm": 80, "permute": True, "flip": True, "blocks": np.repeat(np.arange(4), 3)},
    {"n_perm": 80, "permute": True, "blocks": np.repeat(np.arange(4), 3), "whole_blocks": True},
])
def test_permutation_sets_identical_across_chunkings(kwargs):
    design = np.c_[np.r_[np.ones(4), np.zeros(8)], np.r_[np.zeros(4), np.ones(8)]]
    if not kwargs.get("permute", True):
        design = np.ones((8, 1))
    scheme = make_scheme(design, seed=11, **kwargs)
    orders, signs = scheme.chunk(0, scheme.n_perm)
    for size in (1, 7, 64):
        pieces = [scheme.chunk(a, min(a + size, scheme.n_perm)) for a in range(0, scheme.n_perm, size)]
        np.testing.assert_array_equal(np.vstack([p[0] for p in pieces]), orders)
        np.testing.assert_array_equal(np.vstack([p[1] for p in pieces]), signs)
    again = make_scheme(design, seed=11, **kwargs).chunk(0, scheme.n_perm)
    np.testing.assert_array_equal(again[0], orders)
    np.testing.assert_array_equal(again[1], signs)


def _oom_on_first_big_chunk(monkeypatch, threshold: int) -> list[int]:
    """Raise torch.cuda.OutOfMemoryError in the spatial stage the first time a chunk exceeds ``threshold``."""
    real = engine._spatial_maps
    failed: list[int] = []

    def flaky(transforms, stats, name):
        if stats.shape[0] > threshold and not failed:
            failed.append(stats.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(transforms, stats, name)

    monkeypatch.setattr(engine, "_spatial_maps", flaky)
    return failed


def test_simulated_oom_halves_chunk_and_outputs_are_identical(inputs, reference, tmp_path, monkeypatch):
    failed = _oom_on_first_big_chunk(monkeypatch, threshold=8)
    assert run(_randomise(inputs, tmp_path / "r", "--seed", "3")) == 0
    assert failed and failed[0] > 8, "the OOM was injected"
    assert _images(tmp_path) == _images(reference)
    assert _texts(tmp_path) == _texts(reference)


def test_oom_even_for_one_rearrangement_is_one_line_and_no_output(inputs, tmp_path, monkeypatch, capsys):
    def always(transforms, stats, name):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_spatial_maps", always)
    capsys.readouterr()
    assert run(_randomise(inputs, tmp_path / "r", "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--device cpu" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("100", 100), ("64 kb", 64_000),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["2XB", "-1GB", "0", "lots", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(typer.BadParameter, match="memory size"):
        parse_memory(text)


def test_max_memory_caps_the_plan_and_is_reset(inputs, reference, tmp_path):
    """The chunk is planned from the cap: double the cap, double the chunk (+-1 for rounding)."""
    chunks = []
    for cap in ("200KB", "400KB"):
        assert run(_randomise(inputs, tmp_path / cap / "r", "--max-memory", cap)) == 0
        chunks.append(_chunk(tmp_path / cap / "r"))
    assert 1 < chunks[0] < chunks[1] < _chunk(reference / "r")
    assert abs(chunks[1] - 2 * chunks[0]) <= 1
    assert backend.max_memory() is None, "the cap does not leak into later commands"


def test_dualreg_max_memory_plans_smaller_batches(inputs, tmp_path, monkeypatch):
    """dualreg --max-memory: the subject batch is planned under the cap (same outputs)."""
    import gpuconn.maps.dualreg

    seen = []
    real = gpuconn.maps.dualreg.chunk_size
    def spy(*args, **kwargs):
        seen.append(backend.max_memory())
        return real(*args, **kwargs)

    monkeypatch.setattr(gpuconn.maps.dualreg, "chunk_size", spy)
    base = ["dualreg", str(inputs["maps"]), str(inputs["bold"]), str(inputs["bold2"]), "--mask", str(inputs["mask"]),
            "-q", "--device", "cpu"]
    assert run([*base, "-o", str(tmp_path / "a"), "--max-memory", "500KB"]) == 0
    assert run([*base, "-o", str(tmp_path / "b")]) == 0
    assert seen == [500_000, None]
    assert _images(tmp_path / "a") == _images(tmp_path / "b")


@pytest.mark.gpu
def test_cpu_and_cuda_agree(inputs):
    """CUDA vs CPU on the same data and seed.

    Tolerances: statistics rtol 1e-4 / atol 1e-4 (float32 data and products,
    float64 design, TF32 off: the design's t error budget); TFCE maps rtol
    1e-3 (the integral sums up to 100 thresholded extents of those values);
    p-values within 3/n_perm (a rearrangement whose statistic ties the
    observed one to float32 round-off may count on one device and not the
    other). The rearrangements are drawn on the host: identical.
    """
    img = nib.load(str(inputs["maps"]))
    mask = np.asarray(nib.load(str(inputs["mask"])).dataobj) > 0
    data = np.asarray(img.dataobj)[mask].T
    x = np.loadtxt(inputs["design"], skiprows=3)
    spatial = spatial_transforms(tfce=TfceOptions())(mask)
    results = {d: run_permutation_test(data, x, np.array([[0.0, 1.0]]),
                                       permutation=PermutationOptions(n_perm=200, seed=2), device=d,
                                       spatial=spatial)
               for d in ("cpu", "cuda")}
    cpu, gpu = results["cpu"], results["cuda"]
    np.testing.assert_array_equal(cpu.scheme.chunk(0, 200)[0], gpu.scheme.chunk(0, 200)[0])
    a, b = cpu["tstat1"], gpu["tstat1"]
    np.testing.assert_allclose(b.stat, a.stat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.null_max, a.null_max, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.spatial["tfce"].stat, a.spatial["tfce"].stat, rtol=1e-3, atol=1e-3)
    assert np.max(np.abs(b.p_fwe - a.p_fwe)) <= 3 / 200
    assert np.max(np.abs(b.p_uncorrected - a.p_uncorrected)) <= 3 / 200
