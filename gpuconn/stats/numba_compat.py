"""Numba for the CPU sweeps of cluster labelling and TFCE, with a plain-Python fallback.

``njit`` compiles a function (GIL released; cached in a per-user folder,
never inside the installed package) when Numba is installed and returns it
unchanged otherwise; ``prange`` is Numba's parallel range or
``range``; :func:`warn_no_numba` tells the user when the slow path runs.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path

__all__ = ["HAVE_NUMBA", "njit", "prange", "warn_no_numba"]



def _numba_cache_dir() -> str:
    """A writable per-user folder for Numba's compiled kernels, outside the installed package.

    Numba's default cache is ``__pycache__`` beside the source: inside a
    non-editable install that folder outlives ``pip uninstall`` and turns
    ``site-packages/gpuconn`` into a namespace package that shadows a later
    editable install.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpuconn" / "numba"
    for folder in (base, Path(tempfile.gettempdir()) / f"gpuconn-numba-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return str(folder)
        except OSError:
            continue
    return ""


try:  # Numba compiles the CPU union-find; without it the same code runs as Python.
    import numba

    if not numba.config.CACHE_DIR:  # NUMBA_CACHE_DIR, when the user set one, is kept
        numba.config.CACHE_DIR = _numba_cache_dir()
    njit = functools.partial(numba.njit, cache=bool(numba.config.CACHE_DIR), nogil=True)
    prange = numba.prange
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_NUMBA = False
    prange = range

    def njit(*args, **kwargs):
        if args and callable(args[0]):
            return args[0]
        return lambda func: func


def warn_no_numba(what: str) -> None:
    """Warn that ``what`` runs as plain Python because Numba is missing."""
    if not HAVE_NUMBA:
        warnings.warn(
            f"numba is not installed: {what} runs as plain Python and is very slow on real maps; "
            "pip install numba",
            RuntimeWarning,
            stacklevel=3,
        )
