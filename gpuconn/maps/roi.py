"""ROI extraction: mean map values in ROIs, and ROI-to-ROI connectivity matrices.

ROIs are :class:`gpuconn.maps.regions.Region` objects (spheres at MNI coordinates,
mask images or atlas labels) placed on each image's grid with the same
nilearn-equal sphere rule as the seeds. :func:`extract_roi_values` turns any
3D/4D maps (seed maps, dual-regression maps, contrasts) into a tidy table
``(subject, session, map, roi, value)``; :func:`compute_roi_matrices` writes,
for each run, the correlation matrix of the ROIs' mean time series.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.backend import as_data, resolve_device, to_numpy, uses_device
from ..core.errors import InputError
from ..core.io import load_image, load_mask, masked_data, check_same_grid, sidecar_path, split_ext, write_tsv
from ..core.progress import progress_bar
from .regions import Region, region_masks, region_means, region_weights
from .seed import correlate_seeds, fisher_z
from .series import BoldInput, label_entities, prepare_inputs, stream_inputs

__all__ = ["ROI_COLUMNS", "DIAGONAL", "roi_connectivity", "extract_roi_values", "compute_roi_matrices"]

#: Columns of the tidy table written by ``gpuconn roi extract``.
ROI_COLUMNS = ("subject", "session", "map", "roi", "value")


#: How the matrices' diagonals are defined (recorded in their sidecars).
DIAGONAL = {"r": 1.0, "z": "n/a (NaN: the Fisher z of r = 1 is infinite)"}


def roi_connectivity(data: torch.Tensor, weights: torch.Tensor, *, source: str = "data") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlation matrix of ROI mean time series.

    Parameters
    ----------
    data : torch.Tensor, shape (..., n_volumes, n_voxels)
    weights : torch.Tensor, shape (n_rois, n_voxels)
        Averaging weights (:func:`gpuconn.maps.regions.region_weights`).
    source : str
        Named in warnings.

    Returns
    -------
    r, z : torch.Tensor, shape (..., n_rois, n_rois)
        Pearson r and Fisher z, exactly symmetric (``r[i, j] == r[j, i]``
        bit for bit). The diagonal of r is 1 (also for a constant ROI, whose
        other entries are 0 with a warning, as in the seed maps); the
        diagonal of z is NaN: the z of r = 1 is infinite, and a NaN is never
        mistaken for a connection (it is written ``n/a``; average matrices
        with ``nanmean``). See :data:`DIAGONAL`.
    timeseries : torch.Tensor, shape (..., n_rois, n_volumes)

    Notes
    -----
    The ROI time series are correlated with :func:`gpuconn.maps.seed.correlate_seeds`
    using identity weights, so the centring, constant handling and z clipping
    are those of the seed maps; the two halves are then averaged,
    ``(r + r.T) / 2`` (they differ by float32 rounding only).
    """
    timeseries = region_means(data, weights)  # (..., R, T)
    n_rois = weights.shape[0]
    eye = torch.eye(n_rois, dtype=data.dtype, device=data.device)
    r = correlate_seeds(timeseries.transpose(-1, -2), eye, source=source, names=("ROI", None)).r
    r = (r + r.transpose(-1, -2)) / 2
    diagonal = torch.eye(n_rois, dtype=torch.bool, device=r.device)
    r = r.masked_fill(diagonal, 1.0)
    z = fisher_z(r).masked_fill(diagonal, float("nan"))
    return r, z, timeseries


def _volume_labels(path: Path, n_volumes: int) -> list[dict]:
    """Subject, session and map name of each volume: from a gpuconn sidecar, else the file name."""
    sidecar = sidecar_path(path)
    if sidecar.exists():
        try:
            volumes = json.loads(sidecar.read_text()).get("Parameters", {}).get("volumes")
        except (json.JSONDecodeError, AttributeError):
            volumes = None
        if isinstance(volumes, list) and len(volumes) == n_volumes and all(isinstance(v, dict) for v in volumes):
            return [{"subject": v.get("subject"), "session": v.get("session"), "map": v.get("map")} for v in volumes]
    stem = Path(split_ext(path.name)[0]).name
    names = [stem] if n_volumes == 1 else [f"{stem}_vol-{i}" for i in range(n_volumes)]
    return [{**label_entities(stem), "map": name} for name in names]


def extract_roi_values(
    maps: Sequence[str | os.PathLike],
    regions: Sequence[Region],
    *,
    mask: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Mean value of every map volume inside every ROI.

    Parameters
    ----------
    maps : sequence of path
        3D or 4D NIfTI files (all volumes are used).
    regions : sequence of Region
        The ROIs.
    mask : path, optional
        Restricts the ROIs (a brain mask on the maps' grid).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`ROI_COLUMNS`, one row per (volume, ROI), in file,
        volume and ROI order. ``subject``/``session``/``map`` come from the
        ``volumes`` list of a gpuconn sidecar (seed maps in either layout),
        otherwise from the file name's ``sub-``/``ses-`` entities and stem.

    Raises
    ------
    InputError
        Missing file, an ROI with no voxel, NaN inside an ROI, a mask on
        another grid.
    """
    if not maps:
        raise InputError("no map given; pass one or more 3D/4D NIfTI files")
    rows = []
    placed: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for path in (Path(p) for p in maps):
        img = load_image(path, what="map")
        if img.ndim not in (3, 4):
            raise InputError(f"map {path} has shape {img.shape}; expected a 3D or 4D image")
        key = (img.shape[:3], np.round(img.affine, 3).tobytes())
        if key not in placed:
            brain = None
            if mask is not None:
                brain, brain_img = load_mask(mask, what="mask")
                check_same_grid(img, path, brain_img, mask)
            found = region_masks(regions, img, mask=brain, reference_path=path, mask_path=mask, what="ROI")
            union = found.any(axis=0)
            placed[key] = (union, region_weights(found, union))
        union, weights = placed[key]
        values = masked_data(img, union, path=path)  # (n_volumes, n_union)
        means = to_numpy(region_means(torch.from_numpy(values), torch.from_numpy(weights)))  # (R, n_volumes)
        for volume, label in enumerate(_volume_labels(path, values.shape[0])):
            rows.extend({**label, "roi": region.name, "value": float(means[i, volume])} for i, region in enumerate(regions))
    return pd.DataFrame(rows, columns=list(ROI_COLUMNS))


def _square(matrix: np.ndarray, names: list[str]) -> pd.DataFrame:
    table = pd.DataFrame(matrix, columns=names)
    table.insert(0, "roi", names)
    return table


@uses_device
def compute_roi_matrices(
    inputs: Sequence[BoldInput],
    regions: Sequence[Region],
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    progress: bool = False,
    params: dict | None = None,
) -> list[Path]:
    """ROI-to-ROI correlation matrices (all pairs) for every run.

    Writes ``<label>_stat-r_roimatrix.tsv`` and ``<label>_stat-z_roimatrix.tsv``
    (square, first column ``roi``, exactly symmetric, diagonal r = 1 and
    z = ``n/a`` as :func:`roi_connectivity` defines it; JSON sidecars
    record it under ``diagonal``) and ``<label>_rois_timeseries.tsv`` per
    run. A run's censored volumes (its censor file, or the volumes gpuconn
    denoise fitted with spike regressors: see
    :func:`gpuconn.maps.series.prepare_inputs`) are left out of both: the
    time series have a row per kept volume, and the sidecars record how
    many were left out (``censored_volumes``) and which were kept
    (``volumes_kept``, 0-based).

    Parameters
    ----------
    inputs : sequence of BoldInput
    regions : sequence of Region
    out_dir : path-like
    device : str or torch.device
    progress : bool
    params : dict, optional
        Recorded in the sidecars.

    Returns
    -------
    list of Path
    """
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    prepared, _ = prepare_inputs(inputs, regions, what="ROI")
    names = [region.name for region in regions]
    record = {**(params or {}), "rois": [region.describe() for region in regions], "device": str(torch_device)}
    written: list[Path] = []
    with progress_bar("ROI matrices", len(prepared), enabled=progress) as advance:
        for item, data in stream_inputs(prepared):
            r, z, series = roi_connectivity(as_data(data, torch_device), as_data(item.weights, torch_device), source=str(item.source.bold))
            label = item.source.label
            run_params = {**record, **item.source.entities, "bold": str(item.source.bold), "mask": str(item.source.mask),
                          **item.censor_record()}
            written.append(write_tsv(pd.DataFrame(to_numpy(series).T, columns=names), out_dir / f"{label}_rois_timeseries.tsv",
                                     params={**run_params, "volumes_kept": item.kept_volumes()}, sidecar=True))
            for stat, matrix in (("r", r), ("z", z)):
                written.append(write_tsv(_square(to_numpy(matrix), names), out_dir / f"{label}_stat-{stat}_roimatrix.tsv",
                                         params={**run_params, "stat": stat, "diagonal": DIAGONAL[stat]}, sidecar=True))
            advance()
    return written
