"""Queries on a study's results folder, and the planted-effect check of simulated studies.

The group maps a model tests (:func:`map_keys`), the contrasts it has
results for (:func:`model_contrasts`), its significant voxels
(:func:`significant_voxels`), and :func:`check_planted_effects`, which
compares the results with a simulated study's ``ground_truth.json``. Used
by the runner's clusters step, the report and the demo.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..core import io
from ..core.bids import Run
from ..maps.regions import Region, region_masks
from ..stats.tables import cluster_table
from ..subject.denoise import RunFiles, output_paths
from .schema import FLAME_METHODS, Study

__all__ = [
    "map_keys",
    "run_dir",
    "denoised_outputs",
    "stat_root",
    "significant_voxels",
    "corrp_path",
    "model_contrasts",
    "check_planted_effects",
    "effect_lines",
    "FOUND_RADIUS_MM",
]


def map_keys(model: dict) -> list[str]:
    """The maps a group model tests: ``seed-<name>`` (seed maps) and ``net-<name>`` (dual-regression maps)."""
    return [f"seed-{s}" for s in model["seeds"]] + [f"net-{n}" for n in model["networks"]]



def run_dir(out: Path, step: str, run: Run) -> Path:
    """A step's per-run folder: ``OUT/<step>/sub-<label>[/ses-<label>]/func``."""
    parts = [f"sub-{run.subject}"] + ([f"ses-{run.session}"] if run.session else [])
    return Path(out).joinpath(step, *parts, "func")


def denoised_outputs(out: Path, run: Run) -> dict[str, Path]:
    """A run's denoising outputs (``bold``, ``design``, ``mask``) in a results folder."""
    return output_paths(RunFiles.from_run(run), run_dir(out, "denoise", run))



def stat_root(out: Path, model: str, key: str) -> Path:
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
        or for ``grf``, ``flame1`` and ``flame12`` the voxels of significant
        GRF clusters (``*_thresh_zstat<i>``).
    """
    corrp = corrp_path(out_dir, model, key, contrast, inference)
    if corrp is None:
        root = stat_root(Path(out_dir), model, key)
        return np.asarray(nib.load(f"{root}_thresh_zstat{contrast}.nii.gz").dataobj) != 0
    return np.asarray(nib.load(str(corrp)).dataobj, dtype=np.float64) > 1.0 - inference["alpha"]


_CORRP = {"cluster": "clustere", "tfce": "tfce", "voxel": "vox"}
# The FWER map of each [inference] correct_across (randomise's corrp; PALM-style ccorrp/mcorrp/mccorrp of combine).
_ACROSS = {"none": "corrp", "contrasts": "ccorrp", "maps": "mcorrp", "both": "mccorrp"}


def corrp_path(out_dir: str | os.PathLike, model: str, key: str, contrast: int, inference: dict) -> Path | None:
    """The permutation method's FWER map ``*_<corrp|ccorrp|mcorrp|mccorrp>_tstat<i>`` (``1 - p``).

    The map follows ``inference['correct_across']``: corrected within the map
    and contrast (``corrp``), across the map's contrasts (``ccorrp``), across
    the model's maps (``mcorrp``) or both (``mccorrp``). None for ``grf`` and
    FLAME (GRF cluster p).
    """
    if inference["method"] in ("grf", *FLAME_METHODS):
        return None
    kind = _ACROSS[inference.get("correct_across", "none")]
    return Path(f"{stat_root(Path(out_dir), model, key)}_{_CORRP[inference['method']]}_{kind}_tstat{contrast}.nii.gz")



def model_contrasts(out_dir: str | os.PathLike, model: str, key: str) -> list[int]:
    """The t contrasts (1-based) a group model has results for (``*_zstat<i>`` maps)."""
    root = stat_root(Path(out_dir), model, key)
    found = [p.name[len(root.name) + len("_zstat"):].split(".")[0] for p in root.parent.glob(f"{root.name}_zstat*.nii.gz")]
    return sorted(int(i) for i in found if i.isdigit())



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
        The study's results folder (after :func:`gpuconn.study.runner.run_study`).
    ground_truth : dict
        ``ground_truth.json`` of :func:`gpuconn.study.simulate.simulate_study`.

    Returns
    -------
    pandas.DataFrame
        One row per (effect, null region or elsewhere, model): ``kind``
        ('effect', 'null' or 'elsewhere'), ``name``, ``model``, ``seed``, ``region``, ``map_voxels``
        (significant voxels near the region), ``roi_p``, ``roi_effect``,
        ``found`` (map or ROI) and ``expected`` (True for effects).
    """

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



def effect_lines(checks: pd.DataFrame, inference: dict) -> list[str]:
    """One line per planted effect, null region and "elsewhere" check: the finding text of the console and the report.

    Parameters
    ----------
    checks : pandas.DataFrame
        :func:`check_planted_effects`.
    inference : dict
        The ``[inference]`` settings (``method``, ``alpha``).

    Returns
    -------
    list of str
        A row found only by its ROI test says so ("FOUND at the ROI test,
        no significant voxels near ..."), never "FOUND: 0 significant voxels".
    """
    lines = []
    for row in checks.itertuples():
        if row.kind == "elsewhere":
            verdict = "none, as planted" if not row.found else f"{row.map_voxels} (false positives)"
            lines.append(f"  significant voxels elsewhere (model {row.model}, seed {row.seed}): {verdict}")
            continue
        roi = f"ROI test p = {row.roi_p:.3g}, effect {row.roi_effect:+.3f}"
        if row.roi_p < inference["alpha"] and row.roi_effect < 0:
            roi += " (significant in the direction opposite to the model's hypothesis)"
        near = f"significant voxels within {FOUND_RADIUS_MM:g} mm of {row.region} ({inference['method']}, p < {inference['alpha']})"
        if row.map_voxels > 0:
            detail = f"{row.map_voxels} {near}; {roi}"
        elif row.found:
            detail = f"at the ROI test ({roi}); no {near}"
        else:
            detail = f"no {near}; {roi}"
        if row.kind == "effect":
            verdict = "FOUND" if row.found else "not found"
            lines.append(f"  planted {row.name} (seed {row.seed} -> {row.region}, model {row.model}): {verdict}: {detail}")
        else:
            verdict = ("not found, as planted" if not row.found else
                       "found: a chance hit (each null check is a test with a 5% false-positive rate)")
            lines.append(f"  null region {row.region} (model {row.model}): {verdict}: {detail}")
    return lines



def _voxels_in_other_clusters(significant: np.ndarray, allowed: np.ndarray, affine: np.ndarray) -> int:
    """Voxels of the significant clusters (26-connected) that touch no ``allowed`` voxel."""

    if not significant.any():
        return 0
    index = cluster_table(significant.astype(np.float64), affine, threshold=0.5, mask=significant).index_image
    touching = np.unique(index[allowed & (index > 0)])
    return int(((index > 0) & ~np.isin(index, touching)).sum())
