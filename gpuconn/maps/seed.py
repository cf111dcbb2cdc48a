"""Seed-to-voxel connectivity maps.

:func:`correlate_seeds` turns the mean seed time series into Pearson r,
Fisher z and regression beta maps for every voxel in a mask, as one batched
matrix product ``(n_seeds, n_volumes) @ (n_volumes, n_voxels)`` on the
device. :func:`compute_seed_maps` streams subjects from disk through it and
writes one 4D file per subject (a volume per seed) or per seed (a volume per
subject, ready for ``gpuconn randomise``). The seeds themselves are
:class:`gpuconn.maps.regions.Region`; the runs come from
:mod:`gpuconn.maps.series`.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..core.backend import as_data, resolve_device, to_numpy, uses_device
from ..core.errors import InputError, OptionError
from ..core.io import save_image, unmask, write_tsv
from ..core.progress import progress_bar
from ..core.tasks import map_tasks
from .regions import Region, region_means
from .series import BoldInput, PreparedInput, prepare_inputs, stream_inputs

__all__ = [
    "SeedMaps",
    "LAYOUTS",
    "STATS",
    "FISHER_CLIP",
    "correlate_seeds",
    "fisher_z",
    "compute_seed_maps",
]

#: ``--layout`` values.
LAYOUTS = ("subject", "seed")
#: Statistics a seed map can hold.
STATS = ("r", "z", "beta")
#: Fisher z is computed as ``arctanh(clip(r, -FISHER_CLIP, FISHER_CLIP))`` in float64 (|z| <= 8.4).
FISHER_CLIP = 1.0 - 1e-7


class SeedMaps(NamedTuple):
    """Seed-to-voxel maps; leading batch dimensions of the data are kept.

    Attributes
    ----------
    r, z, beta : torch.Tensor, shape (..., n_seeds, n_voxels)
        Pearson r, Fisher z, and the slope of voxel on seed (float32).
    timeseries : torch.Tensor, shape (..., n_seeds, n_volumes)
        Mean seed time series (not centred).
    """

    r: torch.Tensor
    z: torch.Tensor
    beta: torch.Tensor
    timeseries: torch.Tensor


# --------------------------------------------------------------------------- seed maps


def fisher_z(r: torch.Tensor) -> torch.Tensor:
    """``arctanh(r)`` computed in float64 after clipping ``|r|`` to :data:`FISHER_CLIP`; same dtype as ``r``."""
    return torch.atanh(r.to(torch.float64).clamp(-FISHER_CLIP, FISHER_CLIP)).to(r.dtype)


class _Columns(NamedTuple):
    mean: torch.Tensor  # (..., 1, n)
    centred: torch.Tensor  # (..., T, n)
    norm: torch.Tensor  # (..., 1, n)
    inverse: torch.Tensor  # (..., 1, n): 1 / norm, or 0 for constant columns
    constant: torch.Tensor  # (..., 1, n) bool


def _centre(x: torch.Tensor) -> _Columns:
    """Centre columns over volumes; their norms and inverse norms.

    A column is constant when its centred values are within a few float32
    rounding steps of its mean (``norm <= 4 sqrt(n_volumes) eps |mean|``);
    its inverse norm is 0. The mean is a float32 cascade sum: an error
    ``d`` in it shifts a centred column by a constant, which changes r by
    ``d * sum(centred seed) ~ 0``, so float64 would buy nothing here.
    """
    mean = x.mean(dim=-2, keepdim=True)
    centred = x - mean
    norm = torch.linalg.vector_norm(centred, dim=-2, keepdim=True)
    constant = norm <= 4 * math.sqrt(x.shape[-2]) * torch.finfo(x.dtype).eps * mean.abs()
    inverse = torch.where(constant, torch.zeros_like(norm), 1.0 / torch.where(constant, torch.ones_like(norm), norm))
    return _Columns(mean, centred, norm, inverse, constant)


def correlate_seeds(data: torch.Tensor, weights: torch.Tensor, *, source: str = "data",
                    names: tuple[str, str | None] = ("voxel", "seed")) -> SeedMaps:
    """Pearson correlation of mean seed time series with every voxel, batched.

    Parameters
    ----------
    data : torch.Tensor, shape (..., n_volumes, n_voxels)
        Time series inside the mask (float32); leading dimensions (subjects)
        are batched.
    weights : torch.Tensor, shape (n_seeds, n_voxels)
        Seed averaging weights (:func:`gpuconn.maps.regions.region_weights`), same device.
    source : str
        Named in warnings (a file or subject label).
    names : (str, str or None), default ('voxel', 'seed')
        What the data's columns and the seeds are, as the constant-series
        warnings name them; None for the seeds when they are the columns
        themselves (ROI-to-ROI matrices), so that a constant one is
        reported once.

    Returns
    -------
    SeedMaps
        ``r`` clipped to [-1, 1]; ``z = arctanh(r)`` (:func:`fisher_z`);
        ``beta = r * |x_c| / |s_c|``, the least-squares slope of voxel on seed
        (with intercept). Constant voxels and constant seeds get r = z =
        beta = 0 with a warning, never NaN.

    Notes
    -----
    Centring and normalisation happen once per voxel and seed; all maps come
    from one product ``(n_seeds, n_volumes) @ (n_volumes, n_voxels)`` per
    subject. Same values as ``numpy.corrcoef`` of the seed mean with each voxel.

    See Also
    --------
    nilearn.maskers.NiftiSpheresMasker, numpy.corrcoef : the references in the tests.
    """
    if data.shape[-2] < 3:
        raise InputError(f"{source} has {data.shape[-2]} volume(s); seed correlation needs at least 3")
    voxels = _centre(data)
    # Seed means of the centred data keep float32 sums away from the large baseline.
    seed_centred = region_means(voxels.centred, weights)  # (..., S, T)
    timeseries = seed_centred + region_means(voxels.mean, weights)
    seeds = _centre(seed_centred.transpose(-1, -2))  # (..., T, S)
    columns, seed_name = names
    if bool(voxels.constant.any()):
        count = int(voxels.constant.sum())
        warnings.warn(
            f"{source}: {count} {columns}(s) have a constant time series; their r, z and beta are set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    if seed_name is not None and bool(seeds.constant.any()):
        warnings.warn(
            f"{source}: {int(seeds.constant.sum())} {seed_name} time series are constant; their maps are set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    # Scale the small factors, not the (n_volumes, n_voxels) data: one pass less over it.
    seed_unit = (seeds.centred * seeds.inverse).transpose(-1, -2)  # (..., S, T)
    r = (torch.matmul(seed_unit, voxels.centred) * voxels.inverse).clamp_(-1.0, 1.0)  # (..., S, V)
    beta = r * voxels.norm * seeds.inverse.transpose(-1, -2)
    return SeedMaps(r=r, z=fisher_z(r), beta=beta, timeseries=timeseries)


def _volume_label(item: PreparedInput, map_name: str) -> dict:
    return {**item.source.entities, "label": item.source.label, "map": map_name, **item.censor_record()}


@uses_device
def compute_seed_maps(
    inputs: Sequence[BoldInput],
    regions: Sequence[Region],
    out_dir: str | os.PathLike,
    *,
    layout: str = "subject",
    stats: Sequence[str] = ("r", "z"),
    device: str | torch.device = "auto",
    progress: bool = False,
    params: dict | None = None,
    client=None,
) -> list[Path]:
    """Seed-to-voxel maps for every run and seed, written as 4D NIfTI with JSON sidecars.

    Parameters
    ----------
    inputs : sequence of BoldInput
        Runs (4D BOLD on one grid) and their brain masks.
    regions : sequence of Region
        The seeds.
    out_dir : path-like
    layout : {'subject', 'seed'}
        ``subject``: ``<label>_stat-<stat>_seedmap.nii.gz`` per run, a volume
        per seed. ``seed``: ``seed-<name>_stat-<stat>_seedmap.nii.gz`` per seed,
        a volume per run in input order (the sidecar lists them), ready for
        ``gpuconn randomise``; holds ``n_runs * n_seeds * n_voxels`` float32
        per statistic in host memory until written.
    stats : sequence of {'r', 'z', 'beta'}
    device : str or torch.device
    progress : bool
        Show a Rich progress bar.
    params : dict, optional
        Extra parameters recorded in sidecars (e.g. the command line).
    client : distributed.Client, optional
        One Dask task per run (:func:`gpuconn.core.tasks.map_tasks`), each
        computing and writing that run's files on its worker (``device``
        resolved there), after every input was checked here; ``layout='seed'``
        stacks every run in one process and is refused.

    Returns
    -------
    list of Path
        The NIfTI outputs, plus ``<label>_seeds_timeseries.tsv`` per run
        (a row per volume kept).

    Raises
    ------
    OptionError
        An unknown ``layout``, or ``layout='seed'`` with ``client``.

    Notes
    -----
    All headers, masks and seeds are checked before anything is written.
    Subjects are computed one at a time while the next ones are read on
    threads (:func:`gpuconn.maps.series.stream_inputs`, bounded by host
    memory). In the subject layout each
    run's files are written as soon as it is done; a data error found on
    reading (NaN inside the mask) stops the run after the runs before it.
    Voxels outside a run's mask are 0. A run with a censor file
    (afni_proc.py's, :attr:`gpuconn.maps.series.BoldInput.censor`), or a
    gpuconn denoise output with spike-censored volumes (listed in its
    sidecar), is correlated over its kept volumes only; its sidecars name
    the source and the number of ``censored_volumes``.
    """
    if layout not in LAYOUTS:
        raise OptionError(f"{{layout}} {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "seed" and client is not None:
        raise OptionError("{layout} seed stacks every run into one file per seed in one process, not in Dask tasks; "
                          "use {layout} subject, or run in one process")
    bad = [s for s in stats if s not in STATS]
    if bad or not stats:
        raise InputError(f"statistics {bad or '(none)'} not available; choose from {', '.join(STATS)}")
    stats = list(dict.fromkeys(stats))
    out_dir = Path(out_dir)
    if client is not None:
        return _seed_maps_on_dask(client, inputs, regions, out_dir, stats=stats, device=str(device),
                                  progress=progress, params=params)
    torch_device = resolve_device(device)
    prepared, reference = prepare_inputs(inputs, regions, what="seed")
    names = [region.name for region in regions]
    record = {**(params or {}), "seeds": [region.describe() for region in regions], "layout": layout, "device": str(torch_device)}
    stacks: dict[str, np.ndarray] = {}
    if layout == "seed":  # every run's maps, on the union of the run masks, until written per seed
        union = np.any([p.mask for p in prepared], axis=0)
        stacks = {stat: np.zeros((len(prepared), len(regions), int(union.sum())), dtype=np.float32) for stat in stats}
    written: list[Path] = []
    with progress_bar("seed maps", len(prepared), enabled=progress) as advance:
        for index, (item, data) in enumerate(stream_inputs(prepared)):
            maps = correlate_seeds(as_data(data, torch_device), as_data(item.weights, torch_device), source=str(item.source.bold))
            series = pd.DataFrame(to_numpy(maps.timeseries).T, columns=names)
            written.append(write_tsv(series, out_dir / f"{item.source.label}_seeds_timeseries.tsv"))
            for stat in stats:
                values = to_numpy(getattr(maps, stat))  # (S, V_run)
                if layout == "seed":
                    stacks[stat][index] = unmask(values, item.mask)[union].T
                    continue
                path = out_dir / f"{item.source.label}_stat-{stat}_seedmap.nii.gz"
                volumes = [_volume_label(item, f"seed-{name}_stat-{stat}") for name in names]
                written.append(
                    save_image(unmask(values, item.mask).astype(np.float32, copy=False), reference, path,
                               params={**record, "stat": stat, "bold": str(item.source.bold),
                                       "mask": str(item.source.mask), **item.censor_record(), "volumes": volumes})
                )
            advance()
    for stat, stack in stacks.items():
        for seed_index, name in enumerate(names):
            path = out_dir / f"seed-{name}_stat-{stat}_seedmap.nii.gz"
            volumes = [_volume_label(p, f"seed-{name}_stat-{stat}") for p in prepared]
            written.append(
                save_image(unmask(stack[:, seed_index], union), reference, path,
                           params={**record, "stat": stat, "seed": regions[seed_index].describe(),
                                   "bolds": [str(p.source.bold) for p in prepared], "volumes": volumes})
            )
    return written


def _seed_run(item: BoldInput, regions: Sequence[Region], out_dir: Path, stats: list[str], device: str,
              params: dict | None) -> list[Path]:
    """One Dask task: one run's seed maps, written on the worker."""
    return compute_seed_maps([item], regions, out_dir, layout="subject", stats=stats, device=device, params=params)


def _seed_maps_on_dask(client, inputs: Sequence[BoldInput], regions: Sequence[Region], out_dir: Path, *,
                       stats: list[str], device: str, progress: bool, params: dict | None) -> list[Path]:
    prepare_inputs(inputs, regions, what="seed")  # every input checked before any task writes
    task = functools.partial(_seed_run, regions=list(regions), out_dir=out_dir, stats=stats, device=device,
                             params=params)
    return [path for paths in map_tasks(client, task, list(inputs), description="seed maps", progress=progress)
            for path in paths]
