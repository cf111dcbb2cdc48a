"""Paired first-level differences for a mixed-effects regression (post - pre, varcopes summed).

The reference study regressed the change in pain on the change in
connectivity: per subject the post - pre difference of the first-level
copes, whose variance (the two runs' estimates being independent) is the
sum of their varcopes. :func:`paired_differences` writes both 4D images,
ready for ``gpuconn flame --cope diff_cope --varcope diff_varcope`` with a
regression design (one row per subject, e.g. from ``gpuconn design``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.io import check_same_grid, load_image, save_image

__all__ = ["paired_differences"]


def paired_differences(
    pre_cope: str | os.PathLike,
    post_cope: str | os.PathLike,
    pre_varcope: str | os.PathLike,
    post_varcope: str | os.PathLike,
    out_cope: str | os.PathLike,
    out_varcope: str | os.PathLike,
) -> tuple[Path, Path]:
    """Write ``post - pre`` copes and ``pre + post`` varcopes, one volume per subject.

    Parameters
    ----------
    pre_cope, post_cope, pre_varcope, post_varcope : path-like
        4D images on one grid, one volume per subject in the same order.
    out_cope, out_varcope : path-like
        Outputs (``.nii.gz``), written atomically with JSON sidecars.

    Returns
    -------
    (Path, Path)

    Raises
    ------
    InputError
        A missing or non-4D file, grids or volume counts that differ, or a
        negative / NaN varcope (naming the file); nothing is written.
    """
    paths = {"pre cope": pre_cope, "post cope": post_cope, "pre varcope": pre_varcope, "post varcope": post_varcope}
    images = {name: load_image(path, ndim=4, what=name) for name, path in paths.items()}
    first = "pre cope"
    for name, img in images.items():
        check_same_grid(images[first], paths[first], img, paths[name])
        if img.shape[3] != images[first].shape[3]:
            raise InputError(
                f"{paths[name]} has {img.shape[3]} volumes but {paths[first]} has {images[first].shape[3]}; "
                "give one volume per subject, in the same order, in all four images"
            )
    data = {name: np.asarray(img.dataobj, dtype=np.float64) for name, img in images.items()}
    for name in ("pre varcope", "post varcope"):
        bad = ~np.isfinite(data[name]) | (data[name] < 0)
        if bad.any():
            raise InputError(
                f"{paths[name]} has {int(bad.any(axis=3).sum())} voxel(s) with negative, NaN or Inf variances; "
                "varcopes must be finite and >= 0 (check the first-level outputs)"
            )
    record = {k: str(v) for k, v in paths.items()}
    cope = save_image(data["post cope"] - data["pre cope"], images[first], out_cope,
                      params={**record, "what": "post - pre cope"})
    varcope = save_image(data["pre varcope"] + data["post varcope"], images[first], out_varcope,
                         params={**record, "what": "pre + post varcope"})
    return cope, varcope
