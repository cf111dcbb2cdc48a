"""The study file (TOML): its keys and defaults, validation, and the group models it defines.

A study file names the inputs (a fMRIPrep-style derivatives folder and its
``participants.tsv``) and the settings of every step; :func:`load_study`
validates it completely before anything runs (unknown keys, wrong types,
missing files and missing participants columns are one-line
:class:`~gpuconn.core.errors.InputError` messages naming the key or file).
:func:`model_table` and :func:`model_design` give a ``[[models]]`` entry's
observations and design (used by the preflight check here and by the
runner's group and ROI steps). :func:`study_regions` gives the
``[[seeds]]``/``[[rois]]`` as :class:`~gpuconn.maps.regions.Region` objects
(spheres, masks or atlas labels; their image files checked at load), and
:func:`region_files` the files they are read from, for the resume stamps.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import os
import tomllib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import afni, io
from ..core.atlas import sibling_label_table
from ..core.bids import DEFAULT_SPACE, Run, find_runs
from ..core.feat import study_runs
from ..core.errors import InputError, OptionError
from ..maps import ROI_RADIUS_MM, SEED_RADIUS_MM
from ..maps.options import DualRegOptions, ICAOptions
from ..maps.regions import Region, atlas_label, atlas_values, image_region, sphere_regions
from ..stats.options import ClusterOptions, GrfOptions, PermutationOptions, TfceOptions
from ..stats.design import build_design
from ..subject.options import DenoiseOptions, QcOptions

__all__ = [
    "MODEL_KINDS",
    "INFERENCE_METHODS",
    "FLAME_METHODS",
    "ACCEL_METHODS",
    "CORRECT_ACROSS",
    "QC_COVARIATES",
    "Study",
    "load_study",
    "template_text",
    "demo_study_path",
    "report_template",
    "study_regions",
    "entry_regions",
    "region_names",
    "region_files",
    "network_names",
    "model_table",
    "model_design",
    "grf_options",
    "tfce_options",
    "cluster_options",
    "denoise_options",
    "permutation_options",
    "STEP_KEYS",
    "study_keys",
]


#: ``[[models]] kind`` values.
MODEL_KINDS = ("two-sample", "paired", "regression")



#: ``[inference] method`` values.
INFERENCE_METHODS = ("cluster", "tfce", "voxel", "grf", "flame1", "flame12")
#: Methods that model first-level variances (FSL FLAME): seed maps as copes with varcopes, GRF clusters.
FLAME_METHODS = ("flame1", "flame12")
#: ``[inference] accel`` values: none, or PALM's accelerations that give FWER p (``randomise --accel``).
ACCEL_METHODS = ("none", "tail", "gamma")
#: ``[inference] correct_across`` values: FWER within each map and contrast (none), across a map's contrasts, across
#: a model's maps (seeds/networks: randomise --corrmod), or both.
CORRECT_ACROSS = ("none", "contrasts", "maps", "both")



_REQUIRED = object()


def _option_keys(cls: type, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A section's keys and defaults from an options object's fields but ``skip`` (TOML has no None: 0 stands for it)."""
    return {f.name: 0 if f.default is None else f.default for f in fields(cls) if f.name not in skip}


#: Sections filled and checked by a stage's options object (:meth:`Study.options`); a field that is not a key of
#: the section keeps the object's default.
_OPTION_SECTIONS: dict[str, type] = {"qc": QcOptions, "ica": ICAOptions, "dualreg": DualRegOptions}

# DualRegOptions' stage 3 (randomise on every component) is not a [dualreg] key: the study's [[models]] test networks.
_DUALREG_STAGE3 = ("n_perm", "seed", "one_sample")


@contextlib.contextmanager
def study_keys(keys: Mapping[str, str], path: Path) -> Iterator[None]:
    """An OptionError raised in the block, re-worded with the study file's keys (``keys``: parameter -> key).

    The library names its parameters (``{n_perm}``); a message naming some
    of ``keys`` is raised again with those written as keys
    (``inference.n_perm``) after the study file's path, its other
    parameters left for the CLI to name (``--device`` given to ``study
    run``). A message naming none of them passes unchanged.
    """
    try:
        yield
    except OptionError as exc:
        if not set(exc.params) & set(keys):
            raise
        raise exc.keyed(keys, prefix=f"{path}: ") from None


def _options_object(cls: type, values: dict[str, Any], keys: dict[str, str], path: Path) -> Any:
    """``cls(**values)``; its OptionError re-worded with the study file's keys (``keys``: field -> key)."""
    with study_keys(keys, path):
        return cls(**values)


def _section_options(config: dict, name: str, path: Path) -> Any:
    cls = _OPTION_SECTIONS[name]
    given = config[name]
    values = {f.name: None if f.default is None and given[f.name] == 0 else given[f.name]
              for f in fields(cls) if f.name in given}
    return _options_object(cls, values, {f.name: f"{name}.{f.name}" for f in fields(cls)}, path)


# [qc] keys of DenoiseOptions' outlier rule; its other fields are [denoise] keys of the same names.
_QC_FIELDS = ("outlier_metric", "outlier_threshold")


# DenoiseOptions field -> its key ([denoise], the outlier rule in [qc]).
_DENOISE_KEYS = {f.name: f"{'qc' if f.name in _QC_FIELDS else 'denoise'}.{f.name}" for f in fields(DenoiseOptions)}


def denoise_options(config: dict, path: Path) -> DenoiseOptions:
    """The denoising model of a study (``[denoise]``, with the outlier rule of ``[qc]``; 0 stands for None)."""
    values = {f.name: config["qc" if f.name in _QC_FIELDS else "denoise"][f.name] for f in fields(DenoiseOptions)}
    values |= {name: values[name] or None for name in ("high_pass", "low_pass", "tr")} | {"columns": tuple(values["columns"])}
    return _options_object(DenoiseOptions, values, _DENOISE_KEYS, path)


# PermutationOptions fields a study sets, with the other [inference] key the permutation test takes.
_PERMUTATION_KEYS = {name: f"inference.{name}" for name in ("n_perm", "seed", "accel")}


def permutation_options(inference: dict, path: Path) -> PermutationOptions:
    """The rearrangements of a study's permutation methods (``[inference]`` n_perm, seed, accel)."""
    values = {"n_perm": inference["n_perm"], "seed": inference["seed"],
              "accel": None if inference["accel"] == "none" else inference["accel"]}
    return _options_object(PermutationOptions, values, _PERMUTATION_KEYS, path)


# GrfOptions field -> its [inference] key (GRF cluster inference: methods grf, flame1, flame12).
_GRF_KEYS = {"cluster_z": "inference.cluster_threshold", "cluster_p": "inference.alpha"}


def grf_options(inference: dict, path: Path) -> GrfOptions:
    """GRF cluster inference as a study's ``[inference]`` section sets it (``cluster_threshold``, ``alpha``)."""
    values = {name: inference[key.split(".")[1]] for name, key in _GRF_KEYS.items()}
    return _options_object(GrfOptions, values, _GRF_KEYS, path)


# TfceOptions field -> its [inference] key (method tfce; every field, defaults randomise -T's).
_TFCE_KEYS = {"H": "inference.tfce_H", "E": "inference.tfce_E", "connectivity": "inference.tfce_connectivity",
              "dh": "inference.tfce_dh", "method": "inference.tfce_method"}


def tfce_options(inference: dict, path: Path) -> TfceOptions:
    """TFCE as a study's ``[inference]`` section sets it (``tfce_H``, ``tfce_E``, ``tfce_connectivity``,
    ``tfce_dh`` with 0 for randomise's step, ``tfce_method``; the defaults are randomise ``-T``'s)."""
    values = {name: inference[key.split(".")[1]] for name, key in _TFCE_KEYS.items()}
    values["dh"] = values["dh"] or None
    return _options_object(TfceOptions, values, _TFCE_KEYS, path)


# ClusterOptions field -> its [inference] key (method cluster; the threshold is cluster_threshold as each model's t).
_CLUSTER_KEYS = {"connectivity": "inference.connectivity"}


def cluster_options(inference: dict, path: Path, *, extent: float | None = None) -> ClusterOptions:
    """Permutation cluster inference as a study's ``[inference]`` sets it (``connectivity``).

    ``extent`` is the cluster-forming t of a model (the runner turns
    ``cluster_threshold``, a z, into the t of each model's dof); None checks
    the section alone.
    """
    return _options_object(ClusterOptions, {"extent": extent, "connectivity": inference["connectivity"]},
                           _CLUSTER_KEYS, path)


# build_design parameter -> the study setting it comes from (model_design).
_DESIGN_KEYS = {"group": "inputs.group_column", "levels": "models.contrast", "variable": "models.variable"}

#: Library parameter -> study key, for the messages of each runner step's library calls
#: (:func:`study_keys`; ``device`` is ``study.device`` unless ``study run --device`` gave it).
STEP_KEYS: dict[str, dict[str, str]] = {
    "qc": {f.name: f"qc.{f.name}" for f in fields(QcOptions)},
    "denoise": _DENOISE_KEYS,
    "ica": {f.name: f"ica.{f.name}" for f in fields(ICAOptions)},
    "group": {**_PERMUTATION_KEYS, "variance_groups": "inference.variance_groups", **_GRF_KEYS, **_DESIGN_KEYS,
              **_TFCE_KEYS, **_CLUSTER_KEYS},
    "clusters": _CLUSTER_KEYS,
}
# The defaults of [denoise] are DenoiseOptions' own.
_DENOISE = DenoiseOptions()
# The defaults of [inference]'s TFCE and cluster keys are their options objects' own.
_TFCE, _CLUSTERS = TfceOptions(), ClusterOptions()

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
    # the fields of QcOptions (the outlier rule is also denoising's)
    "qc": _option_keys(QcOptions),
    # every field of DenoiseOptions except the outlier rule (from [qc]), with its defaults; 0 stands for None
    "denoise": {
        "motion": _DENOISE.motion,
        "acompcor": _DENOISE.acompcor,
        "acompcor_mode": _DENOISE.acompcor_mode,
        "tissue_threshold": _DENOISE.tissue_threshold,
        "erode": _DENOISE.erode,
        "physio": _DENOISE.physio,
        "global_signal": _DENOISE.global_signal,
        "censor": _DENOISE.censor,
        "high_pass": _DENOISE.high_pass or 0.0,
        "low_pass": _DENOISE.low_pass or 0.0,
        "fwhm": _DENOISE.fwhm,
        "columns": list(_DENOISE.columns),
        "min_dof": _DENOISE.min_dof,
        "tr": _DENOISE.tr or 0.0,
        "batch_size": 1,
    },
    # the fields of ICAOptions (0 stands for None) between the study's own keys
    "ica": {"enabled": False, **_option_keys(ICAOptions), "templates": "", "template_names": []},
    # dual regression of every run on the ICA components: DualRegOptions' fields but stage 3 (0 stands for None)
    "dualreg": _option_keys(DualRegOptions, skip=_DUALREG_STAGE3),
    "derived": {},
    "inference": {
        "method": "cluster",
        "n_perm": 500,
        "seed": 0,
        "cluster_threshold": 2.3,
        "tfce_H": _TFCE.H,
        "tfce_E": _TFCE.E,
        "tfce_connectivity": _TFCE.connectivity,
        "tfce_dh": _TFCE.dh or 0.0,
        "tfce_method": _TFCE.method,
        "connectivity": _CLUSTERS.connectivity,
        "alpha": 0.05,
        # permutation methods only (cluster, tfce, voxel): PALM's tail/gamma acceleration of the FWER p, variance
        # groups (two-sample models: patients and controls), FWER across contrasts and/or the maps of a model
        "accel": "none",
        "variance_groups": False,
        "correct_across": "none",
    },
    "roi_tests": {"alpha": 0.05, "correlate": [], "post_hoc": "tukey"},
    "subgroups": {"variable": "", "edges": [], "labels": []},
    # the report's anatomical underlay: a T1 template in the study's space (default: the mean EPI of the included runs)
    "report": {"template": ""},
}



# Keys of a [[seeds]]/[[rois]] entry that is an image region (image instead of center): a mask, or one label of an
# atlas (a number, or a name from the atlas_labels table, else the table beside the atlas or an AFNI atlas's own).
_IMAGE_KEYS = {"image": "", "label": None, "atlas_labels": ""}
# Keys of a [[seeds]]/[[rois]] entry that is a sphere (center instead of image).
_SPHERE_KEYS = ("radius", "mirror")

#: Keys of each entry of the array-of-table sections.
_TABLES: dict[str, dict[str, Any]] = {
    "seeds": {"name": _REQUIRED, "center": None, "radius": SEED_RADIUS_MM, "mirror": "none", **_IMAGE_KEYS},
    "rois": {"name": _REQUIRED, "center": None, "radius": ROI_RADIUS_MM, "mirror": "union", **_IMAGE_KEYS},
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
    ("denoise", "motion"): ("6", "24", "none"),
    ("denoise", "physio"): ("auto", "yes", "no"),
    ("denoise", "censor"): ("spikes", "drop"),
    ("denoise", "acompcor_mode"): ("combined", "separate"),
    ("inference", "method"): INFERENCE_METHODS,
    ("inference", "accel"): ACCEL_METHODS,
    ("inference", "correct_across"): CORRECT_ACROSS,
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
    runs : list of gpuconn.core.bids.Run
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

    def options(self, name: str) -> Any:
        """The options object of a stage's section (``ica``: :class:`gpuconn.maps.options.ICAOptions`, ``dualreg``:
        :class:`~gpuconn.maps.options.DualRegOptions`)."""
        return _section_options(self.config, name, self.path)

    def participant_id(self, run: Run) -> str:
        """The run's subject as the participants table spells it (``sub-001`` or ``001``); ``sub-<label>`` when absent.

        Outputs and tables carry this spelling, so they join with the
        participants table whichever form the folders or
        ``--participant-label`` used.
        """
        return self._participant_ids.get(run.subject, f"sub-{run.subject}")

    @functools.cached_property
    def _participant_ids(self) -> dict[str, str]:
        return participant_ids(self.table, self.section("inputs")["subject_column"])


def participant_ids(table: pd.DataFrame, column: str) -> dict[str, str]:
    """``{label without sub-: spelling in the table}`` for a participants table's subject column (empty without it)."""
    if column not in table.columns:
        return {}
    return {spelled.removeprefix("sub-"): spelled for spelled in table[column].astype(str)}



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
        if name in ("seeds", "rois"):
            for index, (given, entry) in enumerate(zip(entries, config[name])):
                _check_region_kind(name, index, given, entry, path)
    for name in _OPTION_SECTIONS:
        _section_options(config, name, path)
    denoise_options(config, path)
    _check_regions(config, path)
    _check_models(config, path)
    _check_inference(config, path)
    bad = [c for c in config["denoise"]["columns"] if not isinstance(c, str)]
    if bad:
        raise InputError(f"{path}: denoise.columns must list confounds column names (strings), got {bad[0]!r}")
    return config



def _check_region_kind(kind: str, index: int, given: dict, entry: dict, path: Path) -> None:
    """Check that a [[seeds]]/[[rois]] entry is a sphere (center) or an image region, with only that kind's keys.

    An image region's sphere keys are set to None (they do not apply).
    """
    where = f"{path}: {kind}[{index}]"
    if ("center" in given) == ("image" in given):
        got = "both" if "center" in given else "neither"
        raise InputError(f"{where} ({entry['name']!r}) needs exactly one of center = [x, y, z] (a sphere, MNI mm) or "
                         f"image = \"mask.nii.gz\" (a mask, or an atlas with label); got {got}")
    if "image" in given:
        extra = [key for key in _SPHERE_KEYS if key in given]
        if extra:
            raise InputError(f"{where}.{extra[0]} applies to spheres (center), not to the image region "
                             f"{entry['name']!r}; drop it")
        label = entry["label"]
        if not entry["image"].strip():
            raise InputError(f"{where}.image is empty; give a mask or atlas image, relative to {path.parent}")
        if not (label is None or isinstance(label, str) and label.strip() or type(label) is int and label > 0):
            raise InputError(f"{where}.label must be a label number > 0 or a label name (a string), got {label!r}")
        entry.update(dict.fromkeys(_SPHERE_KEYS))
        return
    extra = [key for key in _IMAGE_KEYS if key in given]
    if extra:
        raise InputError(f"{where}.{extra[0]} applies to image regions (image), not to the sphere {entry['name']!r}; "
                         "drop it")


def _check_regions(config: dict, path: Path) -> None:
    for kind in ("seeds", "rois"):
        names = [entry["name"] for entry in config[kind]]
        if len(set(names)) != len(names):
            raise InputError(f"{path}: [[{kind}]] names must be unique, got {names}")
        for entry in config[kind]:
            center = entry["center"]
            if center is None:  # an image region: its name here, its files in load_study (_check_region_images)
                image_region(entry["image"], name=entry["name"], what=_what(kind))
                continue
            if not (isinstance(center, list) and len(center) == 3 and all(isinstance(v, (int, float)) for v in center)):
                raise InputError(f"{path}: {kind} {entry['name']!r}: center must be [x, y, z] in MNI mm, got {center!r}")
            sphere_regions(entry["name"], center, entry["radius"], mirror=entry["mirror"], what=_what(kind))
    if not config["seeds"]:
        raise InputError(f"{path}: at least one [[seeds]] table is needed")


def _what(kind: str) -> str:
    return "ROI" if kind == "rois" else "seed"


def region_names(config: dict, kind: str) -> list[str]:
    """The names of a study's seeds or ROIs (``kind``: ``'seeds'``/``'rois'``), mirrored spheres included."""
    return [name for entry in config[kind] for name in (
        [entry["name"]] if entry["center"] is None
        else [r.name for r in sphere_regions(entry["name"], entry["center"], entry["radius"], mirror=entry["mirror"])])]


def _entry_path(study_path: Path, value: str) -> Path | None:
    """A path of a region entry (``image``, ``atlas_labels``) relative to the study file's folder; None when empty."""
    return (study_path.parent / value).resolve() if value else None


def entry_regions(study: Study, kind: str, index: int) -> list[Region]:
    """The regions of one ``[[seeds]]``/``[[rois]]`` entry (:func:`study_regions`): a sphere and its mirror as asked,
    or a mask, or an atlas label."""
    entry, path = study.config[kind][index], study.path
    if entry["center"] is not None:
        return sphere_regions(entry["name"], entry["center"], entry["radius"], mirror=entry["mirror"], what=_what(kind))
    image, label, key = _entry_path(path, entry["image"]), entry["label"], f"{kind}[{index}]"
    spelled = None
    if isinstance(label, str):
        try:
            label, spelled = atlas_label(image, label.strip(), labels=_entry_path(path, entry["atlas_labels"]),
                                         where=f"{path}: {key}.label")
        except OptionError as exc:  # the atlas has no label table: the key that gives one
            raise exc.keyed({"atlas_labels": f"{key}.atlas_labels"}) from None
    return [image_region(image, label=label, name=entry["name"], label_name=spelled, what=_what(kind))]


def study_regions(study: Study, kind: str) -> list[Region]:
    """A study's seeds or ROIs (``kind``: ``'seeds'``/``'rois'``) as regions, in the order of the study file.

    A ``[[seeds]]``/``[[rois]]`` entry is a sphere at ``center`` (with its
    mirror as ``mirror`` asks), or the voxels > 0 of ``image``, or one
    ``label`` of an atlas ``image`` (a number, or a name from the
    ``atlas_labels`` table, else the atlas's own table:
    :func:`gpuconn.maps.regions.atlas_label`); paths are relative to the
    study file's folder.
    """
    return [region for index in range(len(study.config[kind])) for region in entry_regions(study, kind, index)]


def _check_region_images(study: Study) -> None:
    """Every image seed or ROI: its file, its label in the atlas, one region (not an atlas), the grid of the runs."""
    path = study.path
    reference = io.load_header(study.runs[0].bold, what="BOLD") if study.runs else None
    images: dict[Path, np.ndarray] = {}  # an atlas is read once for all its labels
    for kind in ("seeds", "rois"):
        for index, entry in enumerate(study.config[kind]):
            if entry["center"] is not None:
                continue
            key = f"{kind}[{index}]"
            image = _entry_path(path, entry["image"])
            if not (afni.head_path(image) if afni.is_dataset(image) else image).is_file():
                raise InputError(f"{path}: {key}.image file not found: {image}")
            if entry["atlas_labels"] and not _entry_path(path, entry["atlas_labels"]).is_file():
                raise InputError(f"{path}: {key}.atlas_labels file not found: {_entry_path(path, entry['atlas_labels'])}")
            (region,) = entry_regions(study, kind, index)
            if image not in images:
                try:
                    img = io.load_image(image, ndim=3, what=f"{key}.image")
                    if reference is not None:
                        io.check_same_grid(reference, study.runs[0].bold, img, image)
                except InputError as exc:
                    raise InputError(f"{path}: {key}.image: {exc}") from None
                images[image] = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float64))
            data = images[image]
            if region.label is not None:
                if not (data == region.label).any():
                    values = np.unique(data[data > 0])
                    listed = ", ".join(f"{v:g}" for v in values[:12]) + (", ..." if len(values) > 12 else "")
                    raise InputError(f"{path}: {key}.label {entry['label']!r} (value {region.label}) is not a label of "
                                     f"{image} (its values > 0: {listed or 'none'})")
            elif len(labels := atlas_values(data)):
                raise InputError(f"{path}: {key}.image {image} holds {len(labels)} labels (an atlas); give label = "
                                 f"<number or name> for one of them, e.g. label = {int(labels[0])}")
            elif not (data > 0).any():
                raise InputError(f"{path}: {key}.image {image} has no voxel > 0; give a mask of the region")


def region_files(study: Study, kind: str) -> list[Path]:
    """The files a study's image seeds or ROIs (``kind``) are read from: images and label tables, for the resume stamps.

    An AFNI dataset is its ``.HEAD`` and ``.BRIK*`` files; a label table
    counts for a label given by name.
    """
    files = []
    for entry in study.config[kind]:
        if entry["center"] is not None:
            continue
        image = _entry_path(study.path, entry["image"])
        if afni.is_dataset(image):
            head = afni.head_path(image)
            files += [head, *sorted(head.parent.glob(head.name.removesuffix(".HEAD") + ".BRIK*"))]
        else:
            files.append(image)
        if isinstance(entry["label"], str):
            table = _entry_path(study.path, entry["atlas_labels"])
            table = table or (None if afni.is_dataset(image) else sibling_label_table(image))
            files += [table] if table is not None else []
    return files


def network_names(config: dict) -> list[str]:
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
    names = network_names(config)
    for model in config["models"]:
        bad = [n for n in model["networks"] if n not in names]
        if bad:
            raise InputError(f"{path}: model {model['name']!r}: network {bad[0]!r} is not an ICA network of the study ({', '.join(names) or 'none'})")
        if model["networks"] and not ica["enabled"]:
            raise InputError(f"{path}: model {model['name']!r} tests ICA networks but [ica] enabled = false")
        if model["networks"] and config["inference"]["method"] in FLAME_METHODS:
            raise InputError(f"{path}: model {model['name']!r} tests ICA networks, but [inference] method = "
                             f"{config['inference']['method']!r} needs first-level variance maps, which the study "
                             "runner makes for seeds only; use method = \"grf\" (or a permutation method) for networks")



def _check_models(config: dict, path: Path) -> None:
    _check_networks(config, path)
    seeds = region_names(config, "seeds")
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
    permutation_options(inference, path)  # n_perm, seed, accel (every method: their checks, worded with the keys)
    cluster_options(inference, path)  # connectivity (every method: the cluster tables use it)
    if inference["method"] == "tfce":
        tfce_options(inference, path)
    if not 0 < inference["alpha"] < 1:
        raise InputError(f"{path}: inference.alpha must be between 0 and 1, got {inference['alpha']}")
    if inference["method"] in ("grf", *FLAME_METHODS):
        grf_options(inference, path)
        given = [key for key, off in (("accel", "none"), ("variance_groups", False), ("correct_across", "none"))
                 if inference[key] != off]
        if given:
            raise InputError(f"{path}: inference.{given[0]} applies to the permutation methods (cluster, tfce, voxel), "
                             f"not to method = {inference['method']!r}; drop it or change the method")
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
    if config["report"]["template"] and not report_template(path, config).is_file():
        raise InputError(f"{path}: report.template file not found: {report_template(path, config)}")
    if not derivatives.is_dir():
        raise InputError(f"{path}: inputs.{source} folder not found: {derivatives}")
    if not participants.is_file():
        raise InputError(f"{path}: inputs.participants file not found: {participants}")
    table = _add_derived(io.read_tsv(participants, what="participants"), config["derived"], path)
    _check_columns(config, table, participants, path)
    if source == "feat":
        runs = study_runs(str(path.parent / inputs["feat"]))
    else:  # find_runs reads afni_proc.py results folders too
        runs = find_runs(derivatives, space=inputs["space"])
    known = participant_ids(table, inputs["subject_column"])
    missing = sorted({f"sub-{r.subject}" for r in runs if r.subject not in known})
    if missing:
        raise InputError(f"{participants} has no row for {', '.join(missing[:5])} (found under {derivatives}); add them")
    study = Study(path, config, derivatives, participants, runs, table, templates)
    _check_region_images(study)
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
            model_design(study, model, table)



def report_template(path: Path, config: dict) -> Path | None:
    """The report's T1 template (``[report] template``, relative to the study file's folder), or None."""
    return (Path(path).parent / config["report"]["template"]).resolve() if config["report"]["template"] else None



def demo_study_path() -> Path:
    """The bundled demo study file (``gpuconn/data/demo_study.toml``)."""
    return Path(str(resources.files("gpuconn") / "data" / "demo_study.toml"))



def template_text() -> str:
    """A commented study file (the bundled demo study), for ``gpuconn study init``."""
    return demo_study_path().read_text()



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
    by_key = {(study.participant_id(r), r.session or ""): r for r in runs}
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



def model_design(study: Study, model: dict, table: pd.DataFrame):
    inputs = study.section("inputs")
    constant = [c for c in model["covariates"] if table[c].nunique(dropna=False) < 2]
    if constant:
        warnings.warn(f"model {model['name']!r}: covariate(s) {', '.join(constant)} take a single value in its "
                      f"{len(table)} observations and are left out of the design", UserWarning, stacklevel=2)
    covariates = [c for c in model["covariates"] if c not in constant]
    common = dict(covariates=covariates, subject=inputs["subject_column"], source=f"model {model['name']!r}")
    with study_keys(_DESIGN_KEYS, study.path):
        if model["kind"] == "two-sample":
            return build_design(table, "two-sample", group=inputs["group_column"], levels=model["contrast"].split(">"),
                                **common)
        if model["kind"] == "paired":
            return build_design(table, "paired", paired_mode="differences", **common)
        return build_design(table, "regression", variable=model["variable"], **common)
