"""``gpuconn seed``: seed-to-voxel connectivity maps (r, Fisher z, beta)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import DaskScheduler, Derivatives, Device, Participants, Quiet, Space, Workers

BoldFiles = Annotated[list[Path], typer.Option("--bold", help="4D BOLD file (repeatable); needs --mask.")]
Mask = Annotated[
    Path | None, typer.Option("--mask", help="Brain mask on the BOLD grid (overrides each run's own mask with --derivatives).")
]
BoldDesc = Annotated[
    str, typer.Option("--bold-desc", help="desc- entity of the BOLD files under --derivatives (e.g. preproc, denoised).")
]
Radius = Annotated[list[float], typer.Option("--radius", help="Sphere radius in mm: once for all, or once per coordinate.")]
Name = Annotated[list[str], typer.Option("--name", help="Name per coordinate (letters and digits).")]
Mirror = Annotated[bool, typer.Option("--mirror", help="Also use each coordinate sphere mirrored to (-x, y, z) as a separate region.")]
Bilateral = Annotated[bool, typer.Option("--bilateral", help="Make each coordinate sphere the union with its mirror (one bilateral region).")]


def mirror_mode(mirror: bool, bilateral: bool) -> str:
    """Turn the --mirror / --bilateral flags into a :data:`gpuconn.seed.MIRROR_CHOICES` value."""
    from gpuconn.errors import InputError

    if mirror and bilateral:
        raise InputError("--mirror (separate mirrored region) and --bilateral (union with the mirror) exclude each other")
    return "add" if mirror else "union" if bilateral else "none"


def seed(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    bold: BoldFiles = [],
    mask: Mask = None,
    derivatives: Derivatives = None,
    participant_label: Participants = [],
    bold_desc: BoldDesc = "preproc",
    space: Space = "MNI152NLin2009cAsym",
    seed_coord: Annotated[list[str], typer.Option("--seed-coord", help="Seed centre x,y,z in MNI mm (repeatable), e.g. -18,-38,72.")] = [],
    radius: Radius = [],
    name: Name = [],
    mirror: Mirror = False,
    bilateral: Bilateral = False,
    seed_table: Annotated[Path | None, typer.Option("--seed-table", help="TSV: name, x, y, z, radius[, mirror] or name, image[, label].")] = None,
    seed_mask: Annotated[list[Path], typer.Option("--seed-mask", help="Seed from a mask image (voxels > 0; repeatable).")] = [],
    seed_label: Annotated[list[str], typer.Option("--seed-label", help="Seed from an atlas label, ATLAS:LABEL (repeatable).")] = [],
    layout: Annotated[str, typer.Option("--layout", help="subject: a 4D file per run (a volume per seed); seed: a 4D file per seed (a volume per run, for randomise).")] = "subject",
    beta: Annotated[bool, typer.Option("--beta", help="Also write regression beta maps (voxel on seed).")] = False,
    glm: Annotated[str | None, typer.Option("--glm", help="GLM mode (film or none prewhitening): cope/varcope/tstat/zstat per run and seed instead of r/z.")] = None,
    device: Device = "auto",
    dask_scheduler: DaskScheduler = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Correlate mean seed time series with every brain voxel: r and Fisher z maps per run."""
    from gpuconn.distributed import check_options, dask_client, seed_maps_dask
    from gpuconn.seed import bold_inputs, compute_seed_maps, regions_from_options

    regions = regions_from_options(
        coords=seed_coord, radii=radius, names=name, mirror=mirror_mode(mirror, bilateral),
        table=seed_table, masks=seed_mask, labels=seed_label, what="seed",
    )  # fmt: skip
    inputs = bold_inputs(
        bold=bold, mask=mask, derivatives=derivatives, participant_label=participant_label, desc=bold_desc, space=space
    )
    if glm is not None:  # first-level GLM mode (gpuconn.firstlevel): inputs for gpuconn flame
        from gpuconn.firstlevel import seed_glm_maps

        written = seed_glm_maps(inputs, regions, out, prewhiten=glm, device=device, params={"command": "gpuconn seed --glm"})
        typer.echo(f"gpuconn seed --glm {glm}: {len(regions)} seed(s) x {len(inputs)} run(s) -> {len(written)} file(s) in {out}")
        return
    stats = ["r", "z"] + (["beta"] if beta else [])
    params = {"command": "gpuconn seed", "layout": layout}
    if not check_options(dask_scheduler, workers):
        written = compute_seed_maps(
            inputs, regions, out, layout=layout, stats=stats, device=device, progress=not quiet, params=params,
        )  # fmt: skip
    else:  # one Dask task per run, written by the workers
        with dask_client(scheduler=dask_scheduler, workers=workers) as client:
            written = seed_maps_dask(client, inputs, regions, out, layout=layout, stats=stats, device=device,
                                     progress=not quiet, params=params)
    typer.echo(f"gpuconn seed: {len(regions)} seed(s) x {len(inputs)} run(s) -> {len(written)} file(s) in {out}")
