"""``gpuconn glm``: parametric OLS t/z maps with GRF cluster inference (FSL smoothest + cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gpuconn.stats.options import GrfOptions

from .options import ClusterP, ClusterZ, Device, Flag, image_root, stage_options

_GRF = GrfOptions()


def glm(
    input_image: Annotated[Path, typer.Option("-i", help="4D input image, one volume per subject/observation.")],
    output_root: Annotated[Path, typer.Option("-o", callback=image_root, help="Output root: <root>_zstat1.nii.gz, <root>_cluster_zstat1.tsv ...")],
    design_path: Annotated[Optional[Path], typer.Option("-d", help="Design matrix (FSL VEST design.mat).")] = None,
    contrast_path: Annotated[Optional[Path], typer.Option("-t", help="t contrasts (FSL VEST design.con).")] = None,
    mask_path: Annotated[Optional[Path], typer.Option("-m", help="Mask image (default: voxels non-zero in some volume).")] = None,
    one_sample: Annotated[bool, Flag("-1", help="One-sample group mean; no -d/-t.")] = False,
    cluster_z: ClusterZ = _GRF.cluster_z,
    cluster_p: ClusterP = _GRF.cluster_p,
    device: Device = "auto",
) -> None:
    """Parametric GLM with Gaussian-random-field cluster correction (as FSL easythresh)."""
    from gpuconn.stats.grf import parametric_glm

    tables = parametric_glm(
        input_image, output_root, design_path=design_path, contrast_path=contrast_path, mask_path=mask_path,
        one_sample=one_sample, clusters=stage_options(GrfOptions, locals()), device=device,
    )
    for name, table in tables.items():
        typer.echo(f"glm: {name}: {len(table)} cluster(s) with z > {cluster_z:g} and GRF p < {cluster_p:g}")
