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
