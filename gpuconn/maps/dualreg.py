"""Dual regression (FSL ``dual_regression``), subjects batched on the device.

For every subject, stage 1 regresses the data spatially on the group maps
and gives one time course per map; stage 2 regresses the data temporally on
those time courses and gives subject-specific maps (betas) and their Z
statistics. The formulas are FSL ``fsl_glm``'s (``melodic/fsl_glm.cc`` and
``basicGLM::olsfit`` in ``melodic/melhlprfns.cc``), called the way
``dual_regression`` calls it:

stage 1 (``fsl_glm -i data -d maps --demean -m mask``)
    design ``X`` = maps, ``(n_voxels, n_maps)``, each map demeaned over the
    mask; data ``Y`` = the subject's series transposed, ``(n_voxels,
    n_volumes)``, each volume demeaned over the mask; ``B = pinv(X) Y`` and
    the time courses are ``B.T``, ``(n_volumes, n_maps)``.
stage 2 (``fsl_glm -i data -d stage1.txt --demean --des_norm -m mask --out_z``)
    design ``X`` = the time courses, each demeaned over time and (``des_norm``)
    divided by its standard deviation (``N - 1`` denominator, as miscmaths
    ``stdev``); data ``Y`` = the series, each voxel demeaned over time;
    ``B = pinv(X) Y``; residual variance ``RSS / dof`` with
    ``dof = n_volumes - rank(X) - 1`` (``ols_dof`` less one for
    ``--demean``); ``t = B / sqrt(diag((X'X)^-1) sigma^2)`` and ``z`` has the
    same tail probability under N(0, 1) as ``t`` under Student's t with
    ``dof`` degrees of freedom.

Outputs carry FSL's names (``dr_stage1_subject00000.txt``,
``dr_stage2_subject00000.nii.gz``, ``dr_stage2_subject00000_Z.nii.gz``,
``dr_stage2_ic0000.nii.gz``, ``mask.nii.gz``), numbered in input order, so
scripts written for ``dual_regression`` keep working. Everything is written
to a staging folder and moved into place only when every subject succeeded.
With a Dask client, stages 1 and 2 run as one task per batch of subjects,
written by the workers into that staging folder.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..core.backend import DESIGN_DTYPE, as_data, chunk_size, resolve_device, run_chunked, to_numpy, uses_device
from ..core.errors import InputError, OptionError
from ..core.io import (
    load_image,
    load_mask,
    masked_data,
    provenance,
    save_image,
    unmask,
    write_json,
    write_text,
)
from ..core.progress import progress_bar
from ..core.tasks import map_tasks
from ..stats.design import load_design
from ..stats.randomise import randomise
from ..stats.spatial import spatial_transforms
from ..stats.zstat import t_to_z_tensor
from .series import check_subjects, common_mask, iter_series, matrix_text
from ..stats.options import PermutationOptions, TfceOptions
from .options import DualRegOptions

__all__ = [
    "spatial_regression",
    "temporal_regression",
    "temporal_regression_varcb",
    "DualRegressionResult",
    "dual_regression",
]

#: Smallest ratio of smallest to largest eigenvalue of a design's X'X accepted as full rank.
_RANK_TOL = 1e-10


# --------------------------------------------------------------------------- the two regressions


def _check_full_rank(gram: torch.Tensor, what: Sequence[str]) -> None:
    """Raise InputError naming ``what[i]`` when ``gram[i]`` (``X'X``, ``(K, K)``) is rank deficient."""
    evals = torch.linalg.eigvalsh(gram)  # ascending
    ratio = evals[..., 0] / evals[..., -1].clamp(min=torch.finfo(gram.dtype).tiny)
    bad = torch.nonzero(ratio.reshape(-1) < _RANK_TOL).reshape(-1).tolist()
    if bad:
        raise InputError(what[bad[0]])


def _spatial_design(maps: torch.Tensor, maps_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's design ``X`` (maps demeaned over voxels, ``(K, V)`` float64) and ``X X'``; checks its rank."""
    x = maps.to(DESIGN_DTYPE)
    x = x - x.mean(dim=1, keepdim=True)  # (K, V)
    gram = x @ x.T
    _check_full_rank(
        gram,
        [f"{maps_name}: the {maps.shape[0]} maps are linearly dependent (collinear) within the mask; "
         "drop the duplicated or combined maps"],
    )
    return x, gram


def spatial_regression(
    data: torch.Tensor,
    maps: torch.Tensor,
    *,
    maps_name: str = "group maps",
) -> torch.Tensor:
    """Stage 1: regress each volume on the group maps (``fsl_glm --demean``, spatial design).

    Parameters
    ----------
    data : torch.Tensor, shape (n_subjects, n_volumes, n_voxels)
        Subjects' masked series (float32 is fine; products accumulate in
        ``data``'s dtype, the ``(K, K)`` solve is float64).
    maps : torch.Tensor, shape (n_maps, n_voxels)
        Group maps on the same voxels and device.
    maps_name : str
        Named in the error when the maps are collinear.

    Returns
    -------
    torch.Tensor, shape (n_subjects, n_volumes, n_maps), float64
        Time courses ``pinv(X) Y`` transposed, with ``X`` = maps demeaned over
        voxels and ``Y`` = each volume demeaned over voxels.

    Raises
    ------
    InputError
        If the maps are linearly dependent within the mask.
    """
    x, gram = _spatial_design(maps, maps_name)
    y = data - data.mean(dim=2, keepdim=True)  # each volume demeaned over voxels
    xty = (y @ x.T.to(data.dtype)).to(DESIGN_DTYPE)  # (S, T, K) = Y' X
    return torch.linalg.solve(gram, xty.transpose(1, 2)).transpose(1, 2)


def temporal_regression(
    data: torch.Tensor,
    timecourses: torch.Tensor,
    *,
    des_norm: bool = True,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 betas and Z maps: :func:`temporal_regression_varcb` without the variances."""
    return temporal_regression_varcb(data, timecourses, des_norm=des_norm, names=names)[:2]


def temporal_regression_varcb(
    data: torch.Tensor,
    timecourses: torch.Tensor,
    *,
    des_norm: bool = True,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2: regress each voxel's series on the time courses (``fsl_glm --demean [--des_norm]``).

    Parameters
    ----------
    data : torch.Tensor, shape (n_subjects, n_volumes, n_voxels)
        Subjects' masked series.
    timecourses : torch.Tensor, shape (n_subjects, n_volumes, n_maps)
        Stage-1 time courses (any float dtype; used in float64).
    des_norm : bool, default True
        Scale each demeaned time course to unit standard deviation (``N - 1``
        denominator, as FSL's ``stdev``) before the fit; changes the betas,
        not the Z maps.
    names : sequence of str, optional
        One name per subject (its file), used in the rank error.

    Returns
    -------
    beta : torch.Tensor, shape (n_subjects, n_maps, n_voxels), ``data``'s dtype
    z : torch.Tensor, shape (n_subjects, n_maps, n_voxels), ``data``'s dtype
        Z statistics of each beta, from t with ``n_volumes - n_maps - 1``
        degrees of freedom (see :func:`gpuconn.stats.zstat.t_to_z_tensor`). Voxels without residual
        variance get ``z = 0``.
    varcb : torch.Tensor, shape (n_subjects, n_maps, n_voxels), ``data``'s dtype
        Variance of each beta, ``(X'X)^-1_kk RSS / dof`` (``fsl_glm --out_varcb``).

    Raises
    ------
    InputError
        If a subject's time courses are collinear (or one is constant), or
        there are too few volumes for a residual degree of freedom.
    """
    n_subjects, n_volumes, _ = data.shape
    n_maps = timecourses.shape[2]
    dof = n_volumes - n_maps - 1
    names = list(names) if names is not None else [f"subject {i}" for i in range(n_subjects)]
    if dof < 1:
        raise InputError(
            f"{names[0]}: {n_volumes} volumes leave no residual degree of freedom for {n_maps} maps "
            f"(needs at least {n_maps + 2}); use fewer maps or longer series"
        )
    x = timecourses.to(DESIGN_DTYPE)
    x = x - x.mean(dim=1, keepdim=True)
    if des_norm:
        x = x / x.std(dim=1, keepdim=True).clamp(min=torch.finfo(DESIGN_DTYPE).tiny)
    gram = x.transpose(1, 2) @ x  # (S, K, K)
    _check_full_rank(
        gram,
        [f"{name}: its stage-1 time courses are collinear (rank-deficient design for stage 2); "
         "the group maps may overlap too much for this subject, or the subject's data are "
         "degenerate; check the file or remove near-duplicate maps" for name in names],
    )
    gram_inv = torch.linalg.inv(gram)
    pinv = (gram_inv @ x.transpose(1, 2)).to(data.dtype)  # (S, K, T)
    y = data - data.mean(dim=1, keepdim=True)
    beta = pinv @ y  # (S, K, V)
    resid = y - x.to(data.dtype) @ beta
    sigma2 = (resid * resid).sum(dim=1, keepdim=True) / dof  # (S, 1, V)
    del resid
    var_beta = torch.diagonal(gram_inv, dim1=1, dim2=2).to(data.dtype).unsqueeze(2) * sigma2
    t = torch.where(var_beta > 0, beta / var_beta.clamp(min=torch.finfo(data.dtype).tiny).sqrt(), 0.0)
    return beta, t_to_z_tensor(t, dof), var_beta


# --------------------------------------------------------------------------- files


def _subject_name(index: int) -> str:
    return f"subject{index:05d}"


def _batches(n_volumes: Sequence[int], batch_size: int) -> Iterator[range]:
    """Consecutive subject ranges of at most ``batch_size`` with equal ``n_volumes``."""
    start = 0
    while start < len(n_volumes):
        stop = start + 1
        while stop < len(n_volumes) and stop - start < batch_size and n_volumes[stop] == n_volumes[start]:
            stop += 1
        yield range(start, stop)
        start = stop


@dataclass
class DualRegressionResult:
    """Where :func:`dual_regression` wrote its outputs.

    Attributes
    ----------
    out_dir : Path
    mask : Path
        ``mask.nii.gz``: the voxels analysed.
    stage1 : list of Path
        ``dr_stage1_subjectNNNNN.txt``, ``(n_volumes, n_maps)`` each.
    stage2, stage2_z : list of Path
        ``dr_stage2_subjectNNNNN.nii.gz`` and ``..._Z.nii.gz``, ``n_maps`` volumes each.
    components : list of Path
        ``dr_stage2_icNNNN.nii.gz``: one 4D file per map, one volume per subject.
    n_voxels : int
    """

    out_dir: Path
    mask: Path
    stage1: list[Path] = field(default_factory=list)
    stage2: list[Path] = field(default_factory=list)
    stage2_z: list[Path] = field(default_factory=list)
    components: list[Path] = field(default_factory=list)
    n_voxels: int = 0


def _default_batch(n_volumes: int, n_voxels: int, n_maps: int, device: torch.device, n_subjects: int) -> int:
    # data, demeaned copy, residual (float32) + beta/t/z and float64 t->z temporaries per map
    per_subject = 4 * 3 * n_volumes * n_voxels + 8 * 10 * n_maps * n_voxels
    return chunk_size(per_subject, device, n_items=n_subjects, maximum=32 if device.type == "cuda" else 4)


@uses_device
def dual_regression(
    maps_path: str | os.PathLike,
    subject_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    options: DualRegOptions | None = None,
    *,
    mask_path: str | os.PathLike | None = None,
    design_path: str | os.PathLike | None = None,
    contrast_path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    client=None,
) -> DualRegressionResult:
    """Run FSL-style dual regression of group maps on every subject's series.

    All inputs are checked (headers of every subject, grids, volume counts)
    before any computation; outputs are staged in a hidden folder inside
    ``out_dir`` and moved into place only once every subject succeeded, so a
    failure (e.g. collinear time courses in subject 57) leaves no partial
    output.

    Parameters
    ----------
    maps_path : path-like
        4D group maps (e.g. ``melodic_IC.nii.gz``), one volume per map.
    subject_paths : sequence of path-like
        4D subject series on the maps' grid; output numbering follows this order.
    out_dir : path-like
        Output folder (created).
    options : DualRegOptions, optional
        Stage-2 ``des_norm``, ``varcb`` (also write
        ``dr_stage2_subjectNNNNN_varcb.nii.gz``, also on Dask), the device
        ``batch_size`` (with ``client``: subjects per Dask task, default 1,
        each task one device batch) and stage 3 (``n_perm``, ``seed``,
        ``one_sample``); default ``DualRegOptions()``: FSL's stages 1 and 2.
    mask_path : path-like, optional
        3D mask on the same grid; default: voxels varying over time in every
        subject (:func:`~gpuconn.maps.series.common_mask`, one extra read of every subject).
    design_path, contrast_path : path-like, optional
        Group design (``design.mat``, one row per subject in input order)
        and contrasts (``design.con``) for stage 3, as dual_regression's
        ``<design.mat> <design.con>``; stage 3 runs when ``options.n_perm``
        is above 0: with 1 it writes raw t maps only (``randomise -n 1``),
        with more it runs :func:`gpuconn.stats.randomise.randomise` with
        TFCE (``-T``) on every ``dr_stage2_icNNNN`` into
        ``dr_stage3_icNNNN_*``.
    device : str or torch.device, default 'auto'
    progress : bool, default False
    client : distributed.Client, optional
        Run stages 1 and 2 as Dask tasks (:func:`gpuconn.core.tasks.map_tasks`),
        each fitting its subjects on its worker (``device`` resolved there)
        and writing their files into the staging folder, which every worker
        must reach; this process then writes the ``dr_stage2_icNNNN`` files
        from the staged subject maps, and the mask, sidecar and stage 3 as
        without Dask. Every input (and the maps' rank) is checked before any
        task is submitted. The outputs are the same as in one process with
        the same device batches; on the CPU, bit for bit when the BLAS sums in
        the same order (workers run one thread).

    Returns
    -------
    DualRegressionResult

    Raises
    ------
    InputError
        Bad files, grid mismatches, too few volumes, collinear maps or a
        subject with collinear time courses (named).
    OptionError
        A stage-3 design without ``n_perm``, or ``n_perm`` without one
        design (files, or ``one_sample``).

    See Also
    --------
    spatial_regression, temporal_regression : the two stages on tensors.
    """
    options = options or DualRegOptions()
    des_norm, varcb, batch_size = options.des_norm, options.varcb, options.batch_size
    worker_device = str(device)
    device = resolve_device(device)
    maps_path, out_dir = Path(maps_path), Path(out_dir)
    paths = [Path(p) for p in subject_paths]
    maps_img = load_image(maps_path, what="group maps")
    if maps_img.ndim not in (3, 4):
        raise InputError(f"group maps {maps_path} has shape {maps_img.shape}; expected 4D maps (x, y, z, map)")
    n_maps = 1 if maps_img.ndim == 3 else maps_img.shape[3]
    n_volumes = check_subjects(
        paths, maps_img, maps_path, min_volumes=n_maps + 2,
        purpose=f"dual regression on {n_maps} maps (stage 2 needs n_maps + 2 for a residual degree of freedom)",
    )
    if mask_path is not None:
        mask, _ = load_mask(mask_path, reference=maps_img, reference_path=maps_path)
    else:
        mask = common_mask(paths, progress=progress)
    maps = masked_data(maps_img, mask, path=maps_path)  # (K, V)
    _spatial_design(torch.from_numpy(maps), f"group maps {maps_path}")  # collinear maps: before any work
    n_voxels = int(mask.sum())
    if client is not None:
        batch = batch_size or 1
    else:
        batch = batch_size or _default_batch(max(n_volumes), n_voxels, n_maps, device, len(paths))
    _check_stage3(design_path, contrast_path, options, len(paths))

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dualreg-", dir=out_dir))
    result = DualRegressionResult(out_dir=out_dir, mask=out_dir / "mask.nii.gz", n_voxels=n_voxels)
    try:
        save_image(mask.astype(np.uint8), maps_img, staging / "mask.nii.gz", sidecar=False, dtype=np.uint8)
        stack = np.lib.format.open_memmap(
            staging / "ic_stack.npy", mode="w+", dtype=np.float32, shape=(n_maps, len(paths), n_voxels)
        )
        if client is None:
            with progress_bar("dual regression", len(paths), enabled=progress) as advance:
                _fit_subjects(maps_img, maps, mask, range(len(paths)), paths, n_volumes, staging, des_norm=des_norm,
                              device=device, batch=batch, advance=advance, stack=stack, varcb=varcb)
        else:
            _fit_on_dask(client, maps_path, paths, n_volumes, staging, des_norm=des_norm, device=worker_device,
                         batch=batch, progress=progress, varcb=varcb)
            staged = [staging / f"dr_stage2_{_subject_name(i)}.nii.gz" for i in range(len(paths))]
            for index, betas in enumerate(iter_series(staged, mask, n_ahead=2)):  # (K, V) each
                stack[:, index, :] = betas
        with ThreadPoolExecutor(max_workers=2) as writers:
            for future in [
                writers.submit(_write_component, staging, k, np.asarray(stack[k]), mask, maps_img)
                for k in range(n_maps)
            ]:
                future.result()
        del stack
        (staging / "ic_stack.npy").unlink()
        params = {
            "maps": maps_path, "mask": mask_path or "common mask (non-zero temporal std in every subject)",
            **asdict(options), "device": str(device) if client is None else f"dask ({worker_device})",
            "n_voxels": n_voxels,
            "stage2_dof": {_subject_name(i): n - n_maps - 1 for i, n in enumerate(n_volumes)},
            "subjects": {_subject_name(i): p for i, p in enumerate(paths)},
        }
        write_json(staging / "dualreg.json", provenance(params))
        for item in sorted(staging.iterdir()):
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if options.n_perm > 0:
        _stage3(out_dir, n_maps, design_path, contrast_path, options, device, progress)
    result.stage1 = [out_dir / f"dr_stage1_{_subject_name(i)}.txt" for i in range(len(paths))]
    result.stage2 = [out_dir / f"dr_stage2_{_subject_name(i)}.nii.gz" for i in range(len(paths))]
    result.stage2_z = [out_dir / f"dr_stage2_{_subject_name(i)}_Z.nii.gz" for i in range(len(paths))]
    result.components = [out_dir / f"dr_stage2_ic{k:04d}.nii.gz" for k in range(n_maps)]
    return result


def _fit_subjects(
    maps_img: nib.Nifti1Image,
    maps: np.ndarray,
    mask: np.ndarray,
    indices: Sequence[int],
    paths: Sequence[Path],
    n_volumes: Sequence[int],
    staging: Path,
    *,
    des_norm: bool,
    device: torch.device,
    batch: int,
    advance,
    stack: np.ndarray | None = None,
    varcb: bool = False,
) -> None:
    """Stages 1 and 2 of subjects ``indices`` (their ``paths`` and ``n_volumes``) in device batches of ``batch``.

    Writes each subject's files into ``staging`` under its number in
    ``indices`` and, when ``stack`` (``(n_maps, n_subjects, n_voxels)``) is
    given, its betas into ``stack[:, index]``. ``maps`` is ``(n_maps,
    n_voxels)`` on ``mask``; ``advance(n)`` counts fitted subjects.
    """
    maps_t = as_data(maps, device)
    loaded = iter_series(paths, mask, n_ahead=batch + 1)
    # gzip NIfTI encoding releases the GIL: two writer threads overlap it with reading and the fits
    with ThreadPoolExecutor(max_workers=2) as writers:
        pending = []
        for positions in _batches(n_volumes, batch):
            group = [indices[i] for i in positions]
            names = [f"subject series {paths[i]}" for i in positions]
            host = np.stack([next(loaded) for _ in positions])

            def fit(start: int, stop: int, host=host, names=names):
                data = as_data(host[start:stop], device)
                timecourses = spatial_regression(data, maps_t, maps_name=f"group maps {maps_img.get_filename()}")
                beta, z, var = temporal_regression_varcb(data, timecourses, des_norm=des_norm, names=names[start:stop])
                return to_numpy(timecourses), to_numpy(beta), to_numpy(z), to_numpy(var) if varcb else None

            for start, stop, (timecourses, beta, z, var) in run_chunked(fit, len(group), len(group)):
                for j, index in enumerate(group[start:stop]):
                    pending.append(writers.submit(
                        _write_subject, staging, index, timecourses[j], beta[j], z[j], mask, maps_img,
                        None if var is None else var[j],
                    ))
                    if stack is not None:
                        stack[:, index, :] = beta[j]
                advance(stop - start)
            while len(pending) > 2 * batch:  # bound the results waiting to be written
                pending.pop(0).result()
        for future in pending:
            future.result()


@uses_device
def _fit_task(subjects: Sequence[tuple[int, Path, int]], *, maps_path: Path, staging: Path, des_norm: bool,
              device: str, varcb: bool) -> None:
    """One Dask task: stages 1 and 2 of ``subjects`` (number, file, volumes) as one device batch."""
    maps_img = load_image(maps_path, what="group maps")
    mask = np.asarray(load_image(staging / "mask.nii.gz", ndim=3, what="mask").dataobj) > 0
    indices, paths, n_volumes = zip(*subjects)
    _fit_subjects(maps_img, masked_data(maps_img, mask, path=maps_path), mask, indices, paths, n_volumes, staging,
                  des_norm=des_norm, device=resolve_device(device), batch=len(subjects), advance=lambda n: None,
                  varcb=varcb)


def _fit_on_dask(client, maps_path: Path, paths: Sequence[Path], n_volumes: Sequence[int], staging: Path, *,
                 des_norm: bool, device: str, batch: int, progress: bool, varcb: bool) -> None:
    """Stages 1 and 2 as one Dask task per device batch (the batches of one process with this ``batch``)."""

    tasks = [[(i, paths[i], n_volumes[i]) for i in group] for group in _batches(n_volumes, batch)]
    task = functools.partial(_fit_task, maps_path=maps_path, staging=staging, des_norm=des_norm, device=device,
                             varcb=varcb)
    map_tasks(client, task, tasks, description="dual regression", progress=progress)


def _check_stage3(design_path, contrast_path, options: DualRegOptions, n_subjects: int) -> None:
    """Validate stage 3's design before any work (design rows = subjects)."""
    has_design = design_path is not None or contrast_path is not None
    if options.n_perm == 0:
        if has_design or options.one_sample:
            raise OptionError("a design ({design_path}/{contrast_path} or {one_sample}) was given but {n_perm} is 0; "
                              "give {n_perm} N to run randomise on each map")
        return
    if options.one_sample == has_design:
        raise OptionError("stage 3 needs either {design_path} design.mat {contrast_path} design.con or {one_sample} "
                          "(group mean), not both or neither")
    if has_design:
        if design_path is None or contrast_path is None:
            raise OptionError("give both {design_path} design.mat and {contrast_path} design.con")

        load_design(design_path, contrast_path, n_obs=n_subjects, data_source="dr_stage2_icNNNN (one volume per subject)")


def _stage3(out_dir: Path, n_maps: int, design_path, contrast_path, options: DualRegOptions, device: torch.device,
            progress: bool) -> None:
    """Run randomise on every ``dr_stage2_icNNNN`` (as dual_regression's last step)."""

    n_perm = options.n_perm
    spatial = spatial_transforms(tfce=TfceOptions()) if n_perm > 1 else None
    for k in range(n_maps):
        randomise(
            out_dir / f"dr_stage2_ic{k:04d}.nii.gz", out_dir / f"dr_stage3_ic{k:04d}",
            design_path=design_path, contrast_path=contrast_path, mask_path=out_dir / "mask.nii.gz",
            one_sample=options.one_sample, permutation=PermutationOptions(n_perm=n_perm, seed=options.seed),
            device=str(device), spatial=spatial,
            voxelwise=n_perm == 1, write_raw=("tfce",) if spatial else (), progress=progress,
            params={"dual_regression_stage": 3},
        )


def _write_component(folder: Path, k: int, betas: np.ndarray, mask: np.ndarray, reference) -> None:
    """Write ``dr_stage2_icNNNN`` from ``(n_subjects, n_voxels)`` betas."""
    save_image(unmask(betas, mask), reference, folder / f"dr_stage2_ic{k:04d}.nii.gz", sidecar=False)


def _write_subject(
    folder: Path,
    index: int,
    timecourses: np.ndarray,
    beta: np.ndarray,
    z: np.ndarray,
    mask: np.ndarray,
    reference: nib.Nifti1Image,
    varcb: np.ndarray | None = None,
) -> None:
    """Write one subject's stage-1 text file and stage-2 beta and Z (and varcb) images into ``folder``."""
    name = _subject_name(index)
    write_text(folder / f"dr_stage1_{name}.txt", matrix_text(timecourses))
    save_image(unmask(beta, mask), reference, folder / f"dr_stage2_{name}.nii.gz", sidecar=False)
    save_image(unmask(z, mask), reference, folder / f"dr_stage2_{name}_Z.nii.gz", sidecar=False)
    if varcb is not None:
        save_image(unmask(varcb, mask), reference, folder / f"dr_stage2_{name}_varcb.nii.gz", sidecar=False)
