"""Device selection, dtype policy, DLPack bridges, chunk sizing and OOM halving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuconn.core import backend
from gpuconn.core.errors import GpuconnError


def test_resolve_device_auto_matches_torch():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend.resolve_device("auto").type == expected
    assert backend.resolve_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_resolve_device_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(GpuconnError, match="--device cuda: torch sees no CUDA device"):
        backend.resolve_device("cuda")


def test_resolve_device_rejects_unknown_names():
    with pytest.raises(GpuconnError, match="'tpu' is not one of auto, cpu, cuda"):
        backend.resolve_device("tpu")


def test_resolve_device_rejects_malformed_cuda_names(monkeypatch):
    monkeypatch.setattr(backend, "cuda_available", lambda: True)  # as on a GPU machine, where torch.device raised
    for name in ("cuda:x", "cudax", "cuda:-1", "cuda:1:2"):
        with pytest.raises(GpuconnError, match=r"is not one of auto, cpu, cuda \(or cuda:N\)"):
            backend.resolve_device(name)


def test_dtype_policy_and_tf32_off(device):
    data = backend.as_data(np.arange(6, dtype=np.float64), device)
    design = backend.as_design(np.arange(6, dtype=np.float32), device)
    assert data.dtype == torch.float32 and design.dtype == torch.float64
    assert data.device.type == device.type
    assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    np.testing.assert_array_equal(backend.to_numpy(design), np.arange(6))


@pytest.mark.gpu
def test_dlpack_round_trip_shares_memory():
    cupy = pytest.importorskip("cupy")
    tensor = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    array = backend.to_cupy(tensor)
    assert isinstance(array, cupy.ndarray)
    array[0, 0] = 42.0
    assert tensor[0, 0].item() == 42.0  # zero-copy: the write is visible
    back = backend.from_cupy(array)
    assert back.data_ptr() == tensor.data_ptr()


def test_chunk_size_respects_budget_bounds_and_cap(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backend, "_host_available_bytes", lambda: 1000)
    assert backend.chunk_size(10, cpu) == 50  # half of 1000 bytes / 10
    assert backend.chunk_size(10, cpu, maximum=7) == 7
    assert backend.chunk_size(10, cpu, n_items=3) == 3
    assert backend.chunk_size(10_000, cpu) == 1  # never zero
    backend.set_max_memory(200)
    try:
        assert backend.chunk_size(10, cpu) == 10
    finally:
        backend.set_max_memory(None)
    with pytest.raises(GpuconnError, match="--max-memory must be positive"):
        backend.set_max_memory(0)


def test_run_chunked_halves_on_oom_with_identical_results():
    calls = []

    def work(start, stop):
        calls.append((start, stop))
        if stop - start > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return list(range(start, stop))

    halvings = []
    out = list(backend.run_chunked(work, 19, 16, on_halve=halvings.append))
    assert [x for _, _, r in out for x in r] == list(range(19))
    assert halvings == [8, 4]
    assert all(stop - start <= 4 for start, stop, _ in out)


def test_run_chunked_single_item_oom_is_a_user_error():
    def work(start, stop):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(GpuconnError, match="out of device memory even for a single item"):
        list(backend.run_chunked(work, 3, 1))


def test_run_chunked_reraises_other_errors():
    def work(start, stop):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        list(backend.run_chunked(work, 3, 2))


def test_cupy_is_not_imported_by_the_package():
    import subprocess
    import sys

    code = "import sys, gpuconn.core.backend, gpuconn.core.io, gpuconn.cli.app; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_memory_cap_is_per_context_and_restored(monkeypatch):
    import threading

    cpu = torch.device("cpu")
    monkeypatch.setattr(backend, "_host_available_bytes", lambda: 1000)
    seen = []
    with backend.memory_cap(200):
        with backend.memory_cap(100):
            assert backend.free_memory_bytes(cpu) == 100
        assert backend.max_memory() == 200
        thread = threading.Thread(target=lambda: seen.append(backend.max_memory()))
        thread.start()
        thread.join()
    assert backend.max_memory() is None
    assert seen == [None], "another thread does not inherit the cap of this one"
