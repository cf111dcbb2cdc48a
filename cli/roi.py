"""``gpuconn roi``: ROI values from maps (``extract``) and ROI-to-ROI matrices (``matrix``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpuconn.maps.options import RegionOptions

from .options import Derivatives, Device, Participants, Quiet, Space
from .seed import AtlasLabels, BoldDesc, Bilateral, BoldFiles, Mask, Mirror, Name, Radius

app = typer.Typer(help="ROI extraction: mean map values in ROIs, ROI-to-ROI connectivity matrices.", no_args_is_help=True)

RoiCoord = Annotated[list[str], typer.Option("--roi-coord", help="ROI sphere centre x,y,z in MNI mm (repeatable).")]
RoiTable = Annotated[Path | None, typer.Option("--roi-table", help="TSV: name, x, y, z, radius[, mirror] or name, image[, label].")]
RoiMask = Annotated[list[Path], typer.Option("--roi-mask", help="ROI from a mask image (voxels > 0), or one ROI per label of an atlas image (whole-number labels; repeatable).")]
RoiLabel = Annotated[list[str], typer.Option("--roi-label", help="ROI from an atlas label, ATLAS:LABEL (a number, or a name from the atlas's label table; repeatable).")]


@app.command("extract")
def extract(
    maps: Annotated[list[Path], typer.Argument(help="3D/4D maps (e.g. gpuconn seed outputs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output TSV (subject, session, map, roi, value).")],
    mask: Annotated[Path | None, typer.Option("--mask", help="Restrict ROIs to this mask (maps' grid).")] = None,
    roi_coord: RoiCoord = [],
    radius: Radius = [],
    name: Name = [],
    mirror: Mirror = False,
    bilateral: Bilateral = False,
    roi_table: RoiTable = None,
    roi_mask: RoiMask = [],
    roi_label: RoiLabel = [],
    atlas_labels: AtlasLabels = None,
) -> None:
    """Mean value of every map volume in every ROI, as a tidy TSV."""
    from gpuconn.core.io import write_tsv
    from gpuconn.maps.regions import regions_from_options
    from gpuconn.maps.roi import extract_roi_values

    regions = regions_from_options(RegionOptions.from_arguments("roi", locals()))
    table = extract_roi_values(maps, regions, mask=mask)
    params = {"command": "gpuconn roi extract", "maps": maps, "mask": mask, "rois": [r.describe() for r in regions],
              "atlas_labels": atlas_labels}
    write_tsv(table, out, params=params, sidecar=True)
    typer.echo(f"gpuconn roi extract: {len(table)} value(s) ({len(regions)} ROI(s)) -> {out}")


@app.command("matrix")
def matrix(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    bold: BoldFiles = [],
    mask: Mask = None,
    derivatives: Derivatives = None,
    participant_label: Participants = [],
    bold_desc: BoldDesc = "preproc",
    space: Space = "MNI152NLin2009cAsym",
    roi_coord: RoiCoord = [],
    radius: Radius = [],
    name: Name = [],
    mirror: Mirror = False,
    bilateral: Bilateral = False,
    roi_table: RoiTable = None,
    roi_mask: RoiMask = [],
    roi_label: RoiLabel = [],
    atlas_labels: AtlasLabels = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """ROI-to-ROI correlation matrices (r and Fisher z, all pairs) per run.

    The matrices are exactly symmetric; the diagonal is 1 in r and n/a in z
    (the z of r = 1 is infinite). Censored volumes (a censor file, or the
    spike-censored volumes of gpuconn denoise outputs) are left out of the
    ROI time series.
    """
    from gpuconn.maps.regions import regions_from_options
    from gpuconn.maps.roi import compute_roi_matrices
    from gpuconn.maps.series import bold_inputs

    regions = regions_from_options(RegionOptions.from_arguments("roi", locals()))
    inputs = bold_inputs(
        bold=bold, mask=mask, derivatives=derivatives, participant_label=participant_label, desc=bold_desc, space=space
    )
    written = compute_roi_matrices(
        inputs, regions, out, device=device, progress=not quiet, params={"command": "gpuconn roi matrix", "atlas_labels": atlas_labels}
    )
    typer.echo(f"gpuconn roi matrix: {len(regions)} ROI(s) x {len(inputs)} run(s) -> {len(written)} file(s) in {out}")
