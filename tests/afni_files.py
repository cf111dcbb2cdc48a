"""Write small AFNI datasets (``.HEAD`` + ``.BRIK``) for tests, as AFNI's own files lay them out.

The ``.HEAD`` is AFNI's attribute text (``type``/``name``/``count`` then the
values; strings quoted with a leading ``'`` and ending ``~``); the ``.BRIK``
holds the sub-bricks one after the other, x fastest. ``IJK_TO_DICOM_REAL``
maps voxel indices to DICOM (LPS) mm, i.e. the RAS affine with its x and y
rows negated.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int16): 1, np.dtype(np.float32): 3}
_SPACES = {"orig": "ORIG", "tlrc": "TLRC"}


def _attr(kind: str, name: str, values) -> str:
    if kind == "string":
        text = str(values)
        return f"type = string-attribute\nname = {name}\ncount = {len(text) + 1}\n'{text}~"
    values = list(np.atleast_1d(values))
    body = " ".join(str(int(v)) if kind == "integer" else f"{float(v):.9g}" for v in values)
    return f"type = {kind}-attribute\nname = {name}\ncount = {len(values)}\n {body}"


def write_dataset(
    prefix: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    view: str = "tlrc",
    tr: float | None = None,
    tr_units: int = 77002,
    scale: np.ndarray | None = None,
    gzip_brik: bool = False,
) -> Path:
    """Write ``data`` (x, y, z[, t]) as ``prefix+view.HEAD``/``.BRIK``; returns the ``.HEAD`` path.

    ``scale`` (one factor per sub-brick) stores ``data`` as int16 ``round(data / scale)``
    with ``BRICK_FLOAT_FACS = scale`` (0 means unscaled); ``tr`` adds a time axis.
    """
    data = np.asarray(data)
    volumes = data if data.ndim == 4 else data[..., None]
    n = volumes.shape[3]
    if scale is not None:
        scale = np.broadcast_to(np.asarray(scale, dtype=float), (n,))
        stored = np.stack([np.round(volumes[..., i] / (s or 1.0)) for i, s in enumerate(scale)], axis=-1).astype(np.int16)
    else:
        stored = volumes
    dicom = np.asarray(affine, dtype=float)[:3] * np.array([[-1.0], [-1.0], [1.0]])
    attrs = [
        _attr("string", "TYPESTRING", "3DIM_HEAD_FUNC" if tr else "3DIM_HEAD_ANAT"),
        _attr("integer", "SCENE_DATA", [2 if view == "tlrc" else 0, 11 if tr else 0, 1 if tr else 0, -999, -999, -999, -999, -999]),
        _attr("integer", "ORIENT_SPECIFIC", [1, 2, 4]),
        _attr("float", "ORIGIN", dicom[:, 3]),
        _attr("float", "DELTA", np.diag(dicom[:, :3])),
        _attr("float", "IJK_TO_DICOM_REAL", dicom.ravel()),
        _attr("integer", "DATASET_RANK", [3, n, 0, 0, 0, 0, 0, 0]),
        _attr("integer", "DATASET_DIMENSIONS", [*stored.shape[:3], 0, 0]),
        _attr("integer", "BRICK_TYPES", [_TYPES[stored.dtype]] * n),
        _attr("float", "BRICK_FLOAT_FACS", scale if scale is not None else np.zeros(n)),
        _attr("string", "TEMPLATE_SPACE", _SPACES.get(view, "ORIG")),
        _attr("string", "BYTEORDER_STRING", "LSB_FIRST"),
    ]
    if tr:
        attrs.append(_attr("integer", "TAXIS_NUMS", [n, 0, tr_units, -999, -999, -999, -999, -999]))
        attrs.append(_attr("float", "TAXIS_FLOATS", [0.0, tr, 0.0, 0.0, 0.0, -999999.0, -999999.0, -999999.0]))
    head = "\n" + "\n\n".join(attrs) + "\n"
    prefix = Path(f"{prefix}+{view}")
    head_path = Path(str(prefix) + ".HEAD")
    head_path.write_text(head)
    raw = np.asarray(stored, dtype=stored.dtype.newbyteorder("<")).tobytes(order="F")
    brik = Path(str(prefix) + ".BRIK")
    if gzip_brik:
        Path(str(brik) + ".gz").write_bytes(gzip.compress(raw))
    else:
        brik.write_bytes(raw)
    return head_path
