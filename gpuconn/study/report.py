"""The study report: one self-contained HTML file with embedded figures.

:func:`write_report` reads a study's results folder (as
:func:`gpuconn.study.runner.run_study` leaves it) and writes ``report.html``
with a table of contents and: the findings of a simulated study's planted
effects (the same lines the demo prints), motion QC (per-run motion, FD
traces with censored volumes), carpet plots and tSNR of a few runs, Table 1
(the participants the models used), the seeds drawn on the anatomy, ROI-to-ROI
matrices, QC-FC, each group model's design matrix, thresholded group maps as
orthogonal slices over a T1 template (``[report] template``) or else the mean
EPI of the included runs, cluster tables, ROI-level tests with bar and scatter
plots, and the study's parameters and package versions as tables. Figures
(:mod:`gpuconn.study.figures`) are PNG images embedded as base64 ``data:``
URIs, so the file can be mailed or archived alone; the QC sections are in
:mod:`gpuconn.study.report_qc`.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..core import io
from ..stats.design import read_vest
from .figures import design_figure, figure_png, ortho_slices, pyplot
from .qc_maps import underlay
from .report_qc import Page, matrices_section, motion_section, qcfc_section, runs_section, seeds_section, table_html
from .results import check_planted_effects, effect_lines, map_keys, model_contrasts, significant_voxels
from .schema import report_template

__all__ = ["write_report", "parameter_tables"]

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f3f3f3}.ok{color:#080;font-weight:bold}.bad{color:#b00;font-weight:bold}
img{max-width:100%}nav{background:#f7f7f7;padding:.5em 1em}nav li{margin:.1em 0}ul.findings{font-family:monospace;font-size:.85em}
"""


def _read(path: Path) -> pd.DataFrame | None:
    return io.read_tsv(path) if path.exists() else None


def _table_one(out: Path, study) -> str:
    table = _read(out / "table1.tsv")
    if table is None:
        return "<p>no Table 1</p>"
    inputs = study.section("inputs")
    shown = table[["variable", "summary_A", "summary_B", "test", "statistic", "df", "p"]]
    note = ("<p>The participants the group models used (after QC exclusion); motion (mean_rel_rms, mm) "
            f"from their {html.escape(inputs['sessions'][0])} session.</p>")
    return note + table_html(shown.rename(columns={"summary_A": inputs["patients"], "summary_B": inputs["controls"]}))


def _model_section(page: Page, model: dict) -> str:
    out, study = page.out, page.study
    folder = out / "group" / model["name"]
    parts = [f"<h3>{html.escape(model['name'])} ({html.escape(model['kind'])}, {html.escape(model['session'] or 'paired sessions')})</h3>"]
    design_tsv = _read(folder / "design.tsv")
    if (folder / "design.mat").exists():
        matrix, _ = read_vest(folder / "design.mat")
        names = [c for c in (design_tsv.columns if design_tsv is not None else []) if c not in ("participant_id", "group", "session", "block")]
        names = names[-matrix.shape[1]:] if len(names) >= matrix.shape[1] else [f"ev{i + 1}" for i in range(matrix.shape[1])]
        parts.append(figure_png(design_figure(matrix, names, f"design matrix ({matrix.shape[0]} observations)"), alt=f"design {model['name']}"))
    inference = study.section("inference")
    for key in map_keys(model):
        root = folder / key
        for contrast in model_contrasts(out, model["name"], key):
            z_path = Path(f"{root}_zstat{contrast}.nii.gz")
            if not z_path.exists():
                continue
            img = nib.load(str(z_path))
            z = np.asarray(img.dataobj, dtype=float)
            significant = significant_voxels(out, model["name"], key, contrast, inference)
            label = f"{key}, contrast {contrast} ({'stated direction' if contrast == 1 else 'reverse'})"
            parts.append(f"<h4>{html.escape(label)}: {int(significant.sum())} significant voxels in the whole map "
                         f"({html.escape(inference['method'])}, alpha {inference['alpha']})</h4>")
            parts.append(figure_png(ortho_slices(z, significant, page.underlay, img.affine, title=label), alt=label))
            parts.append(table_html(_read(Path(f"{root}_clusters_tstat{contrast}.tsv"))))
    return "".join(parts)


def _ica_section(page: Page) -> str:
    out, study = page.out, page.study
    folder = out / "ica"
    if not study.section("ica")["enabled"] or not (folder / "melodic_IC.nii.gz").exists():
        return ""
    parts = [f"<p>{study.section('ica')['dim']} components; dual regression of {len(_read(folder / 'runs.tsv'))} runs.</p>"]
    best = _read(folder / "match_best.tsv")
    if best is not None and (folder / "networks.nii.gz").exists():
        img = nib.load(str(folder / "networks.nii.gz"))
        maps = np.asarray(img.dataobj, dtype=float).reshape(img.shape[:3] + (-1,))
        parts.append(table_html(best))
        for index, row in best.iterrows():
            shown = maps[..., index] > 2.3
            title = f"{row['template']}: component {row['component']} (r = {row['r']:.2f}), z > 2.3"
            parts.append(figure_png(ortho_slices(maps[..., index], shown, page.underlay, img.affine, title=title), alt=title))
    return "".join(parts)


def _roi_section(out: Path, study) -> str:
    plt = pyplot()
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
        parts.append("<h3>ROI-level tests</h3>" + table_html(tests))
    return "".join(parts)


def _change_scatter(part: pd.DataFrame, study, groups: pd.DataFrame) -> str:
    """Change (second - first session) against each regression model's variable."""
    plt = pyplot()
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
    """The planted effects' findings: :func:`gpuconn.study.results.effect_lines` (what the demo prints) and the table."""
    truth_path = study.derivatives / "ground_truth.json"
    if not truth_path.exists():
        return ""
    checks = check_planted_effects(study, out, json.loads(truth_path.read_text()))
    lines = "".join(f"<li>{html.escape(line.strip())}</li>" for line in effect_lines(checks, study.section("inference")))
    checks["verdict"] = np.where(checks["found"] == checks["expected"], "as planted",
                                 np.where(checks["expected"], "missed", "chance hit (a 5% test)"))
    return f"<ul class='findings'>{lines}</ul>" + table_html(checks)


def _cell(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return "; ".join(", ".join(map(str, v)) for v in value)
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return "; ".join(f"{k} = {v}" for k, v in value.items())
    return str(value)


def parameter_tables(config: dict) -> str:
    """The study's settings as HTML tables: one (key, value) table per section, one row per entry of the list sections.

    Parameters
    ----------
    config : dict
        :attr:`gpuconn.study.schema.Study.config`.

    Returns
    -------
    str
    """
    parts = []
    for section, value in config.items():
        if isinstance(value, list):
            frame = pd.DataFrame([{k: _cell(v) for k, v in entry.items()} for entry in value])
        elif isinstance(value, dict):
            frame = pd.DataFrame({"setting": list(value), "value": [_cell(v) for v in value.values()]})
        else:
            frame = pd.DataFrame({"setting": [section], "value": [_cell(value)]})
        parts.append(f"<h3>[{'[' + section + ']' if isinstance(value, list) else section}]</h3>" + table_html(frame))
    return "".join(parts)


def _versions(record: dict) -> str:
    generated = record.get("GeneratedBy", [])
    generated = generated if isinstance(generated, list) else [generated]
    rows = [{"item": g.get("Name", ""), "value": g.get("Version", "")} for g in generated if isinstance(g, dict)]
    rows += [{"item": "command line", "value": g["CommandLine"]} for g in generated if isinstance(g, dict) and g.get("CommandLine")]
    rows += [{"item": k, "value": _cell(v)} for k, v in (record.get("Versions") or {}).items()]
    return table_html(pd.DataFrame(rows))


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _page(study, out: Path) -> Page:
    qc_path = out / "qc" / "qc.tsv"
    qc = io.read_tsv(qc_path) if qc_path.exists() else None
    excluded = set() if qc is None else set(qc.loc[qc["excluded"].astype(bool), "run"].astype(str))
    runs = [r for r in study.runs if r.prefix not in excluded]
    grid = nib.load(str(out / "group" / "mask.nii.gz"))
    data, description = underlay(report_template(study.path, study.config), [r.bold for r in runs], grid)
    return Page(study, out, qc, runs, data, description, grid)


def write_report(study, out_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the study report as one self-contained HTML file.

    Parameters
    ----------
    study : gpuconn.study.schema.Study
    out_dir : path-like
        The results folder (after the runner's steps before ``report``).
    path : path-like
        The HTML file to write (atomically); its JSON sidecar (same name,
        ``.json``) records the command line, versions, the underlay and the
        template.

    Returns
    -------
    Path
    """
    out = Path(out_dir)
    name = html.escape(study.section("study")["name"])
    page = _page(study, out)
    template = report_template(study.path, study.config)
    record = io.provenance({"underlay": page.underlay_name, "template": str(template) if template else None})
    sections = [
        ("Planted effects (simulated study)", _planted_section(study, out)),
        ("Motion QC", motion_section(page)),
        ("Carpet plots and tSNR", runs_section(page)),
        ("Table 1", _table_one(out, study)),
        ("Seeds", seeds_section(page)),
        ("ROI-to-ROI matrices", matrices_section(page)),
        ("Motion and connectivity (QC-FC)", qcfc_section(page)),
        ("Group ICA and dual regression", _ica_section(page)),
        ("Group models", f"<p>Underlay: {html.escape(page.underlay_name)}.</p>"
                         + "".join(_model_section(page, m) for m in study.section("models"))),
        ("ROIs", _roi_section(out, study)),
        ("Parameters", parameter_tables(study.config)),
        ("Versions", _versions(record)),
    ]
    sections = [(title, body) for title, body in sections if body]
    contents = "".join(f"<li><a href='#{_anchor(title)}'>{html.escape(title)}</a></li>" for title, _ in sections)
    body = "".join(f"<h2 id='{_anchor(title)}'>{html.escape(title)}</h2>{text}" for title, text in sections)
    header = (f"<h1>{name}</h1><p>study file: <code>{html.escape(str(study.path))}</code><br>"
              f"results: <code>{html.escape(str(out))}</code><br>anatomy: {html.escape(page.underlay_name)}</p>")
    document = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{name}</title><style>{_STYLE}</style></head>"
                f"<body>{header}<nav><strong>Contents</strong><ol>{contents}</ol></nav>{body}</body></html>\n")
    io.write_json(Path(path).with_suffix(".json"), record)  # the sidecar: command line, underlay and template
    return io.write_text(path, document)
