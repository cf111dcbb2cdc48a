"""Read-ahead (gpuconn.core.prefetch) and its use in denoise: same results as serial, bounded, errors in order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gpuconn.core.prefetch import items_ahead, prefetch


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_prefetch_yields_loads_in_order(ahead):
    def load(i):
        time.sleep(0.002 * (5 - i % 5))  # later items often finish first
        return i * i

    assert list(prefetch(range(12), load, ahead=ahead)) == [i * i for i in range(12)]


def test_prefetch_reads_at_most_ahead_items_beyond_the_consumer():
    lock = threading.Lock()
    started = []
    consumed = []

    def load(i):
        with lock:
            started.append(i)
        return i

    for value in prefetch(range(10), load, ahead=2, workers=2):
        time.sleep(0.01)  # the loads have all the time they want
        with lock:
            assert max(started) <= value + 2
        consumed.append(value)
    assert consumed == list(range(10))


def test_prefetch_raises_a_load_error_after_the_items_before_it():
    def load(i):
        if i == 3:
            raise ValueError("item 3 is broken")
        return i

    seen = []
    with pytest.raises(ValueError, match="item 3 is broken"):
        for value in prefetch(range(6), load, ahead=2):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_items_ahead_is_bounded_by_host_memory():
    gib = 2**30
    assert items_ahead(1 * gib, 4, available=16 * gib) == 4
    assert items_ahead(3 * gib, 4, available=16 * gib) == 1  # a quarter of 16 GiB holds one
    assert items_ahead(5 * gib, 4, available=16 * gib) == 0  # serial
    assert items_ahead(0, 2, available=1) == 2


def _outputs(folder: Path) -> dict[str, object]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(".nii.gz"):
            out[path.name] = np.asanyarray(nib.load(path).dataobj)
        elif path.suffix in (".tsv", ".json"):
            out[path.name] = path.read_bytes()
    return out


def test_denoise_with_read_ahead_equals_serial(tmp_path):
    from gpuconn.subject.denoise import DenoiseOptions, collect_runs, denoise_runs
    from gpuconn.study.simulate import simulate_study

    study = simulate_study(tmp_path / "study", n_patients=3, n_controls=2, n_volumes=30, voxel_size=6.0, seed=5)
    options = DenoiseOptions(fwhm=6.0)
    files, serial_dirs = collect_runs(study.root, tmp_path / "serial", participant_label=["001", "004"])
    _, ahead_dirs = collect_runs(study.root, tmp_path / "ahead", participant_label=["001", "004"])
    assert len(files) >= 3
    serial = list(denoise_runs(files, serial_dirs, options, device="cpu", read_ahead=0))
    ahead = list(denoise_runs(files, ahead_dirs, options, device="cpu", read_ahead=2))
    assert [p["bold"].name for p in serial] == [p["bold"].name for p in ahead]
    a, b = _outputs(tmp_path / "serial"), _outputs(tmp_path / "ahead")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".json"):
            continue  # sidecars name their own output folder
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------------- the subject readers of gpuconn.maps


def _series_files(folder: Path, n_runs: int = 5, shape=(5, 6, 4, 9)) -> tuple[list[Path], Path, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.zeros(shape[:3], dtype=bool)
    mask[1:4, 1:5, 1:3] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), folder / "mask.nii.gz")
    paths = []
    for i in range(n_runs):
        header = nib.Nifti1Header()
        header.set_data_dtype(np.int16)  # scaled integers, as many pipelines store BOLD
        paths.append(folder / f"sub-{i:02d}_bold.nii.gz")
        nib.save(nib.Nifti1Image(rng.normal(100.0, 5.0, shape).astype(np.float32), np.eye(4), header), paths[-1])
    return paths, folder / "mask.nii.gz", mask


def _reader(kind: str, paths, mask_path, mask, ahead):
    """Yield (data, n_loads_started_so_far) from ``stream_inputs`` or ``iter_series``."""
    from gpuconn.maps.series import BoldInput, PreparedInput, iter_series, stream_inputs

    if kind == "iter_series":
        return iter_series(paths, mask, n_ahead=ahead)
    keep = np.arange(9) % 4 != 1  # a censored run: the kept volumes only
    prepared = [PreparedInput(BoldInput(p.name, p, mask_path), mask, np.ones((1, int(mask.sum())), np.float32),
                              keep if i == 2 else None) for i, p in enumerate(paths)]
    return (data for _, data in stream_inputs(prepared, ahead=ahead))


@pytest.mark.parametrize("kind", ["stream_inputs", "iter_series"])
@pytest.mark.parametrize(("items_fit", "ahead"), [(8, 2), (1, 1), (0, 0)])
def test_series_readers_read_ahead_through_prefetch_within_host_memory(tmp_path, monkeypatch, kind, items_fit, ahead):
    """Both readers read ``ahead`` runs beyond the one consumed (``items_ahead``'s bound), in the caller's device scope."""
    import gpuconn.maps.series as series
    from gpuconn.core import backend
    from gpuconn.core.io import load_masked as real_load_masked

    paths, mask_path, mask = _series_files(tmp_path)
    serial = [series.read_series(p, mask) for p in paths]
    serial[2] = serial[2][np.arange(9) % 4 != 1] if kind == "stream_inputs" else serial[2]
    item_bytes = 8 * int(np.prod(nib.load(paths[0]).shape))  # a run held decoded: 8 bytes per voxel and volume
    monkeypatch.setattr(backend, "host_available_bytes", lambda: 4 * items_fit * item_bytes)  # a quarter holds items_fit
    lock, started = threading.Lock(), []

    def load_masked(path, mask, **kwargs):
        with lock:
            started.append((Path(path), threading.current_thread() is threading.main_thread(),
                            backend.scoped_device()))
        return real_load_masked(path, mask, **kwargs)

    monkeypatch.setattr(series, "load_masked", load_masked)

    def n_started():
        with lock:
            return len(started)

    got = []
    with backend.device_scope("cpu"):
        for data in _reader(kind, paths, mask_path, mask, ahead=2):
            got.append(data)
            expected = min(len(paths), len(got) + ahead)
            deadline = time.monotonic() + 10.0
            while n_started() < expected and time.monotonic() < deadline:  # wait for the read-ahead, never for more
                time.sleep(0.005)
            assert n_started() == expected, f"after {len(got)} runs consumed, {n_started()} reads started"
    assert [p for p, _, _ in started] == paths
    assert all(on_main == (ahead == 0) for _, on_main, _ in started), "threads read ahead, or none with ahead=0"
    assert all(device == "cpu" for _, _, device in started), "reads run in the caller's device scope"
    assert len(got) == len(serial)
    for a, b in zip(got, serial, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["stream_inputs", "iter_series"])
def test_series_readers_raise_a_read_error_after_the_runs_before_it(tmp_path, kind):
    from gpuconn.core.errors import InputError

    paths, mask_path, mask = _series_files(tmp_path)
    paths[3].write_bytes(paths[3].read_bytes()[:200])  # truncated
    seen = []
    with pytest.raises(InputError, match=paths[3].name):
        for data in _reader(kind, paths, mask_path, mask, ahead=2):
            seen.append(data)
    assert len(seen) == 3


def test_mean_epi_reads_ahead_in_the_callers_device_scope(tmp_path, monkeypatch):
    """The report's mean EPI reads runs on threads through prefetch, each in the command's device scope, summed in order."""
    from gpuconn.core import backend
    from gpuconn.study import qc_maps

    rng = np.random.default_rng(1)
    runs = [rng.normal(100.0, 5.0, (4, 5, 3, 6)).astype(np.float32) for _ in range(5)]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.nii.gz")
        nib.save(nib.Nifti1Image(run, np.eye(4)), paths[-1])
    seen = []
    real = qc_maps.io.load_header
    monkeypatch.setattr(qc_maps.io, "load_header", lambda path, **kw: seen.append(backend.scoped_device()) or real(path, **kw))
    with backend.device_scope("cpu"):
        mean = qc_maps.mean_epi(paths, nib.Nifti1Image(np.zeros((4, 5, 3)), np.eye(4)))
    assert seen == ["cpu"] * len(runs), "FEAT data resample on the command's device, also on the reading threads"
    expected = sum(run.mean(axis=-1, dtype=np.float64) for run in runs) / len(runs)  # the same order of additions
    np.testing.assert_array_equal(mean, expected)
