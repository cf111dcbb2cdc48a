"""Atlas label tables: the names of an atlas image's integer labels.

:func:`read_atlas_labels` reads the layouts atlases ship with:

- a table with a header holding ``index`` and ``name`` columns, tab- or
  comma-separated (BIDS ``*_dseg.tsv`` as fMRIPrep and TemplateFlow write
  them, nilearn's atlas ``labels`` tables saved with ``to_csv``); other
  columns (``abbreviation``, ``color``...) are ignored;
- lines without a header, ``<index> <name> [...]`` separated by tabs or
  spaces, ``#`` comments allowed (Schaefer's ``*_order.txt`` /
  ``*.lut``, FreeSurfer's ``*LUT.txt``).

:func:`sibling_label_table` finds the BIDS companion of an atlas image
(``atlas_dseg.nii.gz`` -> ``atlas_dseg.tsv``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from .errors import InputError
from .io import existing_input, read_tsv, split_ext

__all__ = ["read_atlas_labels", "sibling_label_table"]

_HEADERLESS = re.compile(r"^\s*([+-]?\d+)\s+(\S.*?)\s*$")


def read_atlas_labels(path: str | os.PathLike) -> dict[int, str]:
    """Read an atlas label table (module docstring for the layouts).

    Parameters
    ----------
    path : path-like

    Returns
    -------
    dict of int to str
        Label value to name, in file order (label 0, the background, kept if listed).

    Raises
    ------
    InputError
        A missing file, a header without ``index`` and ``name``, indices that
        are not integers, or a repeated index; naming the file.
    """
    path = existing_input(path, what="atlas label table")
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and _HEADERLESS.match(lines[0]):
        pairs = []
        for number, line in enumerate(lines, start=1):
            match = _HEADERLESS.match(line)
            if match is None:
                raise InputError(f"atlas label table {path}: line {number} {line.strip()!r} is not '<index> <name>'")
            name = re.split(r"\t", match.group(2))[0].strip() if "\t" in line else match.group(2).split()[0]
            pairs.append((int(match.group(1)), name))
    else:
        table = read_tsv(path, what="atlas label table")
        missing = [c for c in ("index", "name") if c not in table.columns]
        if missing:
            raise InputError(f"atlas label table {path} lacks column(s) {missing}; it needs a header with 'index' and "
                             "'name' (BIDS dseg.tsv), or lines '<index> <name>' without a header")
        try:
            indices = pd.to_numeric(table["index"], errors="raise")
        except (TypeError, ValueError) as exc:
            raise InputError(f"atlas label table {path}: 'index' must hold integers ({exc})") from None
        if not (indices == indices.round()).all():
            raise InputError(f"atlas label table {path}: 'index' must hold integers")
        pairs = list(zip(indices.astype(int).tolist(), table["name"].astype(str).tolist()))
    indices = [index for index, _ in pairs]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise InputError(f"atlas label table {path} lists index {repeated[0]} more than once")
    return dict(pairs)


def sibling_label_table(image: str | os.PathLike) -> Path | None:
    """The BIDS label table beside an atlas image (``x.nii.gz`` -> ``x.tsv``), or None when there is none."""
    candidate = Path(split_ext(image)[0] + ".tsv")
    return candidate if candidate.is_file() else None
