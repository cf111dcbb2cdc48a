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
from .seed import correlate_seeds
from .series import BoldInput, label_entities, prepare_inputs, stream_inputs

__all__ = ["ROI_COLUMNS", "roi_connectivity", "extract_roi_values", "compute_roi_matrices"]

#: Columns of the tidy table written by ``gpuconn roi extract``.
ROI_COLUMNS = ("subject", "session", "map", "roi", "value")


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
        Pearson r (diagonal 1 unless an ROI is constant) and Fisher z (the
        diagonal is ``arctanh`` of the clipped r, finite).
    timeseries : torch.Tensor, shape (..., n_rois, n_volumes)

    Notes
    -----
    The ROI time series are correlated with :func:`gpuconn.maps.seed.correlate_seeds`
    using identity weights, so the centring, constant handling and z clipping
    are those of the seed maps.
    """
    timeseries = region_means(data, weights)  # (..., R, T)
    eye = torch.eye(weights.shape[0], dtype=data.dtype, device=data.device)
    maps = correlate_seeds(timeseries.transpose(-1, -2), eye, source=source)
    return maps.r, maps.z, timeseries


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
    (square, first column ``roi``, with JSON sidecars) and
    ``<label>_rois_timeseries.tsv`` per run. A run's censored volumes (its
    censor file, :attr:`gpuconn.maps.series.BoldInput.censor`) are left out
    of both; the sidecars record how many (``censored_volumes``).

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
            written.append(write_tsv(pd.DataFrame(to_numpy(series).T, columns=names), out_dir / f"{label}_rois_timeseries.tsv"))
            for stat, matrix in (("r", r), ("z", z)):
                written.append(write_tsv(_square(to_numpy(matrix), names), out_dir / f"{label}_stat-{stat}_roimatrix.tsv",
                                         params={**run_params, "stat": stat}, sidecar=True))
            advance()
    return written
