"""Compile a ``kernels/*.cu`` kernel as host C++ to check its logic without a GPU.

The CUDA qualifiers become no-ops, and a wrapper runs every thread of the
launch grid (blocks of 64 threads) in turn. A kernel whose threads write
disjoint memory (one map per thread, as gpuconn's) gives the same result as
on a device, so the tests can hold the kernel source to its CPU twin on any
machine with g++; the gpu-marked tests run it on CUDA.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

_SHIM = """
#include <cstddef>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct gpuconn_dim3 {{ int x; }};
static gpuconn_dim3 blockIdx, blockDim, threadIdx;
#include "{source}"
extern "C" void run_grid(int n_threads, {params}) {{
    blockDim.x = 64;
    for (int b = 0; b < (n_threads + 63) / 64; ++b)
        for (int t = 0; t < 64; ++t) {{
            blockIdx.x = b;
            threadIdx.x = t;
            {kernel}({args});
        }}
}}
"""


def host_kernel(filename: str, kernel: str, params: str, folder: Path):
    """Compile ``kernel`` from ``filename``; returns ``run(n_threads, *arrays_and_scalars)``.

    ``params`` is the kernel's C parameter list. NumPy arrays are passed as
    pointers, Python ints as ``int``, ``numpy.float64`` as ``double`` and
    other floats as ``float``.
    """
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ to compile the kernel source on the host")
    source = importlib.resources.files("gpuconn.kernels").joinpath(filename)
    names = ", ".join(p.strip().split()[-1].lstrip("*") for p in params.split(","))
    text = _SHIM.format(source=source, params=params, kernel=kernel, args=names)
    (folder / f"{kernel}.cpp").write_text(text)
    library = folder / f"{kernel}.so"
    subprocess.run([compiler, "-std=c++14", "-O1", "-shared", "-fPIC", "-o", str(library),
                    str(folder / f"{kernel}.cpp")], check=True)
    lib = ctypes.CDLL(str(library))

    def convert(value):
        if isinstance(value, np.ndarray):
            assert value.flags.c_contiguous
            return value.ctypes.data_as(ctypes.c_void_p)
        if isinstance(value, np.float64):  # before float: np.float64 is a float subclass
            return ctypes.c_double(value)
        return ctypes.c_float(value) if isinstance(value, (float, np.floating)) else ctypes.c_int(value)

    def run(n_threads: int, *args) -> None:
        lib.run_grid(ctypes.c_int(n_threads), *(convert(a) for a in args))

    return run


class _FakeCupy:
    """The bits of CuPy the launch code touches: a stream context."""

    class cuda:  # noqa: N801 - mirrors cupy.cuda
        class ExternalStream:
            def __init__(self, pointer):
                self.pointer = pointer

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False


def fake_launch(monkeypatch, module, filename: str, kernel: str, params: str, folder: Path) -> None:
    """Make ``module``'s CUDA launch code run the host-compiled kernel on CPU tensors.

    Patches ``load_kernel``, ``to_cupy`` (a NumPy view of the tensor, so the
    kernel writes into it), ``cupy_launch`` (no device or stream to enter),
    ``kernel_problem`` (the kernels are "ready"), ``torch.cuda.current_stream``
    and ``torch.cuda.get_device_properties`` (5 multiprocessors), so the Python side of a CUDA path
    (argument order, scratch layout, chunking) runs here. ``kernel`` may be a
    ``{name: params}`` dict when the path launches several kernels of ``filename``.
    """
    import contextlib

    import torch

    kernels = kernel if isinstance(kernel, dict) else {kernel: params}
    runs = {name: host_kernel(filename, name, p, folder) for name, p in kernels.items()}

    def load(_filename, name, *args, **kwargs):
        return lambda grid, block, args: runs[name](grid[0] * block[0], *args)

    monkeypatch.setattr(module, "load_kernel", load)
    monkeypatch.setattr(module, "cupy_launch", lambda device: contextlib.nullcontext(_FakeCupy))
    monkeypatch.setattr(module, "kernel_problem", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "to_cupy", lambda tensor: tensor.contiguous().numpy())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    # map_launch reads the multiprocessor count: a small GPU, so the test sizes exercise its block shrinking
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"multi_processor_count": 5})())


def expect_kernel_path(monkeypatch, module):
    """A context for gpu-marked tests: the CUDA kernels of ``module`` must have run.

    With CuPy installed, ``module.load_kernel`` must be called and no
    fallback warning issued (a test passing through the torch/host fallback
    would prove nothing about the kernels); without CuPy, the fallback must
    have said so.
    """
    import contextlib
    import importlib.util
    import warnings

    loads = []
    original = module.load_kernel

    def counting(*args, **kwargs):
        loads.append(args[:2])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "load_kernel", counting)

    @contextlib.contextmanager
    def check():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield loads
        fallbacks = [str(w.message) for w in caught if "on CUDA uses" in str(w.message)]
        if importlib.util.find_spec("cupy") is not None:
            assert loads, f"no kernel of {module.__name__} was launched"
            assert not fallbacks, fallbacks
        else:
            assert fallbacks, "the CUDA path without CuPy must warn about its fallback"

    return check()
