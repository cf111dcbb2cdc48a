"""``gpuconn info``: versions, the device found, CUDA and CuPy status."""

from __future__ import annotations

import importlib.util
import platform

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text


def _cupy_version() -> str:
    """CuPy's version and CUDA runtime, or why it cannot be imported."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library CuPy cannot load
        return f"not usable ({type(exc).__name__}: {exc})"
    return f"{cupy.__version__} (CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()})"


def _gzip_decoder() -> str:
    """Which inflater reads ``.nii.gz`` (:func:`gpuconn.core.nifti.gzip_decoder`)."""
    from gpuconn.core.nifti import gzip_decoder

    version = gzip_decoder()
    return "stdlib gzip (faster, same arrays: gpuconn[fast-gzip])" if version is None else f"igzip (python-isal {version})"


def info() -> None:
    """Print package versions, the device gpuconn would use, and CUDA/CuPy status."""
    import nibabel
    import numpy
    import scipy
    import torch

    from gpuconn import __version__
    from gpuconn.core.backend import resolve_device

    table = Table(show_header=False, box=None)
    rows = [
        ("gpuconn", __version__),
        ("python", platform.python_version()),
        ("numpy", numpy.__version__),
        ("scipy", scipy.__version__),
        ("torch", torch.__version__),
        ("nibabel", nibabel.__version__),
        ("gzip decoder", _gzip_decoder()),
        ("device (auto)", str(resolve_device("auto"))),
        ("torch CUDA build", str(torch.version.cuda)),
        ("CUDA devices", str(torch.cuda.device_count())),
    ]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append((f"cuda:{index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    if torch.cuda.is_available():  # compile the kernels now: a broken CuPy/NVRTC shows here, not mid-run
        from gpuconn.core.backend import compile_kernels

        problem = compile_kernels("cuda") if importlib.util.find_spec("cupy") else "CuPy is not installed"
        rows.append(("cupy", _cupy_version()))
        rows.append(("CUDA kernels", "compiled" if problem is None else f"unavailable: {problem}"))
    else:  # find_spec only: importing CuPy here would initialise CUDA for nothing.
        rows.append(("cupy", "installed" if importlib.util.find_spec("cupy") else "not installed (optional: gpuconn[gpu])"))
    for name, value in rows:
        table.add_row(name, Text(value))
    Console().print(table)
    raise typer.Exit(0)
