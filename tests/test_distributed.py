"""Dask execution: the same results as one process, whatever the workers do.

One local cluster of 2 worker processes (1 thread each) serves the module.
Equality is exact (``assert_array_equal``): each rearrangement's statistics
are the same float32 operations on the worker as in one process, the
exceedance counts are integer sums and the maxima are concatenated in
rearrangement order.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

from gpuconn.core import tasks  # noqa: E402
from gpuconn.stats import dask_runner as gd  # noqa: E402
from gpuconn.core.errors import InputError  # noqa: E402
from gpuconn.stats.randomise import run_permutation_test  # noqa: E402
from gpuconn.stats.options import PermutationOptions

# The worker plugin below is defined here; workers cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client():
    with tasks.dask_client(workers=2) as c:
        yield c


@pytest.fixture
def two_sample(rng):
    n, v = 18, 150
    group = np.r_[np.ones(9), np.zeros(9)]
    age = rng.normal(size=n)
    data = rng.normal(size=(n, v)).astype(np.float32)
    data[:9, :20] += 1.0
    design = np.c_[group, 1 - group, age]
    contrasts = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    return data, design, contrasts


def _assert_same(a, b):
    assert [c.name for c in a.contrasts] == [c.name for c in b.contrasts]
    assert a.scheme.n_perm == b.scheme.n_perm
    for x, y in zip(a.contrasts, b.contrasts):
        for field in ("stat", "z", "p_uncorrected", "p_fwe", "p_fdr", "null_max"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{x.name}.{field}")
        assert x.spatial.keys() == y.spatial.keys()
        for key in x.spatial:
            for field in ("stat", "p_fwe", "null_max"):
                np.testing.assert_array_equal(getattr(x.spatial[key], field), getattr(y.spatial[key], field))


@pytest.mark.parametrize("task_chunk", [None, 7, 61])
def test_randomise_chunks_on_dask_equal_one_process(client, two_sample, task_chunk):
    data, design, contrasts = two_sample
    kw = dict(ftests=np.array([[1, 1]]), permutation=PermutationOptions(n_perm=300, seed=4), device="cpu")
    client.wait_for_workers(2, timeout=60)  # a worker its nanny restarted (a loaded machine) is back before sizing
    single = run_permutation_test(data, design, contrasts, **kw)
    runner = gd.dask_runner(client, device="cpu", chunk=task_chunk)
    spread = run_permutation_test(data, design, contrasts, **kw, runner=runner)
    _assert_same(single, spread)
    assert spread.device == "dask:2 workers (cpu)"
    expected = task_chunk or -(-300 // (2 * 4))  # ceil(300 / (2 workers x 4 tasks each))
    assert spread.chunk_size == expected
    assert single.chunk_size == 300  # one chunk in one process: equality across chunk sizes too


@pytest.mark.parametrize("accel", ["tail", "gamma"])
def test_accelerated_on_dask_equal_one_process(client, two_sample, accel):
    data, design, contrasts = two_sample
    kw = dict(permutation=PermutationOptions(n_perm=200, seed=4, accel=accel), device="cpu")
    single = run_permutation_test(data, design, contrasts, **kw)
    spread = run_permutation_test(data, design, contrasts, **kw, runner=gd.dask_runner(client, device="cpu", chunk=23))
    assert spread.accel == single.accel
    for x, y in zip(single.contrasts, spread.contrasts):
        for field in ("p_uncorrected", "p_fwe"):
            if accel == "tail":  # the kept values are the same set whatever the split
                np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
            else:  # float64 power sums grouped by other chunks: rounding only
                np.testing.assert_allclose(getattr(x, field), getattr(y, field), rtol=1e-9)


def test_negbin_needs_one_process(client, two_sample):
    data, design, contrasts = two_sample
    with pytest.raises(InputError, match="needs the single-process runner"):
        run_permutation_test(data, design, contrasts, permutation=PermutationOptions(n_perm=100, accel="negbin"),
                             device="cpu",
                             runner=gd.dask_runner(client, device="cpu"))


def test_variance_groups_on_dask_equal_one_process(client, two_sample):
    data, design, contrasts = two_sample
    kw = dict(ftests=np.array([[1, 1]]), permutation=PermutationOptions(n_perm=120, seed=4), device="cpu",
              variance_groups=np.r_[np.ones(6), np.full(12, 2)])
    single = run_permutation_test(data, design, contrasts, **kw)
    spread = run_permutation_test(data, design, contrasts, **kw, runner=gd.dask_runner(client, device="cpu", chunk=17))
    _assert_same(single, spread)
    assert spread["tstat1"].statistic == "Aspin-Welch v" and spread["fstat1"].statistic == "G"


def test_sign_flips_exhaustive_and_spatial_statistic_on_dask(client, rng):
    mask = np.zeros((5, 6, 4), dtype=bool)
    mask[1:4, 1:5, 1:3] = True
    data = rng.normal(size=(8, int(mask.sum()))).astype(np.float32) + 0.4
    extent = {"clustere": _cluster_extent_transform(mask, threshold=1.5)}
    kw = dict(permutation=PermutationOptions(n_perm=0, seed=1), device="cpu", spatial=extent)
    single = run_permutation_test(data, np.ones((8, 1)), np.ones((1, 1)), **kw)
    spread = run_permutation_test(data, np.ones((8, 1)), np.ones((1, 1)), **kw,
                                  runner=gd.dask_runner(client, chunk=40))
    assert single.scheme.exhaustive and single.scheme.n_perm == 2**8
    _assert_same(single, spread)
    assert spread["tstat1"].spatial["clustere"].null_max.max() > 0  # the statistic did something


def _cluster_extent_transform(mask: np.ndarray, *, threshold: float):
    from gpuconn.stats.options import ClusterOptions
    from gpuconn.stats.spatial import spatial_transforms

    return spatial_transforms(clusters=ClusterOptions(extent=threshold))(mask)["clustere"]


class _KillOnce(distributed.WorkerPlugin):
    """Kill the worker process (no clean-up) when it starts the task ``key``, once per ``marker`` file."""

    def __init__(self, key_suffix: str, marker: str):
        self.key_suffix = key_suffix
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).endswith(self.key_suffix) and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


def test_worker_killed_mid_run_gives_the_same_result(client, two_sample, tmp_path):
    data, design, contrasts = two_sample
    kw = dict(permutation=PermutationOptions(n_perm=200, seed=9), device="cpu")
    single = run_permutation_test(data, design, contrasts, **kw)
    marker = tmp_path / "killed"
    client.register_plugin(_KillOnce("-100-0", str(marker)), name="kill-once")  # rearrangements 100-119, 1st try
    try:
        spread = run_permutation_test(data, design, contrasts, **kw, runner=gd.dask_runner(client, chunk=20))
    finally:
        client.unregister_worker_plugin("kill-once")
    assert marker.exists()  # a worker did die while starting that task
    _assert_same(single, spread)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_only_worker_killed_loses_the_model_and_the_chunks_rerun(two_sample, tmp_path):
    data, design, contrasts = two_sample
    kw = dict(permutation=PermutationOptions(n_perm=120, seed=2), device="cpu")
    single = run_permutation_test(data, design, contrasts, **kw)
    marker = tmp_path / "killed"
    with tasks.dask_client(workers=1) as one:  # the dead worker held the only copy of the scattered model
        one.register_plugin(_KillOnce("-60-0", str(marker)), name="kill-once")
        spread = run_permutation_test(data, design, contrasts, **kw, runner=gd.dask_runner(one, chunk=30))
    assert marker.exists()
    _assert_same(single, spread)


def test_task_error_reaches_the_client(client):
    def fails(item):
        if item == 2:
            raise InputError("bad item 2")
        return item * 10

    with pytest.raises(InputError, match="bad item 2"):
        tasks.map_tasks(client, fails, [1, 2, 3], description="test", progress=False, retries=0)
    assert tasks.map_tasks(client, fails, [3, 1, 0], description="test", progress=False) == [30, 10, 0]


def test_worker_warnings_are_reissued(client):
    def warns(item):
        import warnings

        warnings.warn(f"dropped column {item}")
        return item

    with pytest.warns(UserWarning, match="UserWarning: dropped column 5"):
        assert tasks.map_tasks(client, warns, [5], description="test", progress=False) == [5]


# ---------------------------------------------------------------- denoise


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from gpuconn.study.simulate import simulate_study

    return simulate_study(tmp_path_factory.mktemp("study"), n_patients=3, n_controls=2, n_volumes=40, voxel_size=6.0,
                          seed=2)


def _outputs(folder: Path) -> dict[str, object]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(".nii.gz"):
            out[path.name] = np.asanyarray(nib.load(path).dataobj)
        elif path.suffix == ".tsv":
            out[path.name] = path.read_bytes()
    return out


@pytest.mark.parametrize("batch_size", [1, 2])
def test_denoise_on_dask_equals_one_process(client, study, tmp_path, batch_size):
    from gpuconn.subject.denoise import DenoiseOptions, collect_runs, denoise_runs

    options = DenoiseOptions(fwhm=6.0)
    files, dirs_a = collect_runs(study.root, tmp_path / "single", participant_label=["001", "004"])
    _, dirs_b = collect_runs(study.root, tmp_path / "dask", participant_label=["001", "004"])
    assert len(files) == 3  # a patient's two sessions and a control's one
    local = list(denoise_runs(files, dirs_a, options, device="cpu", batch_size=batch_size))
    spread = list(denoise_runs(files, dirs_b, options, device="cpu", batch_size=batch_size, client=client))
    assert [p["bold"].name for p in spread] == [p["bold"].name for p in local]
    a, b = _outputs(tmp_path / "single"), _outputs(tmp_path / "dask")
    assert a.keys() == b.keys() and len(a) == 9  # per run: denoised BOLD, design, brain mask
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread in this process for the block, as on a worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_seed_maps_on_dask_equal_one_process(client, study, tmp_path):
    from gpuconn.maps.series import bold_inputs
    from gpuconn.maps.seed import compute_seed_maps
    from gpuconn.maps.options import RegionOptions
    from gpuconn.maps.regions import regions_from_options

    regions = regions_from_options(RegionOptions(coords=["-18,-38,72", "0,-52,26"], radii=[8.0], names=["S1back", "PCC"]))
    inputs = bold_inputs(derivatives=study.root, participant_label=["001", "004"], desc="preproc")
    kw = dict(stats=["r", "z", "beta"], device="cpu", params={"command": "test"})
    with _one_thread():  # as a worker: the seed means reduce over voxels, which MKL splits across threads
        local = compute_seed_maps(inputs, regions, tmp_path / "single", **kw)
    default = compute_seed_maps(inputs, regions, tmp_path / "threads", **kw)
    spread = compute_seed_maps(inputs, regions, tmp_path / "dask", client=client, **kw)
    assert [p.name for p in spread] == [p.name for p in local] == [p.name for p in default]
    assert len(local) == 3 * 4  # a seed time-series TSV and r, z, beta maps per run
    a, b, c = _outputs(tmp_path / "single"), _outputs(tmp_path / "dask"), _outputs(tmp_path / "threads")
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        if name.endswith(".nii.gz"):  # another thread count: float32 sums over ~1000 voxels in another order
            np.testing.assert_allclose(b[name], c[name], rtol=1e-5, atol=1e-5, err_msg=name)
    with pytest.raises(InputError, match="^layout seed stacks every run into one file per seed in one process, not in Dask tasks"):
        compute_seed_maps(inputs, regions, tmp_path / "x", layout="seed", client=client)


# ---------------------------------------------------------------- CLI and options


def _write_group_image(tmp_path: Path, rng) -> tuple[Path, Path, Path]:
    data = rng.normal(size=(5, 6, 4, 12)).astype(np.float32)
    data[1:3, 1:3, 1:3, :6] += 1.5
    image = tmp_path / "all.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), image)
    mat, con = tmp_path / "design.mat", tmp_path / "design.con"
    rows = "\n".join("1 0" if i < 6 else "0 1" for i in range(12))
    mat.write_text(f"/NumWaves 2\n/NumPoints 12\n/Matrix\n{rows}\n")
    con.write_text("/NumWaves 2\n/NumContrasts 1\n/Matrix\n1 -1\n")
    return image, mat, con


def test_cli_randomise_with_scheduler_equals_one_process(client, tmp_path, rng, capsys):
    from gpuconn.cli.app import run

    image, mat, con = _write_group_image(tmp_path, rng)
    common = ["randomise", "-i", str(image), "-d", str(mat), "-t", str(con), "-n", "150", "--seed", "3",
              "--uncorrp", "--device", "cpu", "--quiet"]
    assert run([*common, "-o", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    address = client.scheduler.address
    assert run([*common, "-o", str(tmp_path / "two"), "--dask-scheduler", address]) == 0, capsys.readouterr().err
    for suffix in ("tstat1", "vox_p_tstat1", "vox_corrp_tstat1"):
        a = nib.load(tmp_path / f"one_{suffix}.nii.gz").get_fdata()
        b = nib.load(tmp_path / f"two_{suffix}.nii.gz").get_fdata()
        np.testing.assert_array_equal(a, b, err_msg=suffix)
    assert (tmp_path / "one_perm_tstat1.txt").read_text() == (tmp_path / "two_perm_tstat1.txt").read_text()


def test_cli_denoise_with_scheduler(client, study, tmp_path, capsys):
    from gpuconn.cli.app import run

    out = tmp_path / "den"
    args = ["denoise", "--derivatives", str(study.root), "--participant-label", "003", "--out", str(out), "--quiet",
            "--device", "cpu", "--dask-scheduler", client.scheduler.address]
    assert run(args) == 0, capsys.readouterr().err
    assert len(list(out.rglob("*_desc-denoised_bold.nii.gz"))) == 2  # a patient: ses-pre and ses-post


def test_option_errors(capsys):
    with pytest.raises(InputError, match="not both"):
        with tasks.dask_client(scheduler="tcp://127.0.0.1:1", workers=2):
            pass
    with pytest.raises(InputError, match="^workers must be >= 1, got 0$"):
        with tasks.dask_client(workers=0):
            pass
    with tasks.dask_client() as none:
        assert none is None


def test_unreachable_scheduler_is_an_input_error():
    with pytest.raises(InputError, match=r"^scheduler tcp://127.0.0.1:9: cannot connect"):
        with tasks.dask_client(scheduler="tcp://127.0.0.1:9", timeout=2):
            pass


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(InputError, match=r"install it with pip install 'gpuconn\[dask\]'"):
        with tasks.dask_client(workers=1):
            pass


def test_core_import_does_not_import_dask():
    code = (
        "import sys, gpuconn.cli.app, gpuconn.stats.randomise, gpuconn.subject.denoise, gpuconn.stats.dask_runner; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'dask_cuda')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_rejects_both_options(tmp_path, rng, capsys):
    from gpuconn.cli.app import run

    image, mat, con = _write_group_image(tmp_path, rng)
    rc = run(["randomise", "-i", str(image), "-d", str(mat), "-t", str(con), "-o", str(tmp_path / "x"), "--quiet",
              "--workers", "2", "--dask-scheduler", "tcp://127.0.0.1:1"])
    assert rc == 2
    assert "give --dask-scheduler (use a running cluster) or --workers N (start a local one), not both" in (
        capsys.readouterr().err)
    assert not list(tmp_path.glob("x*"))


# ---------------------------------------------------------------- dual regression and qc


@pytest.fixture(scope="module")
def dualreg_inputs(study, tmp_path_factory):
    """Three runs of the simulated study and three random group maps on their grid."""
    from gpuconn.core.bids import find_runs

    bolds = [run.bold for run in find_runs(study.root, participant_label=["001", "004"])]
    reference = nib.load(bolds[0])
    maps = np.random.default_rng(5).normal(size=reference.shape[:3] + (3,)).astype(np.float32)
    path = tmp_path_factory.mktemp("maps") / "melodic_IC.nii.gz"
    nib.save(nib.Nifti1Image(maps, reference.affine), path)
    return path, bolds


def _dualreg_outputs(folder: Path) -> dict[str, object]:
    out = _outputs(folder)
    out.update({path.name: path.read_bytes() for path in folder.glob("dr_stage1_*.txt")})
    return out


@pytest.mark.parametrize("batch_size", [None, 2])
def test_dualreg_on_dask_equals_one_process(client, dualreg_inputs, tmp_path, batch_size):
    from gpuconn.maps.dualreg import dual_regression
    from gpuconn.maps.options import DualRegOptions

    maps, bolds = dualreg_inputs
    with _one_thread():  # as a worker: stage 1 reduces over voxels, which MKL splits across threads
        local = dual_regression(maps, bolds, tmp_path / "single", DualRegOptions(batch_size=batch_size or 1), device="cpu")
    dual_regression(maps, bolds, tmp_path / "threads", DualRegOptions(batch_size=batch_size or 1), device="cpu")
    spread = dual_regression(maps, bolds, tmp_path / "dask", DualRegOptions(batch_size=batch_size), device="cpu",
                             client=client)
    assert spread == replace(local, out_dir=tmp_path / "dask", mask=tmp_path / "dask" / "mask.nii.gz",
                             **{f: [tmp_path / "dask" / p.name for p in getattr(local, f)]
                                for f in ("stage1", "stage2", "stage2_z", "components")})
    a, b = _dualreg_outputs(tmp_path / "single"), _dualreg_outputs(tmp_path / "dask")
    c = _dualreg_outputs(tmp_path / "threads")
    assert a.keys() == b.keys() == c.keys() and len(a) == 3 * 3 + 3 + 1  # per subject: 3 files; per map; mask
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        if name.endswith(".nii.gz"):  # 2 threads: float32 sums over ~10,000 voxels in another order
            np.testing.assert_allclose(b[name], c[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert a["dr_stage2_ic0002.nii.gz"].shape[3] == 3 and np.abs(a["dr_stage2_ic0002.nii.gz"]).max() > 0
    assert sorted(p.name for p in (tmp_path / "dask").iterdir()) == sorted([*a, "dualreg.json"])  # no staging left
    meta = json.loads((tmp_path / "dask" / "dualreg.json").read_text())["Parameters"]
    assert meta["device"] == "dask (cpu)"


def test_dualreg_varcb_on_dask_equals_one_process(client, dualreg_inputs, tmp_path):
    """--out-varcb in Dask tasks: the same files, bit for bit, as one process."""
    from gpuconn.maps.dualreg import dual_regression
    from gpuconn.maps.options import DualRegOptions

    maps, bolds = dualreg_inputs
    with _one_thread():  # as a worker
        dual_regression(maps, bolds, tmp_path / "single", DualRegOptions(batch_size=1, varcb=True), device="cpu")
    dual_regression(maps, bolds, tmp_path / "dask", DualRegOptions(batch_size=1, varcb=True), device="cpu",
                    client=client)
    a, b = _dualreg_outputs(tmp_path / "single"), _dualreg_outputs(tmp_path / "dask")
    varcb = [name for name in a if name.endswith("_varcb.nii.gz")]
    assert a.keys() == b.keys() and len(varcb) == len(bolds)
    for name in varcb:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_dualreg_on_dask_checks_inputs_before_any_task(dualreg_inputs, tmp_path, rng):
    from gpuconn.maps.dualreg import dual_regression

    maps, bolds = dualreg_inputs
    collinear = tmp_path / "collinear.nii.gz"
    values = nib.load(maps).get_fdata(dtype=np.float32)
    values[..., 2] = values[..., 0] - 2 * values[..., 1]
    nib.save(nib.Nifti1Image(values, nib.load(maps).affine), collinear)
    no_client = object()  # any submitted task would fail with AttributeError
    with pytest.raises(InputError, match="maps are linearly dependent"):
        dual_regression(collinear, bolds, tmp_path / "dr", device="cpu", client=no_client)
    with pytest.raises(InputError, match="has 40 volumes but dual regression on 50 maps"):
        wide = tmp_path / "wide.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=values.shape[:3] + (50,)).astype(np.float32), nib.load(maps).affine),
                 wide)
        dual_regression(wide, bolds, tmp_path / "dr", device="cpu", client=no_client)
    assert not (tmp_path / "dr").exists()


def test_dualreg_on_dask_subject_error_leaves_no_output(client, dualreg_inputs, tmp_path):
    from gpuconn.maps.dualreg import dual_regression

    maps, bolds = dualreg_inputs
    img = nib.load(maps)
    flat = np.zeros(img.shape[:3] + (40,), np.float32)
    flat[img.get_fdata()[..., 0] != 0] = 1.0
    flat[..., ::2] *= 2.0  # varies over time, but only as one pattern: collinear stage-1 time courses
    bad = tmp_path / "sub-flat_bold.nii.gz"
    nib.save(nib.Nifti1Image(flat, img.affine), bad)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((nib.load(bolds[0]).get_fdata()[..., 0] != 0).astype(np.uint8), img.affine), mask)
    out = tmp_path / "dr"
    with pytest.raises(InputError, match="sub-flat_bold.nii.gz: its stage-1 time courses are collinear"):
        dual_regression(maps, [*bolds, bad], out, mask_path=mask, device="cpu", client=client)
    assert not any(out.iterdir())


def test_qc_on_dask_equals_one_process(client, study):
    import pandas as pd

    from gpuconn.subject.options import QcOptions
    from gpuconn.subject.qc import motion_sources, qc_table

    sources = motion_sources(derivatives=study.root)
    options = QcOptions(outlier_metric="rms", outlier_threshold=0.05, rel_threshold=0.3)
    local = qc_table(sources, options)
    spread = qc_table(sources, options, client=client)
    assert len(local) == 8  # 3 patients x 2 sessions + 2 controls
    pd.testing.assert_frame_equal(local, spread, check_exact=True)


def test_cli_dualreg_and_qc_with_scheduler(client, dualreg_inputs, study, tmp_path, capsys):
    from gpuconn.cli.app import run

    maps, bolds = dualreg_inputs
    address = client.scheduler.address
    common = ["dualreg", str(maps), *map(str, bolds[:2]), "--device", "cpu", "--quiet", "--batch", "2"]
    with _one_thread():
        assert run([*common, "-o", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    assert run([*common, "-o", str(tmp_path / "two"), "--dask-scheduler", address]) == 0, capsys.readouterr().err
    a, b = _dualreg_outputs(tmp_path / "one"), _dualreg_outputs(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 2 * 3 + 3 + 1
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    qc = ["qc", "--derivatives", str(study.root), "--participant-label", "001", "--quiet"]
    assert run([*qc, "-o", str(tmp_path / "one.tsv")]) == 0, capsys.readouterr().err
    assert run([*qc, "-o", str(tmp_path / "two.tsv"), "--dask-scheduler", address]) == 0, capsys.readouterr().err
    assert (tmp_path / "one.tsv").read_bytes() == (tmp_path / "two.tsv").read_bytes()


def _late_writer(item):
    """A task that fails at once, or writes its file after a pause (a slow subject)."""
    path, fail = item
    if fail:
        raise ValueError("bad item")
    time.sleep(1.0)
    Path(path).write_text("done")
    return path


def test_a_task_error_reaches_the_caller_only_after_every_task_ended(client, tmp_path):
    """Callers remove partial outputs on an error; no task may still be writing then (it would write them back)."""
    late = tmp_path / "late.txt"
    with pytest.raises(ValueError, match="bad item"):
        tasks.map_tasks(client, _late_writer, [(tmp_path / "never.txt", True), (late, False)], description="late",
                        progress=False, retries=0)
    assert late.exists()
