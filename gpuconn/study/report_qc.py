"""The report's quality-control sections: motion, carpets and tSNR, seed placement, ROI matrices, QC-FC.

Each ``*_section`` function takes a :class:`Page` (the study, its results
folder, the runs that passed QC and the anatomical underlay) and returns an
HTML fragment; :mod:`gpuconn.study.report` assembles them. What they draw
comes from the runner's outputs: ``qc/qc.tsv`` and
``qc/framewise_displacement.tsv``, each run's denoising design (censored
volumes), the seed maps, ``rois/matrices/*_stat-z_roimatrix.tsv``, and the
preprocessed BOLD of a few runs (carpets, tSNR).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..core import io
from ..core.bids import Run
from ..maps.regions import region_masks
from .figures import carpet_figure, fd_traces, figure_png, matrix_figure, ortho_slices, pyplot, qcfc_figure
from .qc_maps import carpet, censored_volumes, qc_fc, tsnr
from .results import denoised_outputs
from .schema import Study, entry_regions, region_names

__all__ = ["Page", "table_html", "motion_section", "runs_section", "seeds_section", "matrices_section", "qcfc_section"]

#: Runs shown with a carpet plot and tSNR map: the included runs of lowest, median and highest mean FD.
CARPET_RUNS = 3


@dataclass
class Page:
    """What every section reads: the study, its results folder, QC, included runs and the underlay.

    Attributes
    ----------
    study : Study
    out : Path
    qc : pandas.DataFrame or None
        ``qc/qc.tsv``.
    runs : list of Run
        The runs that passed QC.
    underlay : ndarray, shape (x, y, z)
        On the study grid (``grid``).
    underlay_name : str
    grid : nibabel.Nifti1Image
        The group mask.
    """

    study: Study
    out: Path
    qc: pd.DataFrame | None
    runs: list[Run]
    underlay: np.ndarray
    underlay_name: str
    grid: nib.Nifti1Image

    def censored(self, run: Run) -> np.ndarray:
        """The volumes the run's denoising censored (none when it was not denoised)."""
        path = denoised_outputs(self.out, run)["design"]
        return censored_volumes(path) if path.exists() else np.zeros(0, int)


def table_html(frame: pd.DataFrame | None, *, digits: int = 3) -> str:
    """A table as HTML (escaped text, ``digits`` significant digits), or "none"."""
    if frame is None or frame.empty:
        return "<p><em>none</em></p>"
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}g}", na_rep="", border=0, escape=True)


def _read(path: Path) -> pd.DataFrame | None:
    return io.read_tsv(path) if path.exists() else None


def _short(name: str) -> str:
    return name.replace("_task-rest", "")


def motion_section(page: Page) -> str:
    """Per-run motion bars (excluded runs red), the exclusion table and each run's FD trace with censored volumes."""
    plt = pyplot()
    qc = page.qc
    if qc is None:
        return "<p>no QC table</p>"
    settings = page.study.section("qc")
    excluded = qc["excluded"].astype(bool).to_numpy()
    figure, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    positions = np.arange(len(qc))
    colours = np.where(excluded, "#c33", "#48a")
    for axis, column, limit, label in ((axes[0], "mean_rel_rms", None, "mean relative RMS (mm)"),
                                       (axes[1], "max_abs_rms", settings["abs_threshold"], "max absolute RMS (mm)")):
        axis.bar(positions, qc[column], color=colours)
        if limit is not None:
            axis.axhline(limit, color="k", linestyle="--", linewidth=1)
        axis.set_ylabel(label)
        axis.set_xticks(positions, qc["run"].map(_short), rotation=90, fontsize=6)
    figure.suptitle("Motion QC per run (red: excluded)", fontsize=10)
    parts = [figure_png(figure, alt="motion per run")]
    shown = qc.loc[excluded, ["run", "max_abs_rms", "max_rel_rms", "exclusion_reason"]]
    parts.append(f"<p>{int(excluded.sum())} of {len(qc)} runs excluded:</p>" + table_html(shown))
    fd = _read(page.out / "qc" / "framewise_displacement.tsv")
    if fd is not None:
        kept = {r.prefix: r for r in page.runs}
        series = [(_short(name) + ("" if name in kept else " EXCLUDED"), part["framewise_displacement"].to_numpy(float),
                   page.censored(kept[name]) if name in kept else np.zeros(0, int))
                  for name, part in fd.groupby("run", sort=False)]
        parts.append(f"<h3 id='fd'>Framewise displacement per run</h3><p>Power FD; volumes censored in denoising "
                     f"({html.escape(page.study.section('denoise')['censor'])}, {html.escape(settings['outlier_metric'])} &gt; "
                     f"{settings['outlier_threshold']:g} mm) are red.</p>")
        parts.append(figure_png(fd_traces(series, settings["outlier_threshold"]), alt="framewise displacement per run"))
    return "".join(parts)


def _carpet_runs(page: Page) -> list[Run]:
    """The included runs of lowest, median and highest mean FD (at most :data:`CARPET_RUNS`, distinct)."""
    if page.qc is None or not page.runs:
        return []
    fd = page.qc.set_index("run")["mean_fd"]
    ordered = sorted(page.runs, key=lambda r: float(fd.get(r.prefix, np.nan)))
    picks = sorted({0, len(ordered) // 2, len(ordered) - 1})[:CARPET_RUNS]
    return [ordered[i] for i in picks]


def runs_section(page: Page) -> str:
    """Carpet plots (preprocessed and denoised) under the FD trace, and tSNR maps, of a few runs."""
    fd_table = _read(page.out / "qc" / "framewise_displacement.tsv")
    parts, rows = [], []
    for run in _carpet_runs(page):
        img = io.load_header(run.bold, ndim=4, what="BOLD")  # also FEAT folders and AFNI datasets, in standard space
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask = io.load_mask(run.mask, what="brain mask")[0]
        fd = (fd_table.loc[fd_table["run"] == run.prefix, "framewise_displacement"].to_numpy(float)
              if fd_table is not None else np.zeros(data.shape[-1]))
        carpets = [("preprocessed", carpet(data, mask))]
        denoised = denoised_outputs(page.out, run)["bold"]
        if denoised.exists():
            carpets.append(("denoised", carpet(np.asarray(nib.load(str(denoised)).dataobj, dtype=np.float32), mask)))
        censored = page.censored(run)
        parts.append(figure_png(carpet_figure(f"{_short(run.prefix)}: mean FD {fd[1:].mean() if len(fd) > 1 else 0:.3f} mm",
                                              fd, carpets, censored), alt=f"carpet plot {run.prefix}"))
        snr = io.unmask(tsnr(data[mask]), mask)
        parts.append(figure_png(ortho_slices(snr, mask, _underlay_for(page, img), img.affine, title=f"{_short(run.prefix)}: tSNR",
                                             label="tSNR", cmap="viridis", symmetric=False), alt=f"tSNR {run.prefix}"))
        rows.append({"run": run.prefix, "mean_fd": float(fd[1:].mean()) if len(fd) > 1 else np.nan,
                     "censored_volumes": len(censored), "median_tsnr": float(np.median(snr[mask]))})
    if not parts:
        return "<p>no included runs</p>"
    intro = ("<p>The included runs of lowest, median and highest mean FD. Carpets: in-mask voxels (rows) by volumes, "
             "each voxel detrended and z-scored; red lines: censored volumes. tSNR: temporal mean / SD of the "
             "preprocessed BOLD.</p>")
    return intro + table_html(pd.DataFrame(rows)) + "".join(parts)


def _underlay_for(page: Page, img: nib.Nifti1Image) -> np.ndarray:
    """The page's underlay when ``img`` is on the study grid, else the image's own temporal mean."""
    if img.shape[:3] == page.grid.shape[:3] and np.allclose(img.affine, page.grid.affine, atol=1e-4):
        return page.underlay
    return np.asarray(img.dataobj, dtype=np.float64).reshape(img.shape[:3] + (-1,)).mean(axis=-1)


def seeds_section(page: Page) -> str:
    """Each seed drawn on the underlay, cut at its centre (a sphere's; an image region's centre of mass), mirrored
    parts included."""
    parts = []
    mask = np.asarray(page.grid.dataobj) > 0
    for index, entry in enumerate(page.study.section("seeds")):
        regions = entry_regions(page.study, "seeds", index)
        drawn = np.any(region_masks(regions, page.grid, what="seed"), axis=0)
        if entry["center"] is not None:
            shape = f"{entry['radius']:g} mm sphere at MNI {tuple(entry['center'])}, mirror {entry['mirror']}"
            cut_mm = entry["center"]
        else:
            (region,) = regions
            named = f" ({region.label_name})" if region.label_name else ""
            shape = ("" if region.label is None else f"label {region.label}{named} of ") + entry["image"]
            cut_mm = (page.grid.affine @ np.r_[np.argwhere(drawn).mean(axis=0), 1.0])[:3]  # centre of mass, mm
        parts.append(figure_png(ortho_slices(drawn.astype(float), drawn, page.underlay, page.grid.affine,
                                             title=f"seed {entry['name']}: {shape}", cut_mm=cut_mm, label="seed",
                                             cmap="autumn", symmetric=False),
                                alt=f"seed {entry['name']}"))
        parts.append(f"<p>{int(drawn.sum())} voxels ({int((drawn & mask).sum())} in the group mask).</p>")
    return "".join(parts)


def _matrices(page: Page) -> tuple[list[str], dict[str, np.ndarray]]:
    """ROI names and each included run's Fisher-z ROI matrix (``rois/matrices``)."""
    folder = page.out / "rois" / "matrices"
    names, out = [], {}
    for run in page.runs:
        table = _read(folder / f"{run.prefix}_stat-z_roimatrix.tsv")
        if table is not None:
            names = table["roi"].astype(str).tolist()
            out[run.prefix] = table.drop(columns="roi").to_numpy(float)
    return names, out


def _groups(page: Page) -> dict[str, str]:
    """``{subject label without sub-: group}``."""
    inputs = page.study.section("inputs")
    table = page.study.table
    subjects = table[inputs["subject_column"]].astype(str).str.removeprefix("sub-")
    return dict(zip(subjects, table[inputs["group_column"]].astype(str)))


def matrices_section(page: Page) -> str:
    """Mean ROI-to-ROI Fisher-z matrices of the seeds and ROIs, per group and session."""
    names, matrices = _matrices(page)
    if not matrices:
        return "<p>no ROI matrices</p>"
    groups = _groups(page)
    sessions = page.study.section("inputs")["sessions"]
    cells: dict[tuple[str, str], list[np.ndarray]] = {}
    for run in page.runs:
        if run.prefix in matrices:
            cells.setdefault((groups.get(run.subject, "?"), run.session or ""), []).append(matrices[run.prefix])
    order = sorted(cells, key=lambda k: (k[0], sessions.index(k[1]) if k[1] in sessions else len(sessions)))
    shown = [(f"{group} {session} (n = {len(cells[(group, session)])})".replace("  ", " "), np.mean(cells[(group, session)], axis=0))
             for group, session in order]
    return ("<p>Correlation of the seeds' and ROIs' mean denoised time series (Fisher z), averaged over the included "
            "runs of each group and session.</p>" + figure_png(matrix_figure(shown, names), alt="ROI-to-ROI matrices"))


def qcfc_section(page: Page) -> str:
    """QC-FC: across subjects of each session, r of mean FD with every seed-map voxel and every ROI-matrix edge."""
    if page.qc is None or not page.runs:
        return "<p>no QC table</p>"
    mean_fd = page.qc.set_index("run")["mean_fd"]
    mask = np.asarray(page.grid.dataobj) > 0
    seeds = region_names(page.study.config, "seeds")
    names, matrices = _matrices(page)
    upper = np.triu_indices(len(names), 1)
    sessions = list(dict.fromkeys(r.session or "" for r in page.runs))
    sets, rows = [], []
    for session in sessions:
        runs = [r for r in page.runs if (r.session or "") == session]
        fd = np.array([float(mean_fd[r.prefix]) for r in runs])
        for index, seed in enumerate(seeds):
            paths = [page.out / "seeds" / f"{r.prefix}_stat-z_seedmap.nii.gz" for r in runs]
            if not all(p.exists() for p in paths):
                continue
            values = np.stack([np.asarray(nib.load(str(p)).dataobj[..., index], dtype=np.float64)[mask] for p in paths])
            sets.append((f"seed {seed} map, {session or 'all'}", *qc_fc(values, fd), len(runs)))
        if len(names) > 1 and all(r.prefix in matrices for r in runs):
            edges = np.stack([matrices[r.prefix][upper] for r in runs])
            sets.append((f"ROI edges, {session or 'all'}", *qc_fc(edges, fd), len(runs)))
    for label, r, p, n in sets:
        finite = np.isfinite(r)
        rows.append({"values": label, "subjects": n, "count": int(finite.sum()), "median_abs_r": float(np.median(np.abs(r[finite]))) if finite.any() else np.nan,
                     "percent_p_below_0.05": 100.0 * float((p[finite] < 0.05).mean()) if finite.any() else np.nan})
    if not sets:
        return "<p>no seed maps or ROI matrices</p>"
    intro = ("<p>Correlation across subjects (one included run each, per session) of mean framewise displacement with "
             "each seed-map voxel (in the group mask) and each ROI-to-ROI edge, as xcp_d's QC-FC. Without a motion "
             "effect the correlations follow the null density drawn and about 5% have p &lt; 0.05 (uncorrected).</p>")
    return intro + table_html(pd.DataFrame(rows)) + figure_png(qcfc_figure([(label, r, n) for label, r, _, n in sets]), alt="QC-FC")
