"""Numba for the CPU sweeps of cluster labelling and TFCE, with a plain-Python fallback.

``njit`` compiles a function (cached, GIL released) when Numba is installed
and returns it unchanged otherwise; ``prange`` is Numba's parallel range or
``range``; :func:`warn_no_numba` tells the user when the slow path runs.
"""

from __future__ import annotations

import functools
import warnings

__all__ = ["HAVE_NUMBA", "njit", "prange", "warn_no_numba"]

try:  # Numba compiles the CPU union-find; without it the same code runs as Python.
    import numba

    njit = functools.partial(numba.njit, cache=True, nogil=True)
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
