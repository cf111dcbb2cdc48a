"""Device choice, dtype policy, DLPack bridges, memory budget and chunking.

Every heavy step in gpuconn is torch code that runs on ``cuda`` or ``cpu``.
This module decides which device, which dtypes (float32 data, float64
designs and projections), how large a chunk of work fits in memory, and
how to retry a chunk at half size when CUDA runs out of memory. CuPy is only
imported by :func:`require_cupy`, i.e. when a custom kernel is needed; a
CPU-only install never imports it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.resources
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import GpuconnError

__all__ = [
    "DATA_DTYPE",
    "DESIGN_DTYPE",
    "resolve_device",
    "cuda_available",
    "as_data",
    "as_design",
    "to_numpy",
    "to_host",
    "require_cupy",
    "to_cupy",
    "from_cupy",
    "load_kernel",
    "free_memory_bytes",
    "set_max_memory",
    "memory_cap",
    "max_memory",
    "chunk_size",
    "is_out_of_memory",
    "run_chunked",
]

#: dtype of imaging data and large products on the device.
DATA_DTYPE = torch.float32
#: dtype of designs, pseudo-inverses and projections.
DESIGN_DTYPE = torch.float64

# TF32 (or bf16 on CPUs that offer it) would silently reduce float32 matmuls
# to ~10 mantissa bits; keep full float32 on every backend.
torch.set_float32_matmul_precision("highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

_DEVICE_CHOICES = ("auto", "cpu", "cuda")
# The --max-memory cap of the command running in this context (None: no cap).
_MEMORY_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("gpuconn_memory_cap", default=None)

T = TypeVar("T")


def cuda_available() -> bool:
    """Return True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`.

    Parameters
    ----------
    name : {'auto', 'cpu', 'cuda'} or str or torch.device, default 'auto'
        ``auto`` picks ``cuda`` when torch sees a GPU, else ``cpu``.
        ``cuda:1`` style names select a specific GPU.

    Returns
    -------
    torch.device

    Raises
    ------
    GpuconnError
        If ``cuda`` is requested and no CUDA device is visible, or the name
        is not a device.
    """
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", text):  # torch.device raises a bare RuntimeError on e.g. 'cuda:x'
        if not cuda_available():
            raise GpuconnError(
                f"--device {name}: torch sees no CUDA device "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GpuconnError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return device
    raise GpuconnError(f"--device {name!r} is not one of {', '.join(_DEVICE_CHOICES)} (or cuda:N)")


def as_data(array: Any, device: torch.device) -> torch.Tensor:
    """Move an array to ``device`` as float32 data (no copy when already there)."""
    return torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array).to(
        device=device, dtype=DATA_DTYPE
    )


def as_design(array: Any, device: torch.device) -> torch.Tensor:
    """Move a design-like array to ``device`` as float64."""
    return torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array).to(
        device=device, dtype=DESIGN_DTYPE
    )


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Return a host NumPy copy of a tensor from any device."""
    return tensor.detach().cpu().numpy()


def to_host(values: torch.Tensor | np.ndarray | float | None) -> np.ndarray | None:
    """A host NumPy array of a tensor (any device), an array or a number; None stays None."""
    if values is None:
        return None
    return to_numpy(values) if torch.is_tensor(values) else np.asarray(values)


def require_cupy():
    """Import and return CuPy, or raise a clear error when it is missing.

    Only code that launches a custom kernel calls this, so CPU-only
    installs never import CuPy.
    """
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise GpuconnError(
            "this step needs CuPy for its CUDA kernel; install it with "
            "pip install 'gpuconn[gpu]' (CUDA 12) or 'gpuconn[gpu-cuda13]', or use --device cpu"
        ) from exc
    return cupy


def to_cupy(tensor: torch.Tensor):
    """View a CUDA tensor as a CuPy array without copying (DLPack)."""
    cupy = require_cupy()
    return cupy.from_dlpack(tensor.contiguous())


def from_cupy(array) -> torch.Tensor:
    """View a CuPy array as a torch tensor without copying (DLPack)."""
    return torch.from_dlpack(array)


@functools.cache
def _kernel_source(filename: str) -> str:
    return importlib.resources.files("gpuconn.kernels").joinpath(filename).read_text()


@functools.cache
def load_kernel(filename: str, name: str, device_index: int = 0, options: tuple[str, ...] = ()):
    """Compile (once per file, kernel name and device) a CUDA kernel with CuPy.

    Parameters
    ----------
    filename : str
        A ``*.cu`` file shipped in :mod:`gpuconn.kernels`.
    name : str
        The kernel's ``extern "C"`` name (unique, prefixed ``gpuconn_``).
    device_index : int
        CUDA device to compile for.
    options : tuple of str
        Extra NVRTC options.

    Returns
    -------
    cupy.RawKernel
    """
    cupy = require_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=_kernel_source(filename), options=("-std=c++14",) + options)
        return module.get_function(name)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _check_cap(n_bytes: int | None) -> int | None:
    if n_bytes is not None and n_bytes <= 0:
        raise GpuconnError(f"--max-memory must be positive, got {n_bytes} bytes")
    return n_bytes


def set_max_memory(n_bytes: int | None) -> None:
    """Cap the memory gpuconn plans to use on any device (``--max-memory``), in the current context.

    The cap is a :mod:`contextvars` variable: it holds for this thread (or
    asyncio task) and the contexts copied from it, not for other threads or
    Dask workers. For one block of work use :func:`memory_cap`, which also
    restores the previous value.

    Parameters
    ----------
    n_bytes : int or None
        The cap in bytes; None removes it.
    """
    _MEMORY_CAP.set(_check_cap(n_bytes))


@contextlib.contextmanager
def memory_cap(n_bytes: int | None) -> Iterator[None]:
    """Cap the memory gpuconn plans to use while the block runs (None: no cap); the previous cap returns after it.

    Raises
    ------
    GpuconnError
        ``n_bytes`` not positive.
    """
    token = _MEMORY_CAP.set(_check_cap(n_bytes))
    try:
        yield
    finally:
        _MEMORY_CAP.reset(token)


def max_memory() -> int | None:
    """The memory cap in bytes of the current context (:func:`memory_cap`), or None."""
    return _MEMORY_CAP.get()


def free_memory_bytes(device: torch.device) -> int:
    """Memory available for new work on ``device``, capped by :func:`memory_cap`.

    On CUDA this is ``torch.cuda.mem_get_info`` (free bytes); on CPU the
    host's ``MemAvailable``.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        free = _host_available_bytes()
    cap = _MEMORY_CAP.get()
    return free if cap is None else min(free, cap)


def chunk_size(
    bytes_per_item: int,
    device: torch.device,
    *,
    n_items: int | None = None,
    fraction: float = 0.5,
    minimum: int = 1,
    maximum: int | None = None,
) -> int:
    """How many items (permutations, subjects, seeds) to process at once.

    Parameters
    ----------
    bytes_per_item : int
        Peak working memory one item needs on the device.
    device : torch.device
    n_items : int, optional
        Total number of items; the chunk never exceeds it.
    fraction : float, default 0.5
        Share of the free memory to plan for (the rest is headroom).
    minimum, maximum : int
        Bounds on the chunk size.

    Returns
    -------
    int
        At least ``minimum`` (and at least 1).
    """
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    budget = int(free_memory_bytes(device) * fraction)
    size = max(minimum, 1, budget // bytes_per_item)
    if maximum is not None:
        size = min(size, maximum)
    if n_items is not None:
        size = min(size, max(n_items, 1))
    return int(size)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (torch or CuPy) out-of-memory error."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # cupy.cuda.memory.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def run_chunked(
    func: Callable[[int, int], T],
    n_items: int,
    chunk: int,
    *,
    on_halve: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, int, T]]:
    """Run ``func(start, stop)`` over ``range(n_items)`` in chunks, halving on OOM.

    Parameters
    ----------
    func : callable
        Does the work for items ``start:stop`` and returns a result. It must
        not have side effects that a retry would repeat.
    n_items : int
        Number of items.
    chunk : int
        Initial chunk size (see :func:`chunk_size`).
    on_halve : callable, optional
        Called with the new chunk size each time an OOM halves it.

    Yields
    ------
    start, stop, result
        In order; results are identical whatever the chunk size when
        ``func`` is deterministic per item.

    Raises
    ------
    GpuconnError
        If a single item does not fit in memory.
    """
    chunk = max(1, int(chunk))
    start = 0
    while start < n_items:
        stop = min(start + chunk, n_items)
        try:
            result = func(start, stop)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if stop - start == 1:
                raise GpuconnError(
                    "out of device memory even for a single item; free GPU memory "
                    "held by other processes or use --device cpu"
                ) from exc
            chunk = max(1, (stop - start) // 2)
            if on_halve is not None:
                on_halve(chunk)
            continue
        yield start, stop, result
        start = stop
