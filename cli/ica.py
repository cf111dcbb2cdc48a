"""``gpuconn ica``: group ICA (``run``) and template matching (``match``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gpuconn.maps.options import ICAOptions

from .options import Device, Quiet, Seed, stage_options

_DEFAULTS = ICAOptions()

app = typer.Typer(
    help="Group ICA by temporal concatenation (MELODIC-like outputs) and matching of components to templates.",
    no_args_is_help=True,
)


@app.command("run")
def ica_run(
    subjects: Annotated[list[Path], typer.Argument(help="Subjects' 4D series on one grid (e.g. denoised, MNI).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")],
    dim: Annotated[int, typer.Option("--dim", "-d", help="Number of components.")] = _DEFAULTS.dim,
    mask: Annotated[
        Path | None,
        typer.Option("--mask", "-m", help="3D mask; default: voxels varying over time in every subject."),
    ] = None,
    subject_dim: Annotated[
        int | None, typer.Option("--subject-dim", help="Temporal PCs kept per subject (default max(2*dim, 20)).")
    ] = _DEFAULTS.subject_dim,
    internal_dim: Annotated[
        int | None, typer.Option("--internal-dim", help="MIGP rows kept between subjects (default max(5*dim, 50)).")
    ] = _DEFAULTS.internal_dim,
    max_iter: Annotated[int, typer.Option("--max-iter", help="FastICA iteration limit.")] = _DEFAULTS.max_iter,
    tol: Annotated[float, typer.Option("--tol", help="FastICA convergence tolerance.")] = _DEFAULTS.tol,
    seed: Seed = _DEFAULTS.seed,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Group ICA: variance normalisation, subject PCA, MIGP group PCA, FastICA (symmetric, logcosh).

    Writes melodic_IC.nii.gz (z-scored maps, positive skew, ordered by explained variance),
    melodic_mix, melodic_ICstats, mask.nii.gz and melodic_IC.json.
    """
    from gpuconn.maps.ica import run_group_ica

    options = stage_options(ICAOptions, locals())
    result = run_group_ica(subjects, out_dir, options, mask_path=mask, device=device, progress=not quiet)
    if not result.converged:
        Console(stderr=True).print(
            f"warning: FastICA did not converge in {max_iter} iterations; raise --max-iter or lower --dim"
        )
    if not quiet:
        Console(stderr=True).print(
            f"group ICA: {dim} components from {len(subjects)} subjects -> {out_dir / 'melodic_IC.nii.gz'}"
        )


@app.command("match")
def ica_match(
    components: Annotated[Path, typer.Argument(help="4D component maps (melodic_IC.nii.gz).")],
    templates: Annotated[Path, typer.Argument(help="3D/4D template networks on the same grid, one per volume.")],
    out_prefix: Annotated[
        Path, typer.Option("--out", "-o", help="Prefix of <prefix>_correlations.tsv and <prefix>_best.tsv.")
    ],
    names: Annotated[
        str | None, typer.Option("--names", help="Comma-separated template names, e.g. 'salience,DMN'.")
    ] = None,
    mask: Annotated[
        Path | None, typer.Option("--mask", "-m", help="Voxels to correlate over; default: non-zero components.")
    ] = None,
    select: Annotated[
        Path | None,
        typer.Option("--select", help="Write the best component per template (sign-aligned) as a 4D image."),
    ] = None,
) -> None:
    """Spatial correlation of every component with every template; best component per template."""
    from gpuconn.maps.ica import match_templates

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, best = match_templates(
            components, templates, out_prefix, mask_path=mask,
            names=[n.strip() for n in names.split(",")] if names else None, select_path=select,
        )
    for warning in caught:
        Console(stderr=True, highlight=False).print(f"warning: {warning.message}", markup=False)
    table = Table("template", "component", "r")
    for row in best.itertuples():
        table.add_row(str(row.template), str(row.component), f"{row.r:.3f}")
    Console().print(table)
