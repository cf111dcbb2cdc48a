"""The demo: simulate a study with planted effects, run the bundled study file on it, check the findings.

:func:`run_demo` writes ``OUT/data`` (:func:`gpuconn.study.simulate.simulate_study`;
kept when a previous demo wrote the same study), ``OUT/study.toml`` (the
bundled ``demo_study.toml``), runs it into ``OUT/results``
(:func:`gpuconn.study.runner.run_study`, which skips up-to-date steps) and compares
the results with ``ground_truth.json`` (:func:`gpuconn.study.results.check_planted_effects`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..core import io
from ..core.errors import InputError
from ..core.progress import progress_bar
from .results import check_planted_effects, effect_lines
from .runner import StepRecord, run_study
from .schema import load_study, template_text
from .simulate import simulate_study

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What :func:`run_demo` did: the report, the checks and their summary lines."""

    report: Path
    checks: pd.DataFrame
    lines: list[str]



def _same_study(data: Path, wanted: dict) -> bool:
    try:
        truth = json.loads((data / "ground_truth.json").read_text())
        groups = io.read_tsv(data / "participants.tsv")["group"].value_counts().to_dict()
    except (OSError, ValueError, InputError, KeyError):
        return False
    found = {"seed": truth.get("seed"), "n_volumes": truth.get("n_volumes"), "voxel_size": truth.get("voxel_size"),
             "n_patients": groups.get("cLBP", 0), "n_controls": groups.get("HC", 0)}
    return found == wanted


def _clear_previous(data: Path) -> None:
    """Remove a previous demo's simulated study (other sizes leave other subjects), never anything else."""
    if not data.exists() or not any(data.iterdir()):
        return
    if not (data / "ground_truth.json").exists():
        raise InputError(f"{data} exists and is not a study simulated by gpuconn; choose another demo folder")
    shutil.rmtree(data)


def run_demo(
    out: str | os.PathLike,
    *,
    n_patients: int = 8,
    n_controls: int = 6,
    n_volumes: int = 120,
    voxel_size: float = 4.0,
    n_perm: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[StepRecord], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    console=None,
) -> DemoResult:
    """Simulate, analyse and check a demo study.

    Parameters
    ----------
    out : path-like
        Demo folder (``data/``, ``study.toml``, ``results/``).
    n_patients, n_controls, n_volumes, voxel_size, seed
        Passed to :func:`gpuconn.study.simulate.simulate_study`.
    n_perm : int, optional
        Replaces the study file's ``[inference] n_perm``.
    device : str
    progress : bool
    on_step, on_start : callable, optional
        Passed to :func:`gpuconn.study.runner.run_study`.
    console : rich.console.Console, optional
        Where to say what is happening.

    Returns
    -------
    DemoResult
    """

    out = Path(out)
    data = out / "data"
    say = console.print if console is not None else (lambda *a, **k: None)
    wanted = {"seed": seed, "n_volumes": n_volumes, "voxel_size": float(voxel_size), "n_patients": n_patients, "n_controls": n_controls}
    if _same_study(data, wanted):
        say(f"simulated study in {data} is already there")
    else:
        _clear_previous(data)
        say(f"simulating {n_patients} patients (pre, post) and {n_controls} controls, {n_volumes} volumes at {voxel_size} mm into {data}")
        with progress_bar("simulate", 2 * n_patients + n_controls, enabled=progress) as advance:
            simulate_study(data, n_patients=n_patients, n_controls=n_controls, n_volumes=n_volumes, voxel_size=voxel_size,
                           seed=seed, progress=advance)
    text = template_text()
    if n_perm is not None:
        text = re.sub(r"(?m)^n_perm = \d+", f"n_perm = {int(n_perm)}", text)
    study_path = io.write_text(out / "study.toml", text) if not (out / "study.toml").exists() or (out / "study.toml").read_text() != text else out / "study.toml"
    study = load_study(study_path)
    say(f"running {study_path} -> {out / 'results'}")
    result = run_study(study, out / "results", device=device, progress=progress, on_step=on_step, on_start=on_start)
    checks = check_planted_effects(study, result.out_dir, json.loads((data / "ground_truth.json").read_text()))
    return DemoResult(result.report, checks, effect_lines(checks, study.section("inference")))
