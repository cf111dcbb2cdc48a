"""``gpuconn design``: group designs (FSL VEST files + TSV) from a participants table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def design(
    kind: Annotated[str, typer.Argument(help="one-sample, two-sample, paired or regression.")],
    participants: Annotated[Path, typer.Argument(help="BIDS participants.tsv (or a per-session table for paired).")],
    output_root: Annotated[Path, typer.Option("-o", help="Writes <root>.mat, .con, .grp (paired), .tsv.")],
    group: Annotated[Optional[str], typer.Option("--group", help="Group column (two-sample), or filter column.")] = None,
    levels: Annotated[
        Optional[str], typer.Option("--levels", help="Comma-separated levels: the two compared (A>B), or those kept.")
    ] = None,
    variable: Annotated[Optional[str], typer.Option("--variable", help="Regression: the tested column, or A-B for a difference of two columns.")] = None,
    covariate: Annotated[
        Optional[list[str]], typer.Option("--covariate", help="Covariate column (repeatable); demeaned, categorical dummy-coded.")
    ] = None,
    subject: Annotated[str, typer.Option("--subject", help="Subject column.")] = "participant_id",
    session: Annotated[Optional[str], typer.Option("--session", help="Paired: session column of a long table.")] = None,
    sessions: Annotated[
        Optional[str], typer.Option("--sessions", help="Paired: FIRST,SECOND session labels (one row per subject).")
    ] = None,
    paired_mode: Annotated[
        str, typer.Option("--paired-mode", help="full (subject means + blocks) or differences (one-sample).")
    ] = "full",
    copes: Annotated[Optional[str], typer.Option("--copes", help="PRE,POST 4D copes (a volume per design row): writes <root>_cope.nii.gz = POST - PRE.")] = None,
    varcopes: Annotated[Optional[str], typer.Option("--varcopes", help="PRE,POST 4D varcopes: writes <root>_varcope.nii.gz = PRE + POST.")] = None,
) -> None:
    """Build a randomise design (design.mat, design.con, design.grp for paired) and a readable TSV."""
    from gpuconn.stats.design import build_design, save_design

    built = build_design(
        participants,
        kind,
        group=group,
        levels=_split(levels),
        variable=variable,
        subject=subject,
        session=session,
        sessions=_split(sessions),
        paired_mode=paired_mode,
        covariates=covariate or [],
    )
    pair_c, pair_v = _split(copes) or [], _split(varcopes) or []
    if (copes is not None or varcopes is not None) and (len(pair_c) != 2 or len(pair_v) != 2):
        from gpuconn.core.errors import InputError

        raise InputError("--copes and --varcopes need PRE,POST each (two 4D images, comma-separated), together")
    written = save_design(built, output_root)
    if pair_c:  # the paper's paired regression for gpuconn flame: post - pre copes, summed varcopes
        from gpuconn.stats.paired import paired_differences

        written += paired_differences(pair_c[0], pair_c[1], pair_v[0], pair_v[1],
                                      f"{output_root}_cope.nii.gz", f"{output_root}_varcope.nii.gz")
    typer.echo(
        f"design: {kind}, {built.matrix.shape[0]} rows x {built.matrix.shape[1]} columns, "
        f"{len(built.contrast_names)} contrast(s) ({', '.join(built.contrast_names)}); "
        f"wrote {', '.join(p.name for p in written)}"
    )
