"""The study file (TOML) and the runner that chains the whole analysis.

A study file names the inputs (a fMRIPrep-style derivatives folder and its
``participants.tsv``) and the settings of every step; :func:`load_study`
validates it completely before anything runs (unknown keys, wrong types,
missing files and missing participants columns are one-line
:class:`~gpuconn.errors.InputError` messages naming the key or file), and
:func:`run_study` runs the steps in order, each by calling the library
module that owns it:

==========  ==============================================================
step        library call
==========  ==============================================================
qc          :func:`gpuconn.qc.qc_table` on each run's motion parameters
denoise     :func:`gpuconn.denoise.denoise_runs` (runs passing QC)
seeds       :func:`gpuconn.seed.compute_seed_maps` (Fisher z per seed)
ica         :func:`gpuconn.ica.run_group_ica`, :func:`gpuconn.ica.match_templates`
            and :func:`gpuconn.dualreg.dual_regression` (when ``[ica] enabled``)
group       :func:`gpuconn.stats.design.build_design`, then per model and map
            (seed map or network) :func:`gpuconn.stats.randomise.run_permutation_test`
            + :func:`~gpuconn.stats.randomise.write_outputs`, or for
            ``method = "grf"`` :func:`gpuconn.stats.grf.parametric_glm`
clusters    :func:`gpuconn.stats.tables.cluster_table` of the significant voxels
rois        :func:`gpuconn.roi.extract_roi_values`, then
            :mod:`gpuconn.roi_stats` (t-tests, correlations, subgroups, FDR)
table1      :func:`gpuconn.demographics.table_one`
report      :func:`gpuconn.report.write_report` (``OUT/report.html``)
==========  ==============================================================

Resuming
--------
Each step ends by writing ``OUT/stamps/<step>.json`` (atomically, after all
of its outputs) holding a SHA-256 of the step's settings, of its input files
(path, size, modification time) and of the stamps of the steps it depends
on, plus the list of its outputs. A step whose stamp matches and whose
outputs all exist is skipped, so a rerun does no work and a run interrupted
mid-step redoes only that step and the ones after it. Every step is
deterministic (seeded), so a resumed run gives the same results.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import time
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from . import io
from .bids import DEFAULT_SPACE, Run, find_runs
from .errors import InputError
from .progress import progress_bar

__all__ = [
    "STEPS",
    "MODEL_KINDS",
    "INFERENCE_METHODS",
    "Study",
    "StepRecord",
    "StudyResult",
    "load_study",
    "template_text",
    "demo_study_path",
    "run_study",
    "model_table",
    "significant_voxels",
    "model_contrasts",
    "map_keys",
    "cluster_t_threshold",
    "check_planted_effects",
    "FOUND_RADIUS_MM",
    "QC_COVARIATES",
]

#: Steps of :func:`run_study`, in order.
STEPS = ("qc", "denoise", "seeds", "ica", "group", "clusters", "rois", "table1", "report")
#: ``[[models]] kind`` values.
MODEL_KINDS = ("two-sample", "paired", "regression")
#: ``[inference] method`` values.
INFERENCE_METHODS = ("cluster", "tfce", "voxel", "grf")

_REQUIRED = object()

#: Defaults of every scalar section; a key absent here is an error.
_SECTIONS: dict[str, dict[str, Any]] = {
    "study": {"name": "study", "device": "auto"},
    "inputs": {
        # exactly one of: fMRIPrep-style derivatives, a glob of first-level .feat folders, afni_proc.py results
        "derivatives": "",
        "feat": "",
        "afni": "",
        "participants": "",
        "space": DEFAULT_SPACE,
        "subject_column": "participant_id",
        "group_column": "group",
        "patients": "cLBP",
        "controls": "HC",
        "sessions": ["pre", "post"],
    },
    "qc": {"abs_threshold": 3.0, "rel_threshold": 2.0, "outlier_metric": "fd", "outlier_threshold": 0.5},
    "denoise": {
        "motion": "6",
        "acompcor": 5,
        "physio": "auto",
        "global_signal": False,
        "censor": "spikes",
        "high_pass": 0.006,
        "low_pass": 0.0,
        "fwhm": 6.0,
        "batch_size": 1,
    },
    "ica": {"enabled": False, "dim": 10, "seed": 0, "templates": "", "template_names": []},
    "derived": {},
    "inference": {
        "method": "cluster",
        "n_perm": 500,
        "seed": 0,
        "cluster_threshold": 2.3,
        "tfce_H": 2.0,
        "tfce_E": 0.5,
        "connectivity": 26,
        "alpha": 0.05,
    },
    "roi_tests": {"alpha": 0.05, "correlate": [], "post_hoc": "tukey"},
    "subgroups": {"variable": "", "edges": [], "labels": []},
}
#: Keys of each entry of the array-of-table sections.
_TABLES: dict[str, dict[str, Any]] = {
    "seeds": {"name": _REQUIRED, "center": _REQUIRED, "radius": 6.0, "mirror": "none"},
    "rois": {"name": _REQUIRED, "center": _REQUIRED, "radius": 4.0, "mirror": "union"},
    "networks": {"name": _REQUIRED, "nodes": [], "radius": 10.0},
    "models": {
        "name": _REQUIRED,
        "kind": _REQUIRED,
        "session": "",
        "group": "",
        "contrast": "",
        "variable": "",
        "seeds": [],
        "networks": [],
        "covariates": [],
    },
}
_CHOICES = {
    ("qc", "outlier_metric"): ("fd", "rms"),
    ("denoise", "motion"): ("6", "24", "none"),
    ("denoise", "physio"): ("auto", "yes", "no"),
    ("denoise", "censor"): ("spikes", "drop"),
    ("inference", "method"): INFERENCE_METHODS,
    ("roi_tests", "post_hoc"): ("tukey", "holm"),
    ("models", "kind"): MODEL_KINDS,
    ("seeds", "mirror"): ("none", "add", "union"),
    ("rois", "mirror"): ("none", "add", "union"),
}
#: Covariates computed by the runner rather than read from participants.tsv.
QC_COVARIATES = ("mean_rel_rms",)


@dataclass
class Study:
    """A validated study file.

    Attributes
    ----------
    path : Path
        The study file (relative paths in it are relative to its folder).
    config : dict
        Every section with defaults filled in.
    derivatives, participants : Path
        Resolved input paths.
    runs : list of gpuconn.bids.Run
        The preprocessed runs found under ``derivatives``.
    table : pandas.DataFrame
        ``participants.tsv`` with the ``[derived]`` columns added.
    """

    path: Path
    config: dict
    derivatives: Path
    participants: Path
    runs: list[Run]
    table: pd.DataFrame
    ica_templates: Path | None = None

    def section(self, name: str) -> Any:
        """One section of :attr:`config`."""
        return self.config[name]


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


# --------------------------------------------------------------------------- loading


def _type_name(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list"}.get(type(value), type(value).__name__)


def _check_value(where: str, key: str, value: Any, default: Any, source: Path) -> Any:
    if default is _REQUIRED or default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(default, float):
            value = float(value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise InputError(f"{source}: {where}.{key} must be {_type_name(default)}, got {value!r}")
    return value


def _fill(where: str, given: dict, schema: dict, source: Path) -> dict:
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise InputError(f"{source}: unknown key {where}.{unknown[0]}; known keys of [{where}]: {', '.join(schema)}")
    out = {}
    for key, default in schema.items():
        if key not in given:
            if default is _REQUIRED:
                raise InputError(f"{source}: [{where}] needs the key {key!r}")
            out[key] = list(default) if isinstance(default, list) else default
            continue
        value = _check_value(where, key, given[key], default, source)
        choices = _CHOICES.get((where, key))
        if choices is not None and value not in choices:
            raise InputError(f"{source}: {where}.{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
        out[key] = value
    return out


def _parse(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"study file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from None


def _validate(raw: dict, path: Path) -> dict:
    known = set(_SECTIONS) | set(_TABLES)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{path}: unknown section [{unknown[0]}]; known sections: {', '.join(sorted(known))}")
    config = {}
    for name, schema in _SECTIONS.items():
        given = raw.get(name, {})
        if not isinstance(given, dict):
            raise InputError(f"{path}: {name} must be a [{name}] table")
        if name == "derived":
            bad = [k for k, v in given.items() if not isinstance(v, str)]
            if bad:
                raise InputError(f"{path}: derived.{bad[0]} must be an expression string such as \"pain_post - pain_pre\"")
            config[name] = dict(given)
            continue
        config[name] = _fill(name, given, schema, path)
    for name, schema in _TABLES.items():
        entries = raw.get(name, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError(f"{path}: {name} must be written as [[{name}]] tables")
        config[name] = [_fill(name, entry, schema, path) for entry in entries]
    _check_regions(config, path)
    _check_models(config, path)
    _check_inference(config, path)
    return config


def _check_regions(config: dict, path: Path) -> None:
    from .seed import sphere_regions

    for kind in ("seeds", "rois"):
        names = [entry["name"] for entry in config[kind]]
        if len(set(names)) != len(names):
            raise InputError(f"{path}: [[{kind}]] names must be unique, got {names}")
        for entry in config[kind]:
            center = entry["center"]
            if not (isinstance(center, list) and len(center) == 3 and all(isinstance(v, (int, float)) for v in center)):
                raise InputError(f"{path}: {kind} {entry['name']!r}: center must be [x, y, z] in MNI mm, got {center!r}")
            sphere_regions(entry["name"], center, entry["radius"], mirror=entry["mirror"], what="ROI" if kind == "rois" else "seed")
    if not config["seeds"]:
        raise InputError(f"{path}: at least one [[seeds]] table is needed")


def _region_names(config: dict, kind: str) -> list[str]:
    return [region.name for region in _regions(config, kind)]


def _regions(config: dict, kind: str) -> list:
    from .seed import sphere_regions

    what = "ROI" if kind == "rois" else "seed"
    return [r for e in config[kind] for r in sphere_regions(e["name"], e["center"], e["radius"], mirror=e["mirror"], what=what)]


def _network_names(config: dict) -> list[str]:
    """ICA networks: the template image's volume names, else the ``[[networks]]`` tables."""
    return list(config["ica"]["template_names"]) if config["ica"]["templates"] else [n["name"] for n in config["networks"]]


def _check_networks(config: dict, path: Path) -> None:
    ica = config["ica"]
    if ica["templates"] and not ica["template_names"]:
        raise InputError(f"{path}: ica.templates needs ica.template_names (one name per template volume)")
    for network in config["networks"]:
        nodes = network["nodes"]
        if ica["templates"]:
            raise InputError(f"{path}: give ICA templates either as ica.templates (an image) or as [[networks]] nodes, not both")
        if not nodes or not all(isinstance(n, list) and len(n) == 3 and all(isinstance(v, (int, float)) for v in n) for n in nodes):
            raise InputError(f"{path}: networks {network['name']!r}: nodes must be a list of [x, y, z] MNI mm, got {nodes!r}")
    names = _network_names(config)
    for model in config["models"]:
        bad = [n for n in model["networks"] if n not in names]
        if bad:
            raise InputError(f"{path}: model {model['name']!r}: network {bad[0]!r} is not an ICA network of the study ({', '.join(names) or 'none'})")
        if model["networks"] and not ica["enabled"]:
            raise InputError(f"{path}: model {model['name']!r} tests ICA networks but [ica] enabled = false")


def _check_models(config: dict, path: Path) -> None:
    _check_networks(config, path)
    seeds = _region_names(config, "seeds")
    inputs = config["inputs"]
    names = [m["name"] for m in config["models"]]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: [[models]] names must be unique, got {names}")
    if len(inputs["sessions"]) not in (1, 2):
        raise InputError(f"{path}: inputs.sessions must list one or two sessions (first, second), got {inputs['sessions']}")
    for model in config["models"]:
        where = f"{path}: model {model['name']!r}"
        bad = [s for s in model["seeds"] if s not in seeds]
        if bad:
            raise InputError(f"{where}: seed {bad[0]!r} is not a seed of the study ({', '.join(seeds)})")
        model["seeds"] = model["seeds"] or ([] if model["networks"] else seeds)
        if model["kind"] == "regression" and not model["variable"]:
            raise InputError(f"{where}: a regression model needs variable = \"COLUMN\"")
        if model["kind"] in ("paired",) and len(inputs["sessions"]) != 2:
            raise InputError(f"{where}: a paired model needs two inputs.sessions")
        if model["session"] and model["session"] not in inputs["sessions"] + ["change"]:
            raise InputError(f"{where}: session {model['session']!r} is not one of {inputs['sessions'] + ['change']}")
        if model["kind"] == "paired":
            model["session"] = "change"
        elif not model["session"]:
            model["session"] = inputs["sessions"][0]
        if model["kind"] == "two-sample":
            levels = model["contrast"].split(">") if model["contrast"] else [inputs["patients"], inputs["controls"]]
            if len(levels) != 2 or not all(levels):
                raise InputError(f"{where}: contrast must read \"A>B\" with two groups, got {model['contrast']!r}")
            model["contrast"] = ">".join(s.strip() for s in levels)
        elif model["kind"] == "paired" and not model["group"]:
            model["group"] = inputs["patients"]


def _check_inference(config: dict, path: Path) -> None:
    inference = config["inference"]
    if inference["n_perm"] < 0 or int(inference["n_perm"]) != inference["n_perm"]:
        raise InputError(f"{path}: inference.n_perm must be a whole number >= 0 (0 = exhaustive), got {inference['n_perm']}")
    if inference["connectivity"] not in (6, 18, 26):
        raise InputError(f"{path}: inference.connectivity must be 6, 18 or 26, got {inference['connectivity']}")
    if not 0 < inference["alpha"] < 1:
        raise InputError(f"{path}: inference.alpha must be between 0 and 1, got {inference['alpha']}")
    groups = config["subgroups"]
    if groups["variable"]:
        edges, labels = groups["edges"], groups["labels"]
        if len(edges) < 3 or len(labels) != len(edges) - 1 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise InputError(
                f"{path}: subgroups need increasing edges (n + 1 numbers, e.g. [0, 8, 16, 39]) and n labels; "
                f"got edges {edges} and labels {labels}"
            )


def _add_derived(table: pd.DataFrame, derived: dict[str, str], path: Path) -> pd.DataFrame:
    table = table.copy()
    for name, expression in derived.items():
        try:
            table[name] = table.eval(expression)
        except Exception as exc:  # pandas raises several types for a bad expression
            raise InputError(f"{path}: derived.{name} = {expression!r} cannot be computed from participants.tsv: {exc}") from None
    return table


def _check_columns(config: dict, table: pd.DataFrame, participants: Path, path: Path) -> None:
    inputs = config["inputs"]
    needed = [("inputs.subject_column", inputs["subject_column"]), ("inputs.group_column", inputs["group_column"])]
    for model in config["models"]:
        needed += [(f"model {model['name']!r} covariate", c) for c in model["covariates"] if c not in QC_COVARIATES]
        if model["variable"]:
            needed.append((f"model {model['name']!r} variable", model["variable"]))
    needed += [("roi_tests.correlate", column) for column in config["roi_tests"]["correlate"]]
    if config["subgroups"]["variable"]:
        needed.append(("subgroups.variable", config["subgroups"]["variable"]))
    for key, column in needed:
        if column not in table.columns:
            raise InputError(
                f"{path}: {key} {column!r} is not a column of {participants} "
                f"(columns: {', '.join(map(str, table.columns))}); add it or a [derived] expression"
            )
    groups = set(table[inputs["group_column"]].astype(str))
    for key in ("patients", "controls"):
        if inputs[key] not in groups:
            raise InputError(f"{path}: inputs.{key} = {inputs[key]!r} is not a value of column {inputs['group_column']!r} in {participants}")


def load_study(path: str | os.PathLike, *, check_inputs: bool = True) -> Study:
    """Read and validate a study file.

    Parameters
    ----------
    path : path-like
        The TOML study file.
    check_inputs : bool, default True
        Also check the input folder, ``participants.tsv`` and its columns.

    Returns
    -------
    Study

    Raises
    ------
    InputError
        Unknown sections or keys, wrong types or values, missing files or
        columns; the message names the key or file.
    """
    path = Path(path).resolve()
    config = _validate(_parse(path), path)
    inputs = config["inputs"]
    given = [key for key in ("derivatives", "feat", "afni") if inputs[key]]
    if len(given) != 1:
        raise InputError(f"{path}: [inputs] needs one of derivatives (fMRIPrep-style folder), feat (glob of .feat "
                         f"folders) or afni (afni_proc.py results); got {', '.join(given) or 'none'}")
    source = given[0]
    derivatives = _input_root(path.parent, inputs[source], source)
    participants = (path.parent / inputs["participants"]).resolve() if inputs["participants"] else derivatives / "participants.tsv"
    templates = (path.parent / config["ica"]["templates"]).resolve() if config["ica"]["templates"] else None
    if not check_inputs:
        return Study(path, config, derivatives, participants, [], pd.DataFrame(), templates)
    if templates is not None and not templates.is_file():
        raise InputError(f"{path}: ica.templates file not found: {templates}")
    if not derivatives.is_dir():
        raise InputError(f"{path}: inputs.{source} folder not found: {derivatives}")
    if not participants.is_file():
        raise InputError(f"{path}: inputs.participants file not found: {participants}")
    table = _add_derived(io.read_tsv(participants, what="participants"), config["derived"], path)
    _check_columns(config, table, participants, path)
    if source == "feat":
        from .feat import study_runs

        runs = study_runs(str(path.parent / inputs["feat"]))
    else:  # find_runs reads afni_proc.py results folders too
        runs = find_runs(derivatives, space=inputs["space"])
    known = set(table[inputs["subject_column"]].astype(str))
    missing = sorted({f"sub-{r.subject}" for r in runs} - known)
    if missing:
        raise InputError(f"{participants} has no row for {', '.join(missing[:5])} (found under {derivatives}); add them")
    study = Study(path, config, derivatives, participants, runs, table, templates)
    _preflight_models(study)
    return study


def _input_root(base: Path, value: str, source: str) -> Path:
    """The folder of the inputs: the value, or for a ``feat`` glob its part before the first wildcard."""
    if source != "feat":
        return (base / value).resolve()
    parts = Path(value).parts
    fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
    root = base.joinpath(*fixed)
    return (root.parent if len(fixed) == len(parts) else root).resolve()


def _preflight_models(study: Study) -> None:
    """Build every group design from the runs found (before QC) so a bad model fails before any work."""
    placeholder_qc = pd.DataFrame({"run": [r.prefix for r in study.runs], "mean_rel_rms": 0.1 + 1e-3 * np.arange(len(study.runs))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in study.section("models"):
            table, _ = model_table(study, placeholder_qc, model, study.runs)
            if table.empty:
                raise InputError(f"{study.path}: model {model['name']!r} has no subject with the runs it needs "
                                 f"(session {model['session']!r}, group {model['group'] or model['contrast']!r}) under {study.derivatives}")
            _design(study, model, table)


def demo_study_path() -> Path:
    """The bundled demo study file (``gpuconn/data/demo_study.toml``)."""
    return Path(str(resources.files("gpuconn") / "data" / "demo_study.toml"))


def template_text() -> str:
    """A commented study file (the bundled demo study), for ``gpuconn study init``."""
    return demo_study_path().read_text()


# --------------------------------------------------------------------------- stamps


def _file_state(paths: Sequence[Path]) -> list:
    state = []
    for path in sorted({Path(p) for p in paths}):
        if not path.exists():  # a computed input (a FEAT run's reg_standard/mask) has no file of its own
            state.append([str(path), None, None])
            continue
        stat = path.stat()
        state.append([str(path), stat.st_size, stat.st_mtime_ns])
    return state


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _Stamps:
    """Per-step stamps in ``OUT/stamps``: hash of settings + inputs + dependencies, and outputs."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.folder = out_dir / "stamps"

    def path(self, step: str) -> Path:
        return self.folder / f"{step}.json"

    def read(self, step: str) -> dict | None:
        try:
            return json.loads(self.path(step).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def key(self, settings: Any, inputs: Sequence[Path], depends: Sequence[str]) -> str:
        parents = {d: (self.read(d) or {}).get("hash") for d in depends}
        return _digest({"settings": settings, "inputs": _file_state(inputs), "depends": parents})

    def current(self, step: str, key: str) -> bool:
        stamp = self.read(step)
        if stamp is None or stamp.get("hash") != key:
            return False
        return all((self.out_dir / p).exists() for p in stamp.get("outputs", []))

    def write(self, step: str, key: str, outputs: Sequence[Path], seconds: float) -> list[str]:
        relative = sorted({str(Path(p).resolve().relative_to(self.out_dir.resolve())) for p in outputs})
        io.write_json(self.path(step), {"step": step, "hash": key, "seconds": round(seconds, 3), "outputs": relative})
        return relative


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
        from .denoise import RunFiles, output_paths

        return output_paths(RunFiles.from_run(run), self._run_dir("denoise", run))["bold"]

    def seed_map(self, run: Run) -> Path:
        return self.out / "seeds" / f"{run.prefix}_stat-z_seedmap.nii.gz"

    def _run_dir(self, step: str, run: Run) -> Path:
        parts = [f"sub-{run.subject}"] + ([f"ses-{run.session}"] if run.session else [])
        return self.out.joinpath(step, *parts, "func")


def _run_files(run: Run) -> list[Path]:
    return [p for p in (run.bold, run.mask, run.confounds, run.physio, run.wm, run.csf, run.motion, run.censor) if p is not None]


def _step_qc(ctx: _Context) -> list[Path]:
    from .confounds import load_motion
    from .qc import qc_table

    settings = ctx.study.section("qc")
    rows = []
    with progress_bar("qc", len(ctx.study.runs), enabled=ctx.progress) as advance:
        for run in ctx.study.runs:
            if run.confounds is None and run.motion is None:
                raise InputError(f"QC needs motion parameters: no *_desc-confounds_timeseries.tsv beside {run.bold}")
            params = load_motion(confounds=run.confounds, motion_par=run.motion, bold=run.bold)
            rows.append(({"run": run.prefix, "participant_id": f"sub-{run.subject}", "session": run.session or ""}, params))
            advance()
    table = qc_table(rows, **settings)
    return [io.write_tsv(table, ctx.out / "qc" / "qc.tsv", params={"thresholds": settings}, sidecar=True)]


def _denoise_options(ctx: _Context):
    from .denoise import DenoiseOptions

    s = ctx.study.section("denoise")
    qc = ctx.study.section("qc")
    return DenoiseOptions(
        motion=s["motion"],
        acompcor=s["acompcor"],
        physio=s["physio"],
        global_signal=s["global_signal"],
        censor=s["censor"],
        high_pass=s["high_pass"] or None,
        low_pass=s["low_pass"] or None,
        fwhm=s["fwhm"],
        outlier_metric=qc["outlier_metric"],
        outlier_threshold=qc["outlier_threshold"],
    )


def _step_denoise(ctx: _Context) -> list[Path]:
    from .denoise import RunFiles, denoise_runs, prepare_run

    runs = ctx.kept_runs()
    files = [RunFiles.from_run(r) for r in runs]
    options = _denoise_options(ctx)
    for run_files in files:  # every run checked (headers, lengths, columns, dof) before any output
        prepare_run(run_files, options, load_data=False)
    out_dirs = [ctx._run_dir("denoise", r) for r in runs]
    written = []
    with progress_bar("denoise", len(runs), enabled=ctx.progress) as advance:
        for paths in denoise_runs(files, out_dirs, options, device=ctx.device,
                                  batch_size=ctx.study.section("denoise")["batch_size"], on_run=advance):
            written.extend(paths.values())
    return written


def _step_seeds(ctx: _Context) -> list[Path]:
    from .seed import BoldInput, compute_seed_maps

    inputs = [BoldInput(r.prefix, ctx.denoised(r), r.mask) for r in ctx.kept_runs()]
    regions = _regions(ctx.study.config, "seeds")
    written = compute_seed_maps(inputs, regions, ctx.out / "seeds", layout="subject", stats=("z",), device=ctx.device, progress=ctx.progress)
    return written


def _step_ica(ctx: _Context) -> list[Path]:
    from .dualreg import dual_regression
    from .ica import match_templates, run_group_ica

    settings = ctx.study.section("ica")
    runs = ctx.kept_runs()
    paths = [ctx.denoised(r) for r in runs]
    folder = ctx.out / "ica"
    ic_path = folder / "melodic_IC.nii.gz"
    run_group_ica(paths, folder, dim=settings["dim"], seed=settings["seed"], device=ctx.device, progress=ctx.progress)
    io.write_tsv(pd.DataFrame({"run": [r.prefix for r in runs]}), folder / "runs.tsv")
    names = _network_names(ctx.study.config)
    if names:
        templates = ctx.study.ica_templates or _network_templates(ctx.study.config, ic_path, folder / "templates.nii.gz")
        match_templates(ic_path, templates, folder / "match", mask_path=folder / "mask.nii.gz", names=names,
                        select_path=folder / "networks.nii.gz")
    # ICA's mask is the common mask of these same runs: reuse it rather than read every run again
    dual_regression(ic_path, paths, folder / "dualreg", mask_path=folder / "mask.nii.gz", device=ctx.device, progress=ctx.progress)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _network_templates(config: dict, ic_path: Path, path: Path) -> Path:
    """Binary template maps (one volume per ``[[networks]]`` table: spheres at its nodes) on the ICA grid."""
    from .seed import Region, region_masks

    img = nib.load(str(ic_path))
    reference = nib.Nifti1Image(np.zeros(img.shape[:3], np.float32), img.affine, img.header)
    regions = [Region(n["name"], tuple(tuple(float(v) for v in c) for c in n["nodes"]), n["radius"]) for n in config["networks"]]
    masks = region_masks(regions, reference, what="network template")
    return io.save_image(np.moveaxis(masks, 0, -1).astype(np.float32), reference, path, params={"networks": config["networks"]})


def model_table(study: Study, qc: pd.DataFrame, model: dict, runs: Sequence[Run]) -> tuple[pd.DataFrame, list[tuple[Run, ...]]]:
    """Observations of a group model: one row per subject and the runs behind it.

    Parameters
    ----------
    study : Study
    qc : pandas.DataFrame
        The QC table (``run``, ``participant_id``, ``session``, ``mean_rel_rms``...).
    model : dict
        One validated ``[[models]]`` entry.
    runs : sequence of Run
        The runs that passed QC.

    Returns
    -------
    table : pandas.DataFrame
        Participants' rows (with ``mean_rel_rms`` from QC, averaged over the
        runs used) in subject order.
    run_sets : list of tuple of Run
        ``(run,)`` for a session model, ``(first, second)`` for a change model.
    """
    inputs = study.section("inputs")
    subject_col, group_col = inputs["subject_column"], inputs["group_column"]
    table = study.table.copy()
    table[subject_col] = table[subject_col].astype(str)
    by_key = {(f"sub-{r.subject}", r.session or ""): r for r in runs}
    motion = qc.set_index("run")["mean_rel_rms"].to_dict()
    if model["kind"] == "two-sample":
        table = table[table[group_col].astype(str).isin(model["contrast"].split(">"))]
    elif model["group"]:
        table = table[table[group_col].astype(str) == model["group"]]
    sessions = inputs["sessions"] if model["session"] == "change" else [model["session"]]
    rows, run_sets = [], []
    for _, row in table.iterrows():
        found = tuple(by_key.get((row[subject_col], s)) for s in sessions)
        if any(r is None for r in found):
            continue
        rows.append({**row.to_dict(), "mean_rel_rms": float(np.mean([motion[r.prefix] for r in found]))})
        run_sets.append(found)
    return pd.DataFrame(rows, columns=list(table.columns) + ["mean_rel_rms"]), run_sets


def _design(study: Study, model: dict, table: pd.DataFrame):
    from .stats.design import build_design

    inputs = study.section("inputs")
    constant = [c for c in model["covariates"] if table[c].nunique(dropna=False) < 2]
    if constant:
        warnings.warn(f"model {model['name']!r}: covariate(s) {', '.join(constant)} take a single value in its "
                      f"{len(table)} observations and are left out of the design", UserWarning, stacklevel=2)
    covariates = [c for c in model["covariates"] if c not in constant]
    common = dict(covariates=covariates, subject=inputs["subject_column"], source=f"model {model['name']!r}")
    if model["kind"] == "two-sample":
        return build_design(table, "two-sample", group=inputs["group_column"], levels=model["contrast"].split(">"), **common)
    if model["kind"] == "paired":
        return build_design(table, "paired", paired_mode="differences", **common)
    return build_design(table, "regression", variable=model["variable"], **common)


def cluster_t_threshold(z_threshold: float, dof: int) -> float:
    """The t (``dof`` degrees of freedom) with the same upper-tail p as ``z_threshold``.

    The study's ``cluster_threshold`` is a z (the reference study's Z > 2.3);
    the permutation engine forms clusters on t maps, so each model gets the
    t of equal p: ``t = T_dof^-1(Phi(z))``.
    """
    from scipy import stats

    return float(stats.t.isf(stats.norm.sf(z_threshold), dof))


def _spatial(settings: dict, mask: np.ndarray, dof: int) -> dict:
    from .stats.tfce import spatial_transforms

    method = settings["method"]
    factory = spatial_transforms(
        tfce_params={"H": settings["tfce_H"], "E": settings["tfce_E"], "connectivity": 6} if method == "tfce" else None,
        cluster_extent=cluster_t_threshold(settings["cluster_threshold"], dof) if method == "cluster" else None,
        cluster_connectivity=settings["connectivity"],
    )
    return {} if factory is None else factory(mask)


def _group_mask(runs: Sequence[Run]) -> np.ndarray:
    masks = [io.load_mask(path, what="brain mask")[0] for path in sorted({r.mask for r in runs})]
    return np.logical_and.reduce(masks)


def map_keys(model: dict) -> list[str]:
    """The maps a group model tests: ``seed-<name>`` (seed maps) and ``net-<name>`` (dual-regression maps)."""
    return [f"seed-{s}" for s in model["seeds"]] + [f"net-{n}" for n in model["networks"]]


def _map_source(ctx: _Context, key: str) -> Callable[[Run], np.ndarray]:
    """Reader of one run's 3D map for a map key."""
    kind, name = key.split("-", 1)
    if kind == "seed":
        index = _region_names(ctx.study.config, "seeds").index(name)
        return lambda run: np.asarray(nib.load(str(ctx.seed_map(run))).dataobj[..., index], dtype=np.float32)
    folder = ctx.out / "ica"
    order = io.read_tsv(folder / "runs.tsv", what="ICA run order")["run"].astype(str).tolist()
    best = io.read_tsv(folder / "match_best.tsv", what="ICA template match").set_index("template")
    component, sign = int(best.loc[name, "component"]), float(best.loc[name, "sign"])

    def read(run: Run) -> np.ndarray:
        path = folder / "dualreg" / f"dr_stage2_subject{order.index(run.prefix):05d}.nii.gz"
        return sign * np.asarray(nib.load(str(path)).dataobj[..., component], dtype=np.float32)

    return read


def _model_data(read: Callable[[Run], np.ndarray], run_sets: Sequence[tuple[Run, ...]], mask: np.ndarray) -> np.ndarray:
    rows = []
    for runs in run_sets:
        maps = [read(r)[mask] for r in runs]
        rows.append(maps[0] if len(maps) == 1 else maps[1] - maps[0])
    return np.stack(rows)


def _stat_root(out: Path, model: str, key: str) -> Path:
    return out / "group" / model / key


def significant_voxels(out_dir: str | os.PathLike, model: str, key: str, contrast: int, inference: dict) -> np.ndarray:
    """Voxels significant at ``inference['alpha']`` for one model, seed and t contrast.

    Parameters
    ----------
    out_dir : path-like
        A study's results folder.
    model : str
    key : str
        The map tested (:func:`map_keys`: ``seed-<name>`` or ``net-<name>``).
    contrast : int
        1-based t contrast (1: the model's stated direction, 2: the reverse).
    inference : dict
        The ``[inference]`` settings (``method``, ``alpha``).

    Returns
    -------
    ndarray of bool, shape (x, y, z)
        From the ``*_corrp_tstat<i>`` map of the method (``1 - p > 1 - alpha``),
        or for ``grf`` the voxels of significant clusters (``*_thresh_zstat<i>``).
    """
    root = _stat_root(Path(out_dir), model, key)
    if inference["method"] == "grf":
        return np.asarray(nib.load(f"{root}_thresh_zstat{contrast}.nii.gz").dataobj) != 0
    prefix = _CORRP[inference["method"]]
    corrp = np.asarray(nib.load(f"{root}_{prefix}_corrp_tstat{contrast}.nii.gz").dataobj, dtype=np.float64)
    return corrp > 1.0 - inference["alpha"]


_CORRP = {"cluster": "clustere", "tfce": "tfce", "voxel": "vox"}


def model_contrasts(out_dir: str | os.PathLike, model: str, key: str) -> list[int]:
    """The t contrasts (1-based) a group model has results for (``*_zstat<i>`` maps)."""
    root = _stat_root(Path(out_dir), model, key)
    found = [p.name[len(root.name) + len("_zstat"):].split(".")[0] for p in root.parent.glob(f"{root.name}_zstat*.nii.gz")]
    return sorted(int(i) for i in found if i.isdigit())


def _step_group(ctx: _Context) -> list[Path]:
    from .stats.design import save_design
    from .stats.grf import parametric_glm
    from .stats.randomise import run_permutation_test, write_outputs

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
            design = _design(study, model, table)
            written += save_design(design, folder / "design")
            written.append(io.write_tsv(table, folder / "observations.tsv"))
            if settings["method"] != "grf":
                dof = design.matrix.shape[0] - int(np.linalg.matrix_rank(design.matrix))
                spatial = _spatial(settings, mask, dof)
            for key in map_keys(model):
                data = _model_data(_map_source(ctx, key), run_sets, mask)
                root = _stat_root(ctx.out, model["name"], key)
                params = {"model": model, "map": key, "inference": settings, "runs": [[r.prefix for r in rs] for rs in run_sets]}
                input_path = io.save_image(io.unmask(data, mask), reference, f"{root}_input.nii.gz", params=params)
                written.append(input_path)
                if settings["method"] == "grf":
                    parametric_glm(input_path, root, design_path=folder / "design.mat", contrast_path=folder / "design.con",
                                   mask_path=mask_path, z_threshold=settings["cluster_threshold"], cluster_p=settings["alpha"],
                                   device=ctx.device, params=params)
                    written += sorted(root.parent.glob(f"{root.name}_*"))
                else:
                    result = run_permutation_test(data, design, n_perm=settings["n_perm"], seed=settings["seed"], device=ctx.device,
                                                  spatial=spatial, design_source=f"model {model['name']}")
                    params["cluster_t_threshold"] = cluster_t_threshold(settings["cluster_threshold"], dof)
                    written += write_outputs(result, root, mask, reference, params=params)
                advance()
    return written


def _step_clusters(ctx: _Context) -> list[Path]:
    from .stats.tables import cluster_table

    settings = ctx.study.section("inference")
    mask, _ = io.load_mask(ctx.out / "group" / "mask.nii.gz", what="group mask")
    written = []
    for model in ctx.study.section("models"):
        for key in map_keys(model):
            root = _stat_root(ctx.out, model["name"], key)
            for contrast in model_contrasts(ctx.out, model["name"], key):
                img = nib.load(f"{root}_zstat{contrast}.nii.gz")
                z = np.asarray(img.dataobj, dtype=np.float64)
                significant = significant_voxels(ctx.out, model["name"], key, contrast, settings)
                result = cluster_table(np.where(significant, z, 0.0), img.affine, threshold=0.0, mask=mask, connectivity=settings["connectivity"])
                table = result.table.assign(model=model["name"], map=key, contrast=contrast)
                written.append(io.write_tsv(table, f"{root}_clusters_tstat{contrast}.tsv"))
    return written


def _step_rois(ctx: _Context) -> list[Path]:
    from .roi import extract_roi_values
    from .roi_stats import roi_tests

    study = ctx.study
    runs = ctx.kept_runs()
    rois = _regions(study.config, "rois")
    values = extract_roi_values([ctx.seed_map(r) for r in runs], rois)
    folder = ctx.out / "rois"
    written = [io.write_tsv(values, folder / "roi_values.tsv")]
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
    from .demographics import table_one

    inputs = ctx.study.section("inputs")
    qc = ctx.qc_table()
    first = qc[qc["session"].astype(str) == inputs["sessions"][0]]
    table = ctx.study.table.merge(
        first[["participant_id", "mean_rel_rms"]].rename(columns={"participant_id": inputs["subject_column"]}),
        on=inputs["subject_column"], how="left",
    )
    columns = [c for c in table.columns if c not in (inputs["subject_column"], inputs["group_column"])]
    result = table_one(table, group=inputs["group_column"], columns=columns, levels=[inputs["patients"], inputs["controls"]])
    return [io.write_tsv(result, ctx.out / "table1.tsv", float_format="%.6g")]


def _step_report(ctx: _Context) -> list[Path]:
    from .report import write_report

    return [write_report(ctx.study, ctx.out, ctx.out / "report.html")]


_EFFECT_KINDS = {"two_sample": "two-sample", "paired": "paired", "regression": "regression"}
#: Radius (mm) around a ground-truth node within which a significant voxel counts as finding it.
FOUND_RADIUS_MM = 10.0


def check_planted_effects(study: Study, out_dir: str | os.PathLike, ground_truth: dict) -> pd.DataFrame:
    """Whether each planted effect of a simulated study was found, and the null regions not.

    An effect is *found on the map* when a voxel within :data:`FOUND_RADIUS_MM`
    of its target region's nodes is significant in the model's stated
    direction (:func:`significant_voxels`, contrast 1), and *found at the
    ROI* when the ROI-level test of that model (``rois/roi_tests.tsv``) has
    ``p < alpha`` with the planted sign. A null region (``aTPJ``) is checked
    with the same criterion for every model: the model's stated (one-sided)
    hypothesis, contrast 1 and a positive ROI effect. Effects in the other
    direction are in the cluster tables and ``rois/roi_tests.tsv``. Finally,
    for each model, the voxels of significant clusters (every contrast) that
    do not reach within :data:`FOUND_RADIUS_MM` of the model's planted
    targets are counted (``kind='elsewhere'``).

    Parameters
    ----------
    study : Study
    out_dir : path-like
        The study's results folder (after :func:`run_study`).
    ground_truth : dict
        ``ground_truth.json`` of :func:`gpuconn.simulate.simulate_study`.

    Returns
    -------
    pandas.DataFrame
        One row per (effect, null region or elsewhere, model): ``kind``
        ('effect', 'null' or 'elsewhere'), ``name``, ``model``, ``seed``, ``region``, ``map_voxels``
        (significant voxels near the region), ``roi_p``, ``roi_effect``,
        ``found`` (map or ROI) and ``expected`` (True for effects).
    """
    from .seed import Region, region_masks

    out = Path(out_dir)
    inference = study.section("inference")
    alpha = study.section("roi_tests")["alpha"]
    mask_img = nib.load(str(out / "group" / "mask.nii.gz"))
    mask = np.asarray(mask_img.dataobj) > 0
    tests = io.read_tsv(out / "rois" / "roi_tests.tsv", what="ROI tests")
    primary = {"two-sample": "two_sample_t", "paired": "paired_t", "regression": "correlation"}
    regions = ground_truth["regions"]

    def near(region: str) -> np.ndarray:
        centers = tuple(tuple(float(v) for v in c) for c in regions[region])
        return region_masks([Region(region, centers, FOUND_RADIUS_MM)], mask_img, mask=mask, what="ROI")[0]

    def row(kind: str, name: str, model: dict, seed: str, region: str) -> dict:
        voxels = int((significant_voxels(out, model["name"], f"seed-{seed}", 1, inference) & near(region)).sum())
        hit = tests[(tests["model"] == model["name"]) & (tests["map"] == f"seed-{seed}_stat-z") & (tests["roi"] == region)
                     & (tests["test"] == primary[model["kind"]])]
        roi_p = float(hit["p"].iloc[0]) if len(hit) else np.nan
        roi_effect = float(hit["effect"].iloc[0]) if len(hit) else np.nan
        roi_found = bool(roi_p < alpha and roi_effect > 0)
        return {"kind": kind, "name": name, "model": model["name"], "seed": seed, "region": region, "map_voxels": voxels,
                "roi_p": roi_p, "roi_effect": roi_effect, "found": bool(voxels > 0 or roi_found), "expected": kind == "effect"}

    rows, targets = [], {}
    for effect in ground_truth["effects"]:
        for model in study.section("models"):
            if model["kind"] == _EFFECT_KINDS.get(effect["test"]) and effect["seed"] in model["seeds"] and (
                effect["test"] != "regression" or model["variable"] == effect.get("variable")
            ):
                rows.append(row("effect", effect["name"], model, effect["seed"], effect["target"]))
                targets.setdefault((model["name"], effect["seed"]), []).append(effect["target"])
    seeds = {e["seed"] for e in ground_truth["effects"]}
    for region in ground_truth.get("null_regions", []):
        for model in study.section("models"):
            for seed in sorted(seeds & set(model["seeds"])):
                rows.append(row("null", region, model, seed, region))
    for model in study.section("models"):
        for seed in sorted(seeds & set(model["seeds"])):
            allowed = np.zeros(mask.shape, bool)
            for target in targets.get((model["name"], seed), []):
                allowed |= near(target)
            key = f"seed-{seed}"
            voxels = sum(_voxels_in_other_clusters(significant_voxels(out, model["name"], key, c, inference), allowed, mask_img.affine)
                         for c in model_contrasts(out, model["name"], key))
            rows.append({"kind": "elsewhere", "name": "outside the planted targets", "model": model["name"], "seed": seed,
                         "region": "rest of the brain", "map_voxels": voxels, "roi_p": np.nan, "roi_effect": np.nan,
                         "found": voxels > 0, "expected": False})
    return pd.DataFrame(rows, columns=["kind", "name", "model", "seed", "region", "map_voxels", "roi_p", "roi_effect", "found", "expected"])


def _voxels_in_other_clusters(significant: np.ndarray, allowed: np.ndarray, affine: np.ndarray) -> int:
    """Voxels of the significant clusters (26-connected) that touch no ``allowed`` voxel."""
    from .stats.tables import cluster_table

    if not significant.any():
        return 0
    index = cluster_table(significant.astype(np.float64), affine, threshold=0.5, mask=significant).index_image
    touching = np.unique(index[allowed & (index > 0)])
    return int(((index > 0) & ~np.isin(index, touching)).sum())


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
    _Step("seeds", _step_seeds, _sections("seeds"), lambda s: [], ("denoise",)),
    _Step("ica", _step_ica, _sections("ica", "networks"), lambda s: [s.ica_templates] if s.ica_templates else [], ("denoise",),
          lambda s: s.config["ica"]["enabled"]),
    _Step("group", _step_group, _sections("models", "inference", "inputs", "derived", "seeds"), _participants, ("qc", "seeds", "ica")),
    _Step("clusters", _step_clusters, _sections("inference"), lambda s: [], ("group",)),
    _Step("rois", _step_rois, _sections("rois", "models", "roi_tests", "subgroups", "inputs", "derived"), _participants, ("qc", "seeds")),
    _Step("table1", _step_table1, _sections("inputs", "derived"), _participants, ("qc",)),
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
    """
    if not isinstance(study, Study):
        study = load_study(study)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(study, out, device or study.section("study")["device"], progress)
    stamps = _Stamps(out)
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
                outputs = step.run(ctx)
                seconds = time.perf_counter() - began
                record = StepRecord(step.name, "ran", seconds, stamps.write(step.name, key, outputs, seconds))
        records.append(record)
        if on_step is not None:
            on_step(record)
    return StudyResult(out, records, out / "report.html")
