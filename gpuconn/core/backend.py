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
import gc
import importlib.resources
import importlib.util
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import OptionError

__all__ = [
    "DATA_DTYPE",
    "DESIGN_DTYPE",
    "resolve_device",
    "device_scope",
    "scoped_device",
    "uses_device",
    "cuda_available",
    "as_data",
    "as_design",
    "to_numpy",
    "to_host",
    "require_cupy",
    "to_cupy",
    "from_cupy",
    "load_kernel",
    "KERNELS",
    "compile_kernels",
    "kernel_problem",
    "cupy_launch",
    "map_launch",
    "tf32_disabled",
    "free_memory_bytes",
    "host_available_bytes",
    "set_max_memory",
    "memory_cap",
    "max_memory",
    "chunk_size",
    "cuda_chunk_cap",
    "is_out_of_memory",
    "release_cached_memory",
    "run_chunked",
]

#: dtype of imaging data and large products on the device.
DATA_DTYPE = torch.float32
#: dtype of designs, pseudo-inverses and projections.
DESIGN_DTYPE = torch.float64


def _disable_tf32() -> None:
    """Full float32 in matmuls and cuDNN: the ``fp32_precision`` API where torch has it (>= 2.9), else legacy flags.

    Mixing the two APIs makes torch refuse to read the legacy flags, so only
    one of them is used.
    """
    torch.set_float32_matmul_precision("highest")
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "fp32_precision"):
        matmul.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
    else:  # pragma: no cover - torch < 2.9
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def tf32_disabled() -> bool:
    """True when neither matmuls nor cuDNN may use TF32 (read through the API that set them)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "fp32_precision"):
        return (matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
                and torch.backends.cudnn.rnn.fp32_precision == "ieee")
    return not (matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)  # pragma: no cover - torch < 2.9


# TF32 (or bf16 on CPUs that offer it) would silently reduce float32 matmuls
# to ~10 mantissa bits; keep full float32 on every backend.
_disable_tf32()

_DEVICE_CHOICES = ("auto", "cpu", "cuda")
# The --max-memory cap of the command running in this context (None: no cap).
_MEMORY_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("gpuconn_memory_cap", default=None)

# The --device of the step running in this context, as given (None: no step set one; 'auto').
_STEP_DEVICE: contextvars.ContextVar[str | torch.device | None] = contextvars.ContextVar("gpuconn_step_device",
                                                                                       default=None)

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
    OptionError
        If ``cuda`` is requested and no CUDA device is visible, or the name
        is not a device (worded with the parameter ``device``).
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
            raise OptionError(
                f"{{device}} {name}: torch sees no CUDA device "
                f"(torch {torch.__version__}); use {{device}} cpu or {{device}} auto"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(
                f"{{device}} {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return device
    raise OptionError(f"{{device}} {name!r} is not one of {', '.join(_DEVICE_CHOICES)} (or cuda:N)")


@contextlib.contextmanager
def device_scope(device: str | torch.device) -> Iterator[None]:
    """Make ``device`` the device of the images opened while the block runs; the previous one returns after it.

    Images that compute when read (FEAT data resampled to standard space,
    :mod:`gpuconn.core.feat`) are opened deep inside :mod:`gpuconn.core.io`;
    they take the device of the step that opens them from here. Like
    :func:`memory_cap` it is a :mod:`contextvars` variable: it holds for this
    thread and the contexts copied from it (the read-ahead threads copy it),
    and each Dask task sets its own by calling its step.

    Parameters
    ----------
    device : str or torch.device
        As given to the step (``'auto'``, ``'cpu'``, ``'cuda:1'``); resolved
        where it is used, so a Dask client needs no GPU for ``--device cuda``.
    """
    token = _STEP_DEVICE.set(device)
    try:
        yield
    finally:
        _STEP_DEVICE.reset(token)


def scoped_device() -> str | torch.device:
    """The device of the step running in this context (:func:`device_scope`), ``'auto'`` outside any."""
    device = _STEP_DEVICE.get()
    return "auto" if device is None else device


def uses_device(func: Callable[..., T]) -> Callable[..., T]:
    """Run a step (a function or a generator) inside :func:`device_scope` of its ``device`` argument.

    For the library steps that take ``device`` and open images, so that
    ``--device cpu`` holds for everything they compute, the resampling of
    FEAT inputs included.
    """
    signature = inspect.signature(func)
    default = signature.parameters["device"].default

    def device_of(args: tuple, kwargs: dict) -> str | torch.device:
        return signature.bind_partial(*args, **kwargs).arguments.get("device", default)

    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def generator(*args: Any, **kwargs: Any) -> Any:
            with device_scope(device_of(args, kwargs)):
                return (yield from func(*args, **kwargs))
        return generator

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with device_scope(device_of(args, kwargs)):
            return func(*args, **kwargs)
    return wrapper


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
        raise OptionError(
            "this step needs CuPy for its CUDA kernel; install it with "
            "pip install 'gpuconn[gpu]' (CUDA 12) or 'gpuconn[gpu-cuda13]', or use {device} cpu"
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


#: NVRTC options of every kernel: no fused multiply-add contraction, so each
#: kernel does the same float operations as its CPU twin (bit-identical sums).
NVRTC_OPTIONS = ("-std=c++14", "--fmad=false")

#: The custom kernels, as (file in :mod:`gpuconn.kernels`, ``extern "C"`` name).
KERNELS = (
    ("labels.cu", "gpuconn_label_batch"),
    ("labels.cu", "gpuconn_cluster_stat_batch"),
    ("tfce.cu", "gpuconn_tfce_sweep"),
)


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
        NVRTC options added to :data:`NVRTC_OPTIONS`.

    Returns
    -------
    cupy.RawKernel
        Compiled: the function's attributes are read here, which makes CuPy
        compile and load the module now rather than at the first launch.
    """
    cupy = require_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=_kernel_source(filename), options=NVRTC_OPTIONS + tuple(options))
        kernel = module.get_function(name)
        _ = kernel.max_threads_per_block  # forces compilation and loading on this device
        return kernel


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _kernel_status(device_index: int) -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return ("CuPy is not installed (pip install 'gpuconn[gpu]' for CUDA 12 or 'gpuconn[gpu-cuda13]' "
                "for CUDA 13)")
    try:
        for filename, name in KERNELS:
            load_kernel(filename, name, device_index)
    except Exception as exc:  # NVRTC missing, compile error, driver too old: all mean "no kernels"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"the CUDA kernels did not compile on cuda:{device_index} ({type(exc).__name__}: {first})"
    return None


def compile_kernels(device: str | torch.device = "auto", *, required: bool = False) -> str | None:
    """Compile every custom kernel for ``device`` now, so no step compiles mid-run.

    Called by ``gpuconn info`` and at the start of the commands whose steps
    launch kernels. The outcome is cached per device.

    Parameters
    ----------
    device : str or torch.device, default 'auto'
    required : bool, default False
        Raise instead of returning the problem.

    Returns
    -------
    str or None
        None when the kernels are ready (or the device is not CUDA, which
        needs none); otherwise one line saying why they cannot be used, in
        which case each step falls back to its torch/host path with a warning.

    Raises
    ------
    OptionError
        With ``required=True``, when the kernels cannot be used.
    """
    device = resolve_device(device)
    if device.type != "cuda":
        return None
    problem = _kernel_status(_device_index(device))
    if problem is not None and required:
        raise OptionError(f"{problem}; use {{device}} cpu, or fix the CuPy install")
    return problem


def kernel_problem(device: torch.device, what: str, fallback: str) -> str | None:
    """Check the kernels on a CUDA ``device`` before a launch; warn about the fallback when they can't run.

    Parameters
    ----------
    device : torch.device
        A CUDA device.
    what, fallback : str
        The step and the path it takes instead, for the warning.

    Returns
    -------
    str or None
        None when the kernels are ready.
    """
    problem = compile_kernels(device)
    if problem is not None:
        warnings.warn(f"{what} on CUDA uses {fallback}: {problem}", RuntimeWarning, stacklevel=3)
    return problem


def map_launch(n_maps: int, device: torch.device) -> tuple[tuple[int], tuple[int]]:
    """Grid and block of a one-thread-per-map kernel, spread over every multiprocessor.

    Each thread walks a whole map (a union-find sweep: dependent, uncoalesced
    loads), so a launch is latency-bound and its speed grows with the number
    of multiprocessors that hold a thread. Blocks are one warp (32 threads)
    when there are enough maps for every multiprocessor; with fewer maps they
    shrink so that the maps still spread over all of them.

    Parameters
    ----------
    n_maps : int
    device : torch.device
        A CUDA device.

    Returns
    -------
    grid, block : tuple of int
    """
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    threads = max(1, min(32, -(-int(n_maps) // n_sm)))
    return (max(1, -(-int(n_maps) // threads)),), (threads,)


@contextlib.contextmanager
def cupy_launch(device: torch.device) -> Iterator[Any]:
    """Launch CuPy kernels on ``device`` in torch's current stream of that device.

    CuPy launches on its own current device, which is not the tensor's for
    ``cuda:N`` with N > 0; this enters that device and wraps torch's stream
    (with its device) as CuPy's current stream.

    Yields
    ------
    module
        CuPy.
    """
    cupy = require_cupy()
    index = _device_index(device)
    pointer = torch.cuda.current_stream(device).cuda_stream
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(pointer, index):
        yield cupy


def host_available_bytes() -> int:
    """Memory the host can still give (``MemAvailable``), in bytes."""
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
        raise OptionError(f"{{max_memory}} must be positive, got {n_bytes} bytes")
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
    OptionError
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

    On CUDA this is ``torch.cuda.mem_get_info`` (free bytes) plus what
    torch's caching allocator holds reserved but unallocated (free for torch,
    invisible to the driver); on CPU the host's ``MemAvailable``.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        free += max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    else:
        free = host_available_bytes()
    cap = _MEMORY_CAP.get()
    return free if cap is None else min(free, cap)


def _readable(n_bytes: int) -> str:
    """``1536000`` -> ``'1.5 MB'`` (decimal units, as --max-memory takes them)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{n_bytes} B"


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

    Raises
    ------
    OptionError
        A :func:`memory_cap` (``max_memory``, ``--max-memory``) too small
        for ``minimum`` items: the work cannot be done within it.
    """
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    budget = int(free_memory_bytes(device) * fraction)
    cap = _MEMORY_CAP.get()
    need = bytes_per_item * max(minimum, 1)
    if cap is not None and int(cap * fraction) < need:
        least = math.ceil(need / fraction)
        raise OptionError(f"{{max_memory}} {cap} bytes is too small for this work: it needs at least {least} bytes "
                          f"(about {_readable(least)}); raise {{max_memory}} or leave it out")
    size = max(minimum, 1, budget // bytes_per_item)
    if maximum is not None:
        size = min(size, maximum)
    if n_items is not None:
        size = min(size, max(n_items, 1))
    return int(size)


#: CUDA chunks are at most this many items or 1/_CUDA_UPDATES of the work, whichever is larger.
_CUDA_MIN_CAP = 1024
_CUDA_UPDATES = 16


#: With spatial statistics (one thread per map in the kernels) chunks may reach this many maps.
_CUDA_SPATIAL_CAP = 4096


def cuda_chunk_cap(n_items: int, *, spatial: bool = False) -> int:
    """Largest chunk of ``n_items`` permutations to plan on CUDA.

    Without a cap a large GPU takes the whole permutation set as one chunk,
    and progress and checkpoints only happen at the end. The cap keeps about
    ``16`` chunks for large runs while every launch still carries at least
    ``1024`` maps. With spatial statistics the kernels run one thread per
    map and their launch time hardly grows with the number of maps, so the
    cap is ``4096`` maps (memory permitting; see ``kernels/README.md``).

    Parameters
    ----------
    n_items : int
    spatial : bool, default False
        TFCE or cluster statistics are computed on each chunk.

    Returns
    -------
    int
        ``max(1024, ceil(n_items / 16))``, or ``max(4096, ...)`` with ``spatial``.
    """
    floor = _CUDA_SPATIAL_CAP if spatial else _CUDA_MIN_CAP
    return max(floor, -(-int(n_items) // _CUDA_UPDATES))


# Texts of out-of-memory errors: torch's allocator, a raw CUDA error, cuBLAS/cuSOLVER
# handles or workspaces, CuPy's driver and runtime errors.
_OOM_TEXTS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUSOLVER_STATUS_ALLOC_FAILED",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "cudaErrorMemoryAllocation",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error from torch, cuBLAS, cuSOLVER or CuPy."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # cupy.cuda.memory.OutOfMemoryError
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _OOM_TEXTS)


def release_cached_memory(device: torch.device | None = None) -> None:
    """Return cached device memory to the driver (after an OOM, before a retry).

    Call it outside any ``except`` block: while the exception is being handled
    its traceback keeps the failed chunk's tensors alive.

    Parameters
    ----------
    device : torch.device, optional
        The CUDA device to free; default the current one.
    """
    gc.collect()  # tensors caught in reference cycles with the failed frames
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
    else:
        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def run_chunked(
    func: Callable[[int, int], T],
    n_items: int,
    chunk: int,
    *,
    on_halve: Callable[[int], None] | None = None,
    device: torch.device | None = None,
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
    device : torch.device, optional
        The device ``func`` works on, whose cache is freed after an OOM
        (default: the current CUDA device).

    Yields
    ------
    start, stop, result
        In order; results are identical whatever the chunk size when
        ``func`` is deterministic per item.

    Raises
    ------
    OptionError
        If a single item does not fit in memory.
    """
    chunk = max(1, int(chunk))
    start = 0
    while start < n_items:
        stop = min(start + chunk, n_items)
        out_of_memory, result = False, None
        try:
            result = func(start, stop)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if stop - start == 1:
                raise OptionError(
                    "out of device memory even for a single item; free GPU memory "
                    "held by other processes or use {device} cpu"
                ) from exc
            out_of_memory = True
        if out_of_memory:  # outside the handler, so the failed chunk's tensors can be freed
            release_cached_memory(device)
            chunk = max(1, (stop - start) // 2)
            if on_halve is not None:
                on_halve(chunk)
            continue
        yield start, stop, result
        start = stop
