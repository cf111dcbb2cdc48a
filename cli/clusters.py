"""``gpuconn clusters``: cluster table and cluster index image of a statistic map (like FSL cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Flag, image_root


def clusters(
    stat: Annotated[Path, typer.Option("-i", "--in", help="3D statistic image (t, z, TFCE...).")],
    threshold: Annotated[float, typer.Option("-t", "--thresh", help="Cluster-forming threshold (voxels above it).")],
    output_root: Annotated[Path, typer.Option("-o", callback=image_root, help="Output root: <root>_clusters.tsv, <root>_cluster_index.nii.gz.")],
    mask: Annotated[Optional[Path], typer.Option("-m", help="Mask image (default: finite voxels).")] = None,
    corrp: Annotated[
        Optional[Path], typer.Option("--corrp", help="randomise *_corrp_* map (1-p): adds the smallest corrected p per cluster.")
    ] = None,
    atlas_path: Annotated[Optional[Path], typer.Option("--atlas", help="Integer atlas image on the same grid.")] = None,
    atlas_labels_path: Annotated[
        Optional[Path], typer.Option("--atlas-labels", help="TSV with columns index and name for --atlas.")
    ] = None,
    connectivity: Annotated[int, typer.Option("--connectivity", help="6, 18 or 26 (FSL cluster: 26).")] = 26,
    min_voxels: Annotated[int, typer.Option("--min-voxels", help="Drop clusters smaller than this.")] = 1,
    maxima: Annotated[bool, Flag("--maxima", help="Also write local maxima (<root>_maxima.tsv).")] = False,
    peak_distance: Annotated[float, typer.Option("--peak-distance", help="Minimum mm between local maxima.")] = 8.0,
) -> None:
    """Table of clusters (size, peak, MNI mm, centre of gravity) and the cluster index image."""
    from gpuconn.stats.tables import write_cluster_table

    result = write_cluster_table(
        stat, output_root, threshold=threshold, mask_path=mask, corrp_path=corrp, atlas_path=atlas_path,
        atlas_labels_path=atlas_labels_path, connectivity=connectivity, min_voxels=min_voxels, maxima=maxima,
        min_distance_mm=peak_distance,
    )
    table = result.table
    typer.echo(f"clusters: {len(table)} cluster(s) above {threshold:g} in {stat}; table {output_root}_clusters.tsv")
    if len(table):
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
