"""Exceptions for user errors.

A :class:`GpuconnError` is a problem with the user's input or environment
(a missing file, mismatched grids, a bad design). The CLI prints its message
as one line and exits non-zero, without a traceback. Programming errors stay
ordinary exceptions and keep their tracebacks.
"""

__all__ = ["GpuconnError", "InputError"]


class GpuconnError(Exception):
    """An error the user can fix; its message names the file or option and the fix."""


class InputError(GpuconnError, ValueError):
    """Bad input values: wrong shapes, mismatched affines, NaNs, bad designs."""
