"""Numeric text matrices (MCFLIRT ``.par``, fsl_motion_outliers output, AFNI ``.1D``): rows to a checked array.

The readers of each format (:func:`gpuconn.subject.confounds.read_matrix`,
:mod:`gpuconn.core.afni`) split their files into rows of tokens; this module
turns the rows into one float matrix or a one-line error naming the file.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import InputError

__all__ = ["numeric_rows"]


def numeric_rows(rows: list[list[str]], source: str | os.PathLike, *, what: str, kind: str = "numeric matrix") -> np.ndarray:
    """The rows as a float matrix, shape (n_rows, n_columns).

    Parameters
    ----------
    rows : list of list of str
        One list of tokens per non-empty line.
    source : path-like
        The file, for error messages.
    what : str
        What the file is for (``'motion parameters'``).
    kind : str
        What a good file holds, for the non-numeric message (``'numeric .1D matrix'``).

    Raises
    ------
    InputError
        No row, rows of different lengths, or a token that is not a number.
    """
    if not rows:
        raise InputError(f"{what} {source} is empty; expected one row per volume")
    if len({len(row) for row in rows}) != 1:
        raise InputError(f"{what} {source} has rows of different lengths; expected a rectangular matrix")
    try:
        return np.array(rows, dtype=float)
    except ValueError as exc:
        raise InputError(f"{what} {source} has non-numeric values ({exc}); expected a {kind}") from exc
