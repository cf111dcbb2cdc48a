"""The study runner: the steps of a study, in order, each by the library module that owns it.

:func:`run_study` runs a validated study (:mod:`gpuconn.study.schema`) into
a results folder:

==========  ==============================================================
step        library call
==========  ==============================================================
qc          :func:`gpuconn.subject.qc.qc_table` on each run's motion parameters, and each run's FD series
denoise     :func:`gpuconn.subject.denoise.denoise_runs` (runs passing QC)
seeds       :func:`gpuconn.maps.seed.compute_seed_maps` (Fisher z per seed); for FLAME
            inference also :func:`gpuconn.maps.firstlevel.seed_glm_maps` (copes, varcopes)
ica         :func:`gpuconn.maps.ica.run_group_ica`, :func:`gpuconn.maps.ica.match_templates`
            and :func:`gpuconn.maps.dualreg.dual_regression` with ``[dualreg]`` (when ``[ica] enabled``)
group       :func:`gpuconn.stats.design.build_design`, then per model and map
            (seed map or network) :func:`gpuconn.stats.randomise.run_permutation_test`
            + :func:`~gpuconn.stats.randomise.write_outputs`, or for
            ``method = "grf"`` :func:`gpuconn.stats.grf.parametric_glm`, or for
            ``flame1``/``flame12`` :func:`gpuconn.stats.flame.run_flame` on the
            seeds' copes and varcopes (summed for post - pre changes), GRF clusters
clusters    :func:`gpuconn.stats.tables.cluster_table` of the significant voxels
rois        :func:`gpuconn.maps.roi.extract_roi_values`, then
            :mod:`gpuconn.study.roi_stats` (t-tests, correlations, subgroups, FDR);
            :func:`gpuconn.maps.roi.compute_roi_matrices` of the seeds and ROIs (``rois/matrices``)
table1      :func:`gpuconn.study.demographics.table_one` of the participants the models used
report      :func:`gpuconn.study.report.write_report` (``OUT/report.html``)
==========  ==============================================================

Each finished step writes a stamp (:mod:`gpuconn.study.stamps`); a step
whose stamp is current is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats

from ..core import io
from ..core.bids import Run
from ..core.errors import InputError
from ..core.progress import progress_bar
from ..maps.dualreg import dual_regression
from ..maps.ica import match_templates, run_group_ica
from ..maps.regions import Region, region_masks
from ..maps.roi import compute_roi_matrices, extract_roi_values
from ..maps.firstlevel import seed_glm_maps
from ..maps.seed import compute_seed_maps
from ..maps.series import BoldInput
from ..stats import randomise
from ..stats.design import save_design
from ..stats.combine import write_across
from ..stats.flame import McmcOptions, run_flame
from ..stats.grf import parametric_glm
from ..stats.tables import cluster_table
from ..stats.spatial import spatial_transforms
from ..subject.confounds import framewise_displacement, load_motion
from ..subject.denoise import RunFiles, denoise_runs, prepare_run
from ..subject.qc import qc_table
from .demographics import table_one
from .report import write_report
from .results import corrp_path, denoised_outputs, map_keys, model_contrasts, run_dir, significant_voxels, stat_root
from .roi_stats import roi_tests
from .schema import (FLAME_METHODS, STEP_KEYS, Study, cluster_options, denoise_options, grf_options, load_study,
                     permutation_options, model_design, model_table, network_names, region_files, region_names,
                     study_keys, study_regions, tfce_options)
from .stamps import Stamps

__all__ = [
    "STEPS",
    "StepRecord",
    "StudyResult",
    "run_study",
    "cluster_t_threshold",
]

#: Steps of :func:`run_study`, in order.
STEPS = ("qc", "denoise", "seeds", "ica", "group", "clusters", "rois", "table1", "report")


@dataclass
class StepRecord:
    """What happened to one step: ``ran``, ``skipped`` (up to date) or ``disabled``."""

    name: str
    status: str
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


@dataclass
class StudyResult:
    """Output of :func:`run_study`: the steps in order and the report path."""

    out_dir: Path
    steps: list[StepRecord]
    report: Path

    def status(self) -> dict[str, str]:
        """``{step: status}``."""
        return {s.name: s.status for s in self.steps}


# --------------------------------------------------------------------------- the steps


@dataclass
class _Context:
    study: Study
    out: Path
    device: str
    progress: bool

    def qc_table(self) -> pd.DataFrame:
        return io.read_tsv(self.out / "qc" / "qc.tsv", what="QC table")

    def kept_runs(self) -> list[Run]:
        qc = self.qc_table()
        excluded = set(qc.loc[qc["excluded"].astype(bool), "run"].astype(str))
        return [r for r in self.study.runs if r.prefix not in excluded]

    def denoised(self, run: Run) -> Path:
        return denoised_outputs(self.out, run)["bold"]

    def seed_map(self, run: Run) -> Path:
        return self.out / "seeds" / f"{run.prefix}_stat-z_seedmap.nii.gz"

    def seed_glm(self, run: Run, seed: str, stat: str) -> Path:
        """A run's first-level ``cope`` or ``varcope`` of one seed (FLAME inference)."""
        return self.out / "seeds" / f"{run.prefix}_seed-{seed}_{stat}.nii.gz"


def _run_files(run: Run) -> list[Path]:
    return [p for p in (run.bold, run.mask, run.confounds, run.physio, run.wm, run.csf, run.motion, run.censor) if p is not None]


def _step_qc(ctx: _Context) -> list[Path]:
    settings = ctx.study.section("qc")
    rows = []
    with progress_bar("qc", len(ctx.study.runs), enabled=ctx.progress) as advance:
        for run in ctx.study.runs:
            if run.confounds is None and run.motion is None:
                raise InputError(f"QC needs motion parameters: no *_desc-confounds_timeseries.tsv beside {run.bold}")
            params = load_motion(confounds=run.confounds, motion_par=run.motion, bold=run.bold)
            rows.append(({"run": run.prefix, "participant_id": ctx.study.participant_id(run), "session": run.session or ""}, params))
            advance()
    table = qc_table(rows, ctx.study.options("qc"))
    fd = pd.concat([pd.DataFrame({"run": ids["run"], "volume": np.arange(len(params)), "framewise_displacement": framewise_displacement(params)})
                    for ids, params in rows], ignore_index=True)  # the report draws each run's trace
    return [io.write_tsv(table, ctx.out / "qc" / "qc.tsv", params={"thresholds": settings}, sidecar=True),
            io.write_tsv(fd, ctx.out / "qc" / "framewise_displacement.tsv", float_format="%.6g")]


def _step_denoise(ctx: _Context) -> list[Path]:
    runs = ctx.kept_runs()
    files = [RunFiles.from_run(r) for r in runs]
    options = denoise_options(ctx.study.config, ctx.study.path)
    for run_files in files:  # every run checked (headers, lengths, columns, dof) before any output
        prepare_run(run_files, options, device=ctx.device, load_data=False)
    out_dirs = [run_dir(ctx.out, "denoise", r) for r in runs]
    written = []
    with progress_bar("denoise", len(runs), enabled=ctx.progress) as advance:
        for paths in denoise_runs(files, out_dirs, options, device=ctx.device,
                                  batch_size=ctx.study.section("denoise")["batch_size"], on_run=advance):
            written.extend(paths.values())
    return written


def _step_seeds(ctx: _Context) -> list[Path]:
    inputs = [BoldInput(r.prefix, ctx.denoised(r), r.mask) for r in ctx.kept_runs()]
    regions = study_regions(ctx.study, "seeds")
    written = compute_seed_maps(inputs, regions, ctx.out / "seeds", layout="subject", stats=("z",), device=ctx.device, progress=ctx.progress)
    if ctx.study.section("inference")["method"] in FLAME_METHODS:  # FEAT's first level: copes and their variances
        written += seed_glm_maps(inputs, regions, ctx.out / "seeds", prewhiten="film", device=ctx.device,
                                 params={"step": "seeds"})
    return written


def _step_ica(ctx: _Context) -> list[Path]:
    runs = ctx.kept_runs()
    paths = [ctx.denoised(r) for r in runs]
    folder = ctx.out / "ica"
    ic_path = folder / "melodic_IC.nii.gz"
    run_group_ica(paths, folder, ctx.study.options("ica"), device=ctx.device, progress=ctx.progress)
    io.write_tsv(pd.DataFrame({"run": [r.prefix for r in runs]}), folder / "runs.tsv")
    names = network_names(ctx.study.config)
    if names:
        templates = ctx.study.ica_templates or _network_templates(ctx.study.config, ic_path, folder / "templates.nii.gz")
        match_templates(ic_path, templates, folder / "match", mask_path=folder / "mask.nii.gz", names=names,
                        select_path=folder / "networks.nii.gz")
    # ICA's mask is the common mask of these same runs: reuse it rather than read every run again
    dual_regression(ic_path, paths, folder / "dualreg", ctx.study.options("dualreg"), mask_path=folder / "mask.nii.gz",
                    device=ctx.device, progress=ctx.progress)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _network_templates(config: dict, ic_path: Path, path: Path) -> Path:
    """Binary template maps (one volume per ``[[networks]]`` table: spheres at its nodes) on the ICA grid."""
    img = nib.load(str(ic_path))
    reference = nib.Nifti1Image(np.zeros(img.shape[:3], np.float32), img.affine, img.header)
    regions = [Region(n["name"], tuple(tuple(float(v) for v in c) for c in n["nodes"]), n["radius"]) for n in config["networks"]]
    masks = region_masks(regions, reference, what="network template")
    return io.save_image(np.moveaxis(masks, 0, -1).astype(np.float32), reference, path, params={"networks": config["networks"]})


def cluster_t_threshold(z_threshold: float, dof: int) -> float:
    """The t (``dof`` degrees of freedom) with the same upper-tail p as ``z_threshold``.

    The study's ``cluster_threshold`` is a z (the reference study's Z > 2.3);
    the permutation engine forms clusters on t maps, so each model gets the
    t of equal p: ``t = T_dof^-1(Phi(z))``.
    """
    return float(stats.t.isf(stats.norm.sf(z_threshold), dof))


def _spatial(settings: dict, mask: np.ndarray, dof: int, path: Path) -> dict:
    """The spatial statistics of ``[inference] method`` (tfce, cluster; none for voxel) on a model's mask and dof."""
    method = settings["method"]
    extent = cluster_t_threshold(settings["cluster_threshold"], dof) if method == "cluster" else None
    factory = spatial_transforms(tfce=tfce_options(settings, path) if method == "tfce" else None,
                                 clusters=cluster_options(settings, path, extent=extent))
    return {} if factory is None else factory(mask)


def _variance_groups(study: Study, model: dict, table: pd.DataFrame, settings: dict) -> np.ndarray | None:
    """``[inference] variance_groups``: a two-sample model's groups (1, 2) as variance groups; else None (one group)."""
    if not settings["variance_groups"] or model["kind"] != "two-sample":
        return None
    return pd.factorize(table[study.section("inputs")["group_column"]])[0] + 1


def _group_mask(runs: Sequence[Run]) -> np.ndarray:
    masks = [io.load_mask(path, what="brain mask")[0] for path in sorted({r.mask for r in runs})]
    return np.logical_and.reduce(masks)


def _map_source(ctx: _Context, key: str) -> Callable[[Run], np.ndarray]:
    """Reader of one run's 3D map for a map key."""
    kind, name = key.split("-", 1)
    if kind == "seed":
        index = region_names(ctx.study.config, "seeds").index(name)
        return lambda run: np.asarray(nib.load(str(ctx.seed_map(run))).dataobj[..., index], dtype=np.float32)
    folder = ctx.out / "ica"
    order = io.read_tsv(folder / "runs.tsv", what="ICA run order")["run"].astype(str).tolist()
    best = io.read_tsv(folder / "match_best.tsv", what="ICA template match").set_index("template")
    component, sign = int(best.loc[name, "component"]), float(best.loc[name, "sign"])

    def read(run: Run) -> np.ndarray:
        path = folder / "dualreg" / f"dr_stage2_subject{order.index(run.prefix):05d}.nii.gz"
        return sign * np.asarray(nib.load(str(path)).dataobj[..., component], dtype=np.float32)

    return read


def _model_data(read: Callable[[Run], np.ndarray], run_sets: Sequence[tuple[Run, ...]], mask: np.ndarray, *,
                summed: bool = False) -> np.ndarray:
    """One row per observation: the run's map, or of a change model the second run's minus the first's.

    ``summed``: the two maps added instead (the variance of a difference of
    independent estimates, as the reference study summed its varcopes).
    """
    rows = []
    for runs in run_sets:
        maps = [read(r)[mask] for r in runs]
        rows.append(maps[0] if len(maps) == 1 else (maps[1] + maps[0] if summed else maps[1] - maps[0]))
    return np.stack(rows)


def _glm_source(ctx: _Context, key: str, stat: str) -> Callable[[Run], np.ndarray]:
    """Reader of one run's first-level ``cope``/``varcope`` of a seed map key."""
    seed = key.split("-", 1)[1]
    return lambda run: np.asarray(nib.load(str(ctx.seed_glm(run, seed, stat))).dataobj, dtype=np.float32)


def _flame_model(ctx: _Context, key: str, run_sets, mask: np.ndarray, reference, root: Path, folder: Path,
                 mask_path: Path, settings: dict, params: dict) -> list[Path]:
    """FSL FLAME (``flame1``/``flame12``) on the first-level copes and varcopes of one seed, GRF clusters."""
    copes = _model_data(_glm_source(ctx, key, "cope"), run_sets, mask)
    varcopes = _model_data(_glm_source(ctx, key, "varcope"), run_sets, mask, summed=True)
    cope_path = io.save_image(io.unmask(copes, mask), reference, f"{root}_cope_input.nii.gz", params=params)
    varcope_path = io.save_image(io.unmask(varcopes, mask), reference, f"{root}_varcope_input.nii.gz", params=params)
    run_flame(cope_path, varcope_path, folder / "design.mat", folder / "design.con", root.parent, prefix=f"{root.name}_",
              mask_path=mask_path, run_mode=settings["method"], clusters=grf_options(settings, ctx.study.path),
              device=ctx.device, mcmc=McmcOptions(seed=settings["seed"]), params=params)
    return [cope_path, varcope_path, *sorted(p for p in root.parent.glob(f"{root.name}_*") if "_input." not in p.name)]


def _step_group(ctx: _Context) -> list[Path]:
    study, settings = ctx.study, ctx.study.section("inference")
    runs = ctx.kept_runs()
    qc = ctx.qc_table()
    mask = _group_mask(runs)
    reference = nib.load(str(ctx.seed_map(runs[0])))
    reference = nib.Nifti1Image(np.zeros(reference.shape[:3], np.float32), reference.affine, reference.header)
    mask_path = io.save_image(mask.astype(np.uint8), reference, ctx.out / "group" / "mask.nii.gz", sidecar=False, dtype=np.uint8)
    written = [mask_path]
    models = study.section("models")
    with progress_bar("group models", sum(len(map_keys(m)) for m in models), enabled=ctx.progress) as advance:
        for model in models:  # the design and observations are the model's, shared by all its maps
            table, run_sets = model_table(study, qc, model, runs)
            folder = ctx.out / "group" / model["name"]
            design = model_design(study, model, table)
            written += save_design(design, folder / "design")
            written.append(io.write_tsv(table, folder / "observations.tsv"))
            permutation = settings["method"] not in ("grf", *FLAME_METHODS)
            if permutation:
                dof = design.matrix.shape[0] - int(np.linalg.matrix_rank(design.matrix))
                spatial = _spatial(settings, mask, dof, study.path)
            family = []  # (root, result) of the model's permutation tests: one design, the same rearrangements
            for key in map_keys(model):
                root = stat_root(ctx.out, model["name"], key)
                params = {"model": model, "map": key, "inference": settings, "runs": [[r.prefix for r in rs] for rs in run_sets]}
                if settings["method"] in FLAME_METHODS:
                    written += _flame_model(ctx, key, run_sets, mask, reference, root, folder, mask_path, settings, params)
                    advance()
                    continue
                data = _model_data(_map_source(ctx, key), run_sets, mask)
                input_path = io.save_image(io.unmask(data, mask), reference, f"{root}_input.nii.gz", params=params)
                written.append(input_path)
                if settings["method"] == "grf":
                    parametric_glm(input_path, root, design_path=folder / "design.mat", contrast_path=folder / "design.con",
                                   mask_path=mask_path, clusters=grf_options(settings, study.path), device=ctx.device,
                                   params=params)
                    written += sorted(root.parent.glob(f"{root.name}_*"))
                else:
                    result = randomise.run_permutation_test(
                        data, design, permutation=permutation_options(settings, study.path), device=ctx.device, spatial=spatial,
                        design_source=f"model {model['name']}",
                        variance_groups=_variance_groups(study, model, table, settings))
                    params["cluster_t_threshold"] = cluster_t_threshold(settings["cluster_threshold"], dof)
                    written += randomise.write_outputs(result, root, mask, reference, params=params)
                    family.append((root, result))
                advance()
            if family and settings["correct_across"] != "none":
                across = settings["correct_across"]
                write_across([str(root) for root, _ in family], mask, reference, [result for _, result in family],
                             corrcon=across in ("contrasts", "both"), corrmod=across in ("maps", "both"))
                written += sorted(p for root, _ in family for p in root.parent.glob(f"{root.name}_*corrp_*"))
    return written


def _step_clusters(ctx: _Context) -> list[Path]:
    settings = ctx.study.section("inference")
    mask, _ = io.load_mask(ctx.out / "group" / "mask.nii.gz", what="group mask")
    written = []
    for model in ctx.study.section("models"):
        for key in map_keys(model):
            root = stat_root(ctx.out, model["name"], key)
            for contrast in model_contrasts(ctx.out, model["name"], key):
                img = nib.load(f"{root}_zstat{contrast}.nii.gz")
                z = np.asarray(img.dataobj, dtype=np.float64)
                significant = significant_voxels(ctx.out, model["name"], key, contrast, settings)
                corrp = corrp_path(ctx.out, model["name"], key, contrast, settings)  # None: GRF (its own tables)
                corrp = None if corrp is None else np.asarray(nib.load(str(corrp)).dataobj, dtype=np.float64)
                result = cluster_table(np.where(significant, z, 0.0), img.affine, threshold=0.0, mask=mask,
                                       connectivity=settings["connectivity"], corrp=corrp)
                table = result.table.assign(model=model["name"], map=key, contrast=contrast)
                written.append(io.write_tsv(table, f"{root}_clusters_tstat{contrast}.tsv"))
    return written


def _step_rois(ctx: _Context) -> list[Path]:
    study = ctx.study
    runs = ctx.kept_runs()
    rois = study_regions(study, "rois")
    values = extract_roi_values([ctx.seed_map(r) for r in runs], rois)
    folder = ctx.out / "rois"
    written = [io.write_tsv(values, folder / "roi_values.tsv")]
    inputs = [BoldInput(r.prefix, ctx.denoised(r), r.mask) for r in runs]  # seeds and ROIs: the report's matrices and QC-FC
    written += compute_roi_matrices(inputs, study_regions(study, "seeds") + rois, folder / "matrices", device=ctx.device)
    tests = roi_tests(values, _roi_models(ctx, runs), roi_settings=study.section("roi_tests"), subgroups=study.section("subgroups"))
    written.append(io.write_tsv(tests, folder / "roi_tests.tsv", float_format="%.6g"))
    return written


def _roi_models(ctx: _Context, runs: Sequence[Run]) -> list[dict]:
    """Each model's subjects and their rows, for the ROI-level tests."""
    qc = ctx.qc_table()
    out = []
    for model in ctx.study.section("models"):
        table, run_sets = model_table(ctx.study, qc, model, runs)
        out.append({**model, "table": table, "sessions": [[r.session or "" for r in rs] for rs in run_sets],
                    "subject_column": ctx.study.section("inputs")["subject_column"],
                    "group_column": ctx.study.section("inputs")["group_column"]})
    return out


def _step_table1(ctx: _Context) -> list[Path]:
    """Table 1 of the participants some group model used (after QC exclusion), motion from their first session."""
    inputs = ctx.study.section("inputs")
    qc = ctx.qc_table()
    runs = ctx.kept_runs()
    used = set().union(*(model_table(ctx.study, qc, m, runs)[0][inputs["subject_column"]].astype(str)
                         for m in ctx.study.section("models")))
    first = qc[qc["session"].astype(str) == inputs["sessions"][0]]
    table = ctx.study.table[ctx.study.table[inputs["subject_column"]].astype(str).isin(used)].merge(
        first[["participant_id", "mean_rel_rms"]].rename(columns={"participant_id": inputs["subject_column"]}),
        on=inputs["subject_column"], how="left",
    )
    columns = [c for c in table.columns if c not in (inputs["subject_column"], inputs["group_column"])]
    result = table_one(table, group=inputs["group_column"], columns=columns, levels=[inputs["patients"], inputs["controls"]])
    return [io.write_tsv(result, ctx.out / "table1.tsv", float_format="%.6g")]


def _step_report(ctx: _Context) -> list[Path]:
    report = write_report(ctx.study, ctx.out, ctx.out / "report.html")
    return [report, report.with_suffix(".json")]


@dataclass(frozen=True)
class _Step:
    name: str
    run: Callable[[_Context], list[Path]]
    settings: Callable[[Study], Any]
    inputs: Callable[[Study], list[Path]]
    depends: tuple[str, ...]
    enabled: Callable[[Study], bool] = lambda study: True


def _sections(*names: str) -> Callable[[Study], dict]:
    return lambda study: {name: study.config[name] for name in names}


def _participants(study: Study) -> list[Path]:
    return [study.participants]


_STEP_TABLE = (
    _Step("qc", _step_qc, _sections("qc", "inputs"), lambda s: [r.motion or r.confounds for r in s.runs if r.motion or r.confounds], ()),
    _Step("denoise", _step_denoise, _sections("denoise", "qc"), lambda s: [p for r in s.runs for p in _run_files(r)], ("qc",)),
    _Step("seeds", _step_seeds, lambda s: {"seeds": s.config["seeds"], "glm": s.config["inference"]["method"] in FLAME_METHODS},
          lambda s: region_files(s, "seeds"), ("denoise",)),
    _Step("ica", _step_ica, _sections("ica", "dualreg", "networks"), lambda s: [s.ica_templates] if s.ica_templates else [], ("denoise",),
          lambda s: s.config["ica"]["enabled"]),
    _Step("group", _step_group, _sections("models", "inference", "inputs", "derived", "seeds"), _participants, ("qc", "seeds", "ica")),
    _Step("clusters", _step_clusters, _sections("inference"), lambda s: [], ("group",)),
    _Step("rois", _step_rois, _sections("rois", "models", "roi_tests", "subgroups", "inputs", "derived"),
          lambda s: [*_participants(s), *region_files(s, "rois")], ("qc", "seeds")),
    _Step("table1", _step_table1, _sections("inputs", "derived", "models"), _participants, ("qc",)),
    _Step("report", _step_report, lambda s: s.config, lambda s: [], STEPS[:-1]),
)


def run_study(
    study: Study | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str | None = None,
    progress: bool = True,
    on_step: Callable[[StepRecord], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run every step of a study, skipping the ones already up to date.

    Parameters
    ----------
    study : Study or path-like
        A loaded study or its TOML file.
    out_dir : path-like
        Results folder (created).
    device : str, optional
        ``auto``, ``cpu``, ``cuda``...; default: ``[study] device``.
    progress : bool, default True
        Rich progress bars inside the steps.
    on_step : callable, optional
        Called with each :class:`StepRecord` when its step has finished or
        been skipped.
    on_start : callable, optional
        Called with a step's name before it runs (not for skipped steps).

    Returns
    -------
    StudyResult

    Raises
    ------
    OptionError
        A setting a step's library call refuses, worded with the study
        file's keys (``inference.n_perm``; :func:`gpuconn.study.schema.study_keys`).
    """
    if not isinstance(study, Study):
        study = load_study(study)
    device_key = {} if device is not None else {"device": "study.device"}  # else the caller's (study run --device)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(study, out, device or study.section("study")["device"], progress)
    stamps = Stamps(out)
    records = []
    for step in _STEP_TABLE:
        if not step.enabled(study):
            record = StepRecord(step.name, "disabled")
        else:
            key = stamps.key(step.settings(study), step.inputs(study), step.depends)
            if stamps.current(step.name, key):
                record = StepRecord(step.name, "skipped", 0.0, stamps.read(step.name)["outputs"])
            else:
                if on_start is not None:
                    on_start(step.name)
                began = time.perf_counter()
                with study_keys({**STEP_KEYS.get(step.name, {}), **device_key}, study.path):
                    outputs = step.run(ctx)
                seconds = time.perf_counter() - began
                record = StepRecord(step.name, "ran", seconds, stamps.write(step.name, key, outputs, seconds))
        records.append(record)
        if on_step is not None:
            on_step(record)
    return StudyResult(out, records, out / "report.html")
