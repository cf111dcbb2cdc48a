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
    with pytest.raises(GpuconnError, match="^device cuda: torch sees no CUDA device .*; use device cpu or device auto$"):
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
    assert backend.tf32_disabled()
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
    monkeypatch.setattr(backend, "host_available_bytes", lambda: 1000)
    assert backend.chunk_size(10, cpu) == 50  # half of 1000 bytes / 10
    assert backend.chunk_size(10, cpu, maximum=7) == 7
    assert backend.chunk_size(10, cpu, n_items=3) == 3
    assert backend.chunk_size(10_000, cpu) == 1  # never zero
    backend.set_max_memory(200)
    try:
        assert backend.chunk_size(10, cpu) == 10
    finally:
        backend.set_max_memory(None)
    with pytest.raises(GpuconnError, match="^max_memory must be positive"):
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


def test_tf32_is_off_through_the_api_torch_offers():
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the new API, which the legacy getters must not contradict
        assert matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert not matmul.allow_tf32
    assert backend.tf32_disabled()


@pytest.mark.parametrize("text", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`",
    "CUDA_ERROR_OUT_OF_MEMORY: out of memory",
    "cudaErrorMemoryAllocation: out of memory",
])
def test_is_out_of_memory_knows_every_backend_text(text):
    assert backend.is_out_of_memory(RuntimeError(text))


def test_is_out_of_memory_rejects_other_errors():
    assert not backend.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not backend.is_out_of_memory(ValueError("CUDA out of memory"))  # not a runtime error
    assert backend.is_out_of_memory(type("OutOfMemoryError", (Exception,), {})("cupy pool"))


def test_run_chunked_frees_memory_after_leaving_the_handler(monkeypatch):
    import sys

    seen = []
    monkeypatch.setattr(backend, "release_cached_memory",
                        lambda device=None: seen.append((sys.exc_info()[0], device)))

    def work(start, stop):
        if stop - start > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return stop - start

    cpu = torch.device("cpu")
    assert [r for _, _, r in backend.run_chunked(work, 4, 4, device=cpu)] == [2, 2]
    assert seen == [(None, cpu)]  # once, with no exception (and its traceback) alive


def test_free_memory_counts_torch_cached_blocks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 700)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)
    assert backend.free_memory_bytes(torch.device("cuda:0")) == 1500


def test_cuda_chunk_cap_keeps_progress_and_large_launches():
    assert backend.cuda_chunk_cap(10_000) == 1024
    assert backend.cuda_chunk_cap(100) == 1024  # small runs: one chunk
    assert backend.cuda_chunk_cap(160_000) == 10_000  # 16 chunks
    assert backend.cuda_chunk_cap(10_000, spatial=True) == 4096  # one thread per map: launches of thousands


def test_map_launch_spreads_maps_over_every_multiprocessor(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    cuda = torch.device("cuda:0")
    assert backend.map_launch(10_000, cuda) == ((313,), (32,))  # enough maps: one warp per block
    grid, block = backend.map_launch(1024, cuda)
    assert block == (8,) and grid == (128,)  # fewer maps: smaller blocks, still on (almost) every multiprocessor
    assert backend.map_launch(5, cuda) == ((5,), (1,))
    for n in (1, 31, 133, 4095, 4224, 10_001):
        grid, block = backend.map_launch(n, cuda)
        assert grid[0] * block[0] >= n > (grid[0] - 1) * block[0]  # every map has exactly one thread block slot


def test_compile_kernels_needs_nothing_on_cpu_and_reports_problems(monkeypatch):
    assert backend.compile_kernels("cpu") is None
    monkeypatch.setattr(backend, "resolve_device", lambda name: torch.device("cuda:1"))
    monkeypatch.setattr(backend, "_kernel_status", lambda index: f"no NVRTC on cuda:{index}")
    assert backend.compile_kernels("cuda:1") == "no NVRTC on cuda:1"
    with pytest.raises(GpuconnError, match="no NVRTC on cuda:1; use device cpu"):
        backend.compile_kernels("cuda:1", required=True)
    with pytest.warns(RuntimeWarning, match="TFCE on CUDA uses the host sweep: no NVRTC on cuda:1"):
        assert backend.kernel_problem(torch.device("cuda:1"), "TFCE", "the host sweep") is not None


@pytest.mark.gpu
def test_kernels_compile_up_front_on_cuda():
    pytest.importorskip("cupy")
    assert backend.compile_kernels("cuda") is None
    for filename, name in backend.KERNELS:
        assert backend.load_kernel(filename, name, torch.cuda.current_device()) is not None
def test_memory_cap_is_per_context_and_restored(monkeypatch):
    import threading

    cpu = torch.device("cpu")
    monkeypatch.setattr(backend, "host_available_bytes", lambda: 1000)
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


def test_uses_device_scopes_functions_generators_and_read_ahead_threads():
    from gpuconn.core.prefetch import prefetch

    @backend.uses_device
    def step(x, *, device="auto"):
        return backend.scoped_device()

    @backend.uses_device
    def steps(items, *, device="cuda:1"):
        yield from prefetch(items, lambda item: (item, backend.scoped_device()), ahead=2)

    assert backend.scoped_device() == "auto"
    assert step(1) == "auto" and step(1, device="cpu") == "cpu"
    assert list(steps([1, 2, 3], device="cpu")) == [(1, "cpu"), (2, "cpu"), (3, "cpu")]  # threads see it too
    assert list(steps([4])) == [(4, "cuda:1")]  # the default, unresolved
    assert backend.scoped_device() == "auto"  # restored after each step
