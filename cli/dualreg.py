"""``gpuconn dualreg``: FSL-style dual regression of group maps on every subject."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gpuconn.maps.options import DualRegOptions

from .options import DaskScheduler, Device, Flag, MaxMemory, Quiet, Seed, Workers, stage_options

_DEFAULTS = DualRegOptions()


def dualreg(
    maps: Annotated[Path, typer.Argument(help="4D group maps, one volume per map (e.g. melodic_IC.nii.gz).")],
    subjects: Annotated[
        list[Path],
        typer.Argument(help="Subjects' 4D series on the maps' grid; outputs are numbered subject00000.. in this order."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")],
    mask: Annotated[
        Path | None,
        typer.Option("--mask", "-m", help="3D mask; default: voxels varying over time in every subject (as FSL)."),
    ] = None,
    des_norm: Annotated[
        bool,
        Flag("--des-norm/--no-des-norm", help="Normalise stage-2 regressors to unit std (FSL's des_norm=1)."),
    ] = _DEFAULTS.des_norm,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch", help="Subjects per device batch (default: from free memory); with Dask, per task (default 1)."),
    ] = _DEFAULTS.batch_size,
    design_path: Annotated[
        Path | None, typer.Option("-d", "--design", help="Stage 3: group design.mat (one row per subject).")
    ] = None,
    contrast_path: Annotated[Path | None, typer.Option("-t", "--contrasts", help="Stage 3: design.con.")] = None,
    one_sample: Annotated[
        bool, Flag("-1", "--one-sample", help="Stage 3: group-mean test instead of -d/-t.")
    ] = _DEFAULTS.one_sample,
    n_perm: Annotated[
        int,
        typer.Option("-n", "--n-perm", help="Stage 3 permutations: 0 none, 1 raw t maps, >1 randomise with TFCE."),
    ] = _DEFAULTS.n_perm,
    varcb: Annotated[
        bool, Flag("--out-varcb", help="Also write dr_stage2_subjectNNNNN_varcb.nii.gz (fsl_glm --out_varcb).")
    ] = _DEFAULTS.varcb,
    seed: Seed = _DEFAULTS.seed,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    scheduler: DaskScheduler = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Dual regression as FSL dual_regression: stage 1 time courses, stage 2 subject maps and Z maps.

    Writes dr_stage1_subjectNNNNN.txt, dr_stage2_subjectNNNNN.nii.gz, dr_stage2_subjectNNNNN_Z.nii.gz,
    dr_stage2_icNNNN.nii.gz (one volume per subject, ready for `gpuconn randomise`), mask.nii.gz and
    dualreg.json (parameters, subject numbering). Nothing is written unless every subject succeeds.
    With -n and -d/-t (or -1), randomise runs on every component as FSL's stage 3 (dr_stage3_icNNNN_*).
    With --workers/--dask-scheduler, stages 1-2 run as one Dask task per --batch subjects.
    """
    from gpuconn.core.backend import memory_cap
    from gpuconn.core.tasks import dask_client
    from gpuconn.maps.dualreg import dual_regression

    options = stage_options(DualRegOptions, locals())
    with memory_cap(max_memory):
        with dask_client(scheduler=scheduler, workers=workers) as client:  # None: one process
            result = dual_regression(
                maps, subjects, out_dir, options, mask_path=mask, design_path=design_path, contrast_path=contrast_path,
                device=device, progress=not quiet, client=client,
            )
    if not quiet:
        Console(stderr=True).print(
            f"dual regression: {len(result.stage1)} subjects x {len(result.components)} maps, "
            f"{result.n_voxels} voxels -> {result.out_dir}"
        )
