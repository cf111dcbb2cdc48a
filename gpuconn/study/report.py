"""The study report: one self-contained HTML file with embedded figures.

:func:`write_report` reads a study's results folder (as
:func:`gpuconn.study.runner.run_study` leaves it) and writes ``report.html`` with:
motion QC per run, Table 1, each group model's design matrix, thresholded
group maps as orthogonal slices through the strongest significant voxel,
cluster tables, ROI-level tests with bar and scatter plots, the planted
effects check when the input is a simulated study (``ground_truth.json``),
and the study's parameters and package versions. Figures are PNG images
drawn with matplotlib's Agg backend and embedded as base64 ``data:`` URIs,
so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..core import io
from ..core.errors import InputError
from ..stats.design import read_vest
from .results import check_planted_effects, map_keys, model_contrasts, significant_voxels

__all__ = ["figure_png", "ortho_slices", "write_report"]

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f3f3f3}.ok{color:#080;font-weight:bold}.bad{color:#b00;font-weight:bold}
img{max-width:100%}pre{background:#f7f7f7;padding:.5em;font-size:.8em;overflow:auto}
"""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("the report needs matplotlib; install it with: pip install 'gpuconn[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure) -> str:
    """A matplotlib figure as a base64 PNG ``<img>`` tag (the figure is closed)."""
    plt = _pyplot()
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def ortho_slices(stat: np.ndarray, shown: np.ndarray, background: np.ndarray, affine: np.ndarray, *, title: str = ""):
    """Sagittal, coronal and axial slices through the strongest shown voxel.

    Parameters
    ----------
    stat : ndarray, shape (x, y, z)
        The statistic (e.g. z).
    shown : ndarray of bool, shape (x, y, z)
        Voxels to colour (e.g. significant ones); the cut is at the largest
        ``|stat|`` among them, or among all voxels when none is shown.
    background : ndarray, shape (x, y, z)
        Drawn in grey (e.g. the brain mask).
    affine : ndarray, shape (4, 4)
        For the MNI coordinates in the title.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    pool = np.where(shown, np.abs(stat), -np.inf) if shown.any() else np.abs(np.nan_to_num(stat))
    peak = np.unravel_index(int(np.argmax(pool)), stat.shape)
    mm = (affine @ np.r_[peak, 1.0])[:3]
    overlay = np.ma.masked_where(~shown, stat)
    limit = float(np.nanmax(np.abs(stat))) or 1.0
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    cuts = [(lambda a: a[peak[0], :, :], "x"), (lambda a: a[:, peak[1], :], "y"), (lambda a: a[:, :, peak[2]], "z")]
    for axis, (cut, name) in zip(axes, cuts):
        axis.imshow(cut(background).T, origin="lower", cmap="gray", vmin=0, vmax=max(float(background.max()), 1e-6) * 1.6)
        image = axis.imshow(cut(overlay).T, origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit)
        axis.set_title(f"{name} = {mm['xyz'.index(name)]:.0f} mm", fontsize=9)
        axis.axis("off")
    figure.colorbar(image, ax=list(axes), shrink=0.7, label="z")
    figure.suptitle(f"{title}  (cut at MNI {mm[0]:.0f}, {mm[1]:.0f}, {mm[2]:.0f})", fontsize=10)
    return figure


def _table(frame: pd.DataFrame, *, digits: int = 3) -> str:
    if frame is None or frame.empty:
        return "<p><em>none</em></p>"
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}g}", na_rep="", border=0, escape=True)


def _read(path: Path) -> pd.DataFrame | None:
    return io.read_tsv(path) if path.exists() else None


def _table_one(out: Path, study) -> str:
    table = _read(out / "table1.tsv")
    if table is None:
        return "<p>no Table 1</p>"
    inputs = study.section("inputs")
    shown = table[["variable", "summary_A", "summary_B", "test", "statistic", "df", "p"]]
    return _table(shown.rename(columns={"summary_A": inputs["patients"], "summary_B": inputs["controls"]}))


def _qc_section(out: Path, study) -> str:
    plt = _pyplot()
    qc = _read(out / "qc" / "qc.tsv")
    if qc is None:
        return "<p>no QC table</p>"
    settings = study.section("qc")
    excluded = qc["excluded"].astype(bool).to_numpy()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    positions = np.arange(len(qc))
    colours = np.where(excluded, "#c33", "#48a")
    for axis, column, limit, label in ((axes[0], "mean_rel_rms", None, "mean relative RMS (mm)"),
                                       (axes[1], "max_abs_rms", settings["abs_threshold"], "max absolute RMS (mm)")):
        axis.bar(positions, qc[column], color=colours)
        if limit is not None:
            axis.axhline(limit, color="k", linestyle="--", linewidth=1)
        axis.set_ylabel(label)
        axis.set_xticks(positions, qc["run"].str.replace("_task-rest", ""), rotation=90, fontsize=6)
    figure.suptitle("Motion QC per run (red: excluded)", fontsize=10)
    body = figure_png(figure)
    shown = qc.loc[excluded, ["run", "max_abs_rms", "max_rel_rms", "exclusion_reason"]]
    return body + f"<p>{int(excluded.sum())} of {len(qc)} runs excluded:</p>" + _table(shown)


def _design_figure(matrix: np.ndarray, names: list[str], title: str):
    plt = _pyplot()
    scaled = matrix / np.where(np.abs(matrix).max(0) > 0, np.abs(matrix).max(0), 1.0)
    figure, axis = plt.subplots(figsize=(1.2 + 0.5 * matrix.shape[1], 2.5))
    axis.imshow(scaled, aspect="auto", cmap="gray", interpolation="nearest", vmin=-1, vmax=1)
    axis.set_xticks(range(len(names)), names, rotation=60, fontsize=7, ha="right")
    axis.set_ylabel("observation")
    axis.set_title(title, fontsize=9)
    return figure


def _model_section(out: Path, study, model: dict) -> str:
    folder = out / "group" / model["name"]
    parts = [f"<h3>{html.escape(model['name'])} ({html.escape(model['kind'])}, {html.escape(model['session'])})</h3>"]
    design_tsv = _read(folder / "design.tsv")
    if (folder / "design.mat").exists():
        matrix, _ = read_vest(folder / "design.mat")
        names = [c for c in (design_tsv.columns if design_tsv is not None else []) if c not in ("participant_id", "group", "session", "block")]
        names = names[-matrix.shape[1]:] if len(names) >= matrix.shape[1] else [f"ev{i + 1}" for i in range(matrix.shape[1])]
        parts.append(figure_png(_design_figure(matrix, names, f"design matrix ({matrix.shape[0]} observations)")))
    mask_path = out / "group" / "mask.nii.gz"
    background = np.asarray(nib.load(str(mask_path)).dataobj, dtype=float) if mask_path.exists() else None
    inference = study.section("inference")
    for key in map_keys(model):
        root = folder / key
        for contrast in model_contrasts(out, model["name"], key):
            z_path = Path(f"{root}_zstat{contrast}.nii.gz")
            if not z_path.exists() or background is None:
                continue
            img = nib.load(str(z_path))
            z = np.asarray(img.dataobj, dtype=float)
            significant = significant_voxels(out, model["name"], key, contrast, inference)
            label = f"{key}, contrast {contrast} ({'stated direction' if contrast == 1 else 'reverse'})"
            parts.append(f"<h4>{html.escape(label)}: {int(significant.sum())} significant voxels "
                         f"({html.escape(inference['method'])}, alpha {inference['alpha']})</h4>")
            parts.append(figure_png(ortho_slices(z, significant, background, img.affine, title=label)))
            parts.append(_table(_read(Path(f"{root}_clusters_tstat{contrast}.tsv"))))
    return "".join(parts)


def _ica_section(out: Path, study) -> str:
    folder = out / "ica"
    if not study.section("ica")["enabled"] or not (folder / "melodic_IC.nii.gz").exists():
        return ""
    parts = [f"<h2>Group ICA and dual regression</h2><p>{study.section('ica')['dim']} components; "
             f"dual regression of {len(_read(folder / 'runs.tsv'))} runs.</p>"]
    best = _read(folder / "match_best.tsv")
    if best is not None and (folder / "networks.nii.gz").exists():
        img = nib.load(str(folder / "networks.nii.gz"))
        maps = np.asarray(img.dataobj, dtype=float).reshape(img.shape[:3] + (-1,))
        background = np.asarray(nib.load(str(folder / "mask.nii.gz")).dataobj, dtype=float)
        parts.append(_table(best))
        for index, row in best.iterrows():
            shown = maps[..., index] > 2.3
            title = f"{row['template']}: component {row['component']} (r = {row['r']:.2f}), z > 2.3"
            parts.append(figure_png(ortho_slices(maps[..., index], shown, background, img.affine, title=title)))
    return "".join(parts)


def _roi_section(out: Path, study) -> str:
    plt = _pyplot()
    path = out / "rois" / "roi_values.tsv"
    values = pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str}, keep_default_na=False) if path.exists() else None
    tests = _read(out / "rois" / "roi_tests.tsv")
    if values is None:
        return "<p>no ROI values</p>"
    inputs = study.section("inputs")
    groups = study.table.assign(subject=study.table[inputs["subject_column"]].astype(str).str.removeprefix("sub-"))
    groups = groups.set_index("subject")
    values = values.assign(subject=values["subject"].astype(str).str.removeprefix("sub-"), session=values["session"].astype(str))
    values["group"] = values["subject"].map(groups[inputs["group_column"]].astype(str))
    parts = []
    for map_name, part in values.groupby("map", sort=False):
        summary = part.groupby(["roi", "group", "session"], sort=False)["value"].agg(["mean", "sem", "count"]).reset_index()
        figure, axis = plt.subplots(figsize=(8, 3))
        sessions = study.section("inputs")["sessions"]
        keys = sorted(summary[["group", "session"]].drop_duplicates().itertuples(index=False, name=None),
                      key=lambda k: (k[0] != inputs["patients"], sessions.index(k[1]) if k[1] in sessions else len(sessions)))
        rois = list(pd.unique(summary["roi"]))
        width = 0.8 / max(len(keys), 1)
        for k, (group, session) in enumerate(keys):
            rows = summary[(summary["group"] == group) & (summary["session"] == session)].set_index("roi").reindex(rois)
            axis.bar(np.arange(len(rois)) + k * width, rows["mean"], width, yerr=rows["sem"], label=f"{group} {session}", capsize=2)
        axis.set_xticks(np.arange(len(rois)) + 0.4 - width / 2, rois)
        axis.set_ylabel("mean Fisher z")
        axis.set_title(f"{map_name}: ROI means ± SEM", fontsize=9)
        axis.legend(fontsize=7)
        parts.append(figure_png(figure))
        parts.append(_change_scatter(part, study, groups))
    if tests is not None:
        parts.append("<h3>ROI-level tests</h3>" + _table(tests))
    return "".join(parts)


def _change_scatter(part: pd.DataFrame, study, groups: pd.DataFrame) -> str:
    """Change (second - first session) against each regression model's variable."""
    plt = _pyplot()
    sessions = study.section("inputs")["sessions"]
    variables = [m["variable"] for m in study.section("models") if m["kind"] == "regression" and m["session"] == "change"]
    if len(sessions) != 2 or not variables:
        return ""
    wide = part.pivot_table(index=["subject", "roi"], columns="session", values="value")
    if not set(sessions) <= set(wide.columns):
        return ""
    change = (wide[sessions[1]] - wide[sessions[0]]).dropna().reset_index(name="change")
    rois = list(pd.unique(change["roi"]))
    html_parts = []
    for variable in dict.fromkeys(variables):
        figure, axes = plt.subplots(1, len(rois), figsize=(3 * len(rois), 2.8), squeeze=False)
        for axis, roi in zip(axes[0], rois):
            rows = change[change["roi"] == roi]
            x = rows["subject"].map(groups[variable]).astype(float)
            axis.scatter(x, rows["change"], s=14)
            axis.set_xlabel(variable, fontsize=8)
            axis.set_title(roi, fontsize=9)
        axes[0][0].set_ylabel(f"{sessions[1]} - {sessions[0]} z", fontsize=8)
        html_parts.append(figure_png(figure))
    return "".join(html_parts)


def _planted_section(study, out: Path) -> str:
    truth_path = study.derivatives / "ground_truth.json"
    if not truth_path.exists():
        return ""

    checks = check_planted_effects(study, out, json.loads(truth_path.read_text()))
    checks["verdict"] = np.where(checks["found"] == checks["expected"], "as planted",
                                 np.where(checks["expected"], "missed", "chance hit (a 5% test)"))
    return "<h2>Planted effects (simulated study)</h2>" + _table(checks)


def write_report(study, out_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the study report as one self-contained HTML file.

    Parameters
    ----------
    study : gpuconn.study.schema.Study
    out_dir : path-like
        The results folder.
    path : path-like
        The HTML file to write (atomically).

    Returns
    -------
    Path
    """
    out = Path(out_dir)
    name = html.escape(study.section("study")["name"])
    record = io.provenance({})
    sections = [
        f"<h1>{name}</h1><p>study file: <code>{html.escape(str(study.path))}</code><br>"
        f"results: <code>{html.escape(str(out))}</code></p>",
        _planted_section(study, out),
        "<h2>Motion QC</h2>" + _qc_section(out, study),
        "<h2>Table 1</h2>" + _table_one(out, study),
        _ica_section(out, study),
        "<h2>Group models</h2>" + "".join(_model_section(out, study, m) for m in study.section("models")),
        "<h2>ROIs</h2>" + _roi_section(out, study),
        "<h2>Parameters and versions</h2><pre>" + html.escape(json.dumps(study.config, indent=2, default=str)) + "</pre>"
        "<pre>" + html.escape(json.dumps({k: record[k] for k in ("GeneratedBy", "Versions")}, indent=2, default=str)) + "</pre>",
    ]
    document = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{name}</title><style>{_STYLE}</style></head>"
                f"<body>{''.join(sections)}</body></html>\n")
    return io.write_text(path, document)
