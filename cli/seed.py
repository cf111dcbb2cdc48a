"""``gpuconn seed``: seed-to-voxel connectivity maps (r, Fisher z, beta)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpuconn.maps import ROI_RADIUS_MM, SEED_RADIUS_MM
from gpuconn.maps.options import RegionOptions

from .options import DaskScheduler, Derivatives, Device, FeatDirs, Flag, Participants, Quiet, Space, Workers

BoldFiles = Annotated[list[Path], typer.Option("--bold", help="4D BOLD file (repeatable); needs --mask.")]
Mask = Annotated[
    Path | None, typer.Option("--mask", help="Brain mask on the BOLD grid (overrides each run's own mask with --derivatives).")
]
BoldDesc = Annotated[
    str, typer.Option("--bold-desc", help="desc- entity of the BOLD files under --derivatives (e.g. preproc, denoised).")
]
Radius = Annotated[list[float], typer.Option(
    "--radius", help=f"Sphere radius in mm: once for all, or once per coordinate (default {SEED_RADIUS_MM:g} mm for seeds, "
                     f"{ROI_RADIUS_MM:g} mm for ROIs, the study's).")]
Name = Annotated[list[str], typer.Option("--name", help="Name per coordinate (letters and digits).")]
AtlasLabels = Annotated[Path | None, typer.Option(
    "--atlas-labels", help="Label table of the atlas images given: 'index' and 'name' columns (BIDS dseg.tsv) or lines "
                           "'<index> <name>' (default: the .tsv beside the atlas); names its regions.")]
Mirror = Annotated[bool, Flag("--mirror", help="Also use each coordinate sphere mirrored to (-x, y, z) as a separate region.")]
Bilateral = Annotated[bool, Flag("--bilateral", help="Make each coordinate sphere the union with its mirror (one bilateral region).")]


def seed(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    bold: BoldFiles = [],
    mask: Mask = None,
    derivatives: Derivatives = None,
    feat: FeatDirs = [],
    participant_label: Participants = [],
    bold_desc: BoldDesc = "preproc",
    space: Space = "MNI152NLin2009cAsym",
    seed_coord: Annotated[list[str], typer.Option("--seed-coord", help="Seed centre x,y,z in MNI mm (repeatable), e.g. -18,-38,72.")] = [],
    radius: Radius = [],
    name: Name = [],
    mirror: Mirror = False,
    bilateral: Bilateral = False,
    seed_table: Annotated[Path | None, typer.Option("--seed-table", help="TSV: name, x, y, z, radius[, mirror] or name, image[, label].")] = None,
    seed_mask: Annotated[list[Path], typer.Option("--seed-mask", help="Seed from a mask image (voxels > 0), or one seed per label of an atlas image (whole-number labels; repeatable).")] = [],
    seed_label: Annotated[list[str], typer.Option("--seed-label", help="Seed from an atlas label, ATLAS:LABEL (a number, or a name from the atlas's label table; repeatable).")] = [],
    atlas_labels: AtlasLabels = None,
    layout: Annotated[str, typer.Option("--layout", help="subject: a 4D file per run (a volume per seed); seed: a 4D file per seed (a volume per run, for randomise).")] = "subject",
    beta: Annotated[bool, Flag("--beta", help="Also write regression beta maps (voxel on seed).")] = False,
    prewhiten: Annotated[str | None, typer.Option("--glm", help="GLM mode (film or none prewhitening): cope/varcope/tstat/zstat per run and seed instead of r/z.")] = None,
    device: Device = "auto",
    scheduler: DaskScheduler = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Correlate mean seed time series with every brain voxel: r and Fisher z maps per run."""
    from gpuconn.core.feat import feat_runs
    from gpuconn.core.tasks import dask_client
    from gpuconn.maps.regions import regions_from_options
    from gpuconn.maps.seed import compute_seed_maps
    from gpuconn.maps.series import BoldInput, bold_inputs

    regions = regions_from_options(RegionOptions.from_arguments("seed", locals()))
    inputs = [BoldInput(run.label, run.bold, mask or run.mask) for run in feat_runs(feat)]
    if bold or derivatives is not None or not feat:
        inputs += bold_inputs(
            bold=bold, mask=mask, derivatives=derivatives, participant_label=participant_label, desc=bold_desc, space=space
        )
    if prewhiten is not None:  # first-level GLM mode (gpuconn.maps.firstlevel): inputs for gpuconn flame
        from gpuconn.maps.firstlevel import seed_glm_maps

        written = seed_glm_maps(inputs, regions, out, prewhiten=prewhiten, device=device, params={"command": "gpuconn seed --glm", "atlas_labels": atlas_labels})
        typer.echo(f"gpuconn seed --glm {prewhiten}: {len(regions)} seed(s) x {len(inputs)} run(s) -> {len(written)} file(s) in {out}")
        return
    stats = ["r", "z"] + (["beta"] if beta else [])
    params = {"command": "gpuconn seed", "layout": layout, "atlas_labels": atlas_labels}
    with dask_client(scheduler=scheduler, workers=workers) as client:  # None: one process; else a task per run
        written = compute_seed_maps(
            inputs, regions, out, layout=layout, stats=stats, device=device, progress=not quiet, params=params,
            client=client,
        )  # fmt: skip
    typer.echo(f"gpuconn seed: {len(regions)} seed(s) x {len(inputs)} run(s) -> {len(written)} file(s) in {out}")
