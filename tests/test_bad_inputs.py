"""The bad-input catalogue: every command x every way its inputs can be wrong.

Each case runs the CLI in-process (``gpuconn.cli.app.run``) on tiny
hand-made files (a 6x7x5 grid) and holds it to the project's error
contract:

- exit code != 0;
- exactly one line on standard error, no traceback;
- the line names the offending file or option (``expect``);
- nothing new under the test's folder: no output file, no ``.tmp`` file.

Faults injected (see also README, "Testing"): missing files, truncated
``.nii.gz``, an AFNI ``.HEAD`` without its ``.BRIK``, ``.1D`` motion/censor files of the wrong length,
a FEAT folder without ``reg/``, wrong dimensionality, shape/affine mismatches, empty masks,
NaN/Inf data, broken designs/contrasts/confounds, impossible ``-n``,
censoring that leaves too few volumes, an output path under a regular file,
a folder the process may not write (``tempfile.mkstemp`` raising EACCES),
and a full disk (the atomic rename raising ENOSPC, on the first write and
after some outputs were already written).

Documented behaviours that are not errors are tested at the end
(``-n`` above the number of distinct rearrangements -> exhaustive test;
constant voxels).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

import gpuconn.core.io
from gpuconn.cli.app import run

SHAPE = (6, 7, 5)
AFFINE = np.array([[4.0, 0, 0, -10], [0, 4.0, 0, -12], [0, 0, 4.0, -8], [0, 0, 0, 1]])
N_VOLUMES = 60
N_SUBJECTS = 10
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def _image(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    if np.ndim(data) == 4:
        img.header.set_zooms((4.0, 4.0, 4.0, 2.0))
    nib.save(img, str(path))
    return path


def _vest(path: Path, matrix: np.ndarray, kind: str = "NumPoints") -> Path:
    matrix = np.atleast_2d(matrix)
    rows = "".join(" ".join(f"{v:.6g}" for v in row) + "\n" for row in matrix)
    path.write_text(f"/NumWaves {matrix.shape[1]}\n/{kind} {matrix.shape[0]}\n/Matrix\n{rows}")
    return path


@pytest.fixture
def ws(tmp_path: Path) -> dict[str, Path]:
    """Good inputs for every command, in ``tmp_path/in``; outputs go to ``tmp_path/out``."""
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(11)
    bold = 100 + rng.standard_normal(SHAPE + (N_VOLUMES,))
    mask = np.zeros(SHAPE)
    mask[1:5, 1:6, 1:4] = 1
    confounds = pd.DataFrame({c: rng.standard_normal(N_VOLUMES) * 1e-3 for c in MOTION})
    confounds["framewise_displacement"] = np.r_[np.nan, np.abs(rng.standard_normal(N_VOLUMES - 1)) * 0.05]
    for column in ["white_matter", "csf", "global_signal"] + [f"a_comp_cor_{i:02d}" for i in range(5)]:
        confounds[column] = rng.standard_normal(N_VOLUMES)
    confounds.to_csv(d / "confounds.tsv", sep="\t", index=False, na_rep="n/a")
    x = rng.standard_normal(N_SUBJECTS)
    participants = pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(N_SUBJECTS)],
        "group": ["A", "B"] * (N_SUBJECTS // 2),
        "age": rng.integers(20, 60, N_SUBJECTS),
        "pcs": rng.integers(0, 30, N_SUBJECTS),
    })
    participants.to_csv(d / "participants.tsv", sep="\t", index=False)
    maps = gaussian_filter(rng.standard_normal(SHAPE + (N_SUBJECTS,)), (1, 1, 1, 0)) + 0.5
    files = {
        "bold": _image(d / "bold.nii.gz", bold),
        "bold2": _image(d / "bold2.nii.gz", bold[..., ::-1]),
        "mask": _image(d / "mask.nii.gz", mask),
        "maps": _image(d / "maps.nii.gz", maps),
        "stat": _image(d / "stat.nii.gz", rng.standard_normal(SHAPE) * 2),
        "groupmaps": _image(d / "groupmaps.nii.gz", rng.standard_normal(SHAPE + (3,))),
        "templates": _image(d / "templates.nii.gz", rng.standard_normal(SHAPE + (2,))),
        "design": _vest(d / "design.mat", np.column_stack([np.ones(N_SUBJECTS), x])),
        "con": _vest(d / "design.con", np.array([[0.0, 1.0]]), "NumContrasts"),
        "confounds": d / "confounds.tsv",
        "participants": d / "participants.tsv",
        "study": d / "study.toml",
    }
    (d / "study.toml").write_text('[inputs]\nderivatives = "."\n\n[[seeds]]\nname = "s"\ncenter = [0, 0, 0]\n')
    files["in"] = d
    files["out"] = tmp_path / "out"
    return files


# Each command: argv template ({slot} = a file of the workspace, {out} = the output folder).
COMMANDS: dict[str, list[str]] = {
    "qc": ["qc", "--confounds", "{confounds}", "-o", "{out}/qc.tsv"],
    "denoise": ["denoise", "--bold", "{bold}", "--mask", "{mask}", "--confounds", "{confounds}", "--acompcor", "0",
                "--fwhm", "0", "--physio-mode", "no", "-o", "{out}/den", "-q", "--device", "cpu"],
    "seed": ["seed", "--bold", "{bold}", "--mask", "{mask}", "--seed-coord", "0,0,0", "--radius", "6",
             "-o", "{out}/seed", "-q", "--device", "cpu"],
    "roi": ["roi", "extract", "{maps}", "--mask", "{mask}", "--roi-coord", "0,0,0", "--radius", "6",
            "-o", "{out}/roi.tsv"],
    "ica-run": ["ica", "run", "{bold}", "{bold2}", "-d", "3", "--mask", "{mask}", "-o", "{out}/ica", "-q",
                "--device", "cpu"],
    "ica-match": ["ica", "match", "{groupmaps}", "{templates}", "--mask", "{mask}", "-o", "{out}/match"],
    "dualreg": ["dualreg", "{groupmaps}", "{bold}", "{bold2}", "--mask", "{mask}", "-o", "{out}/dr", "-q",
                "--device", "cpu"],
    "randomise": ["randomise", "-i", "{maps}", "-d", "{design}", "-t", "{con}", "-m", "{mask}", "-n", "20",
                  "-o", "{out}/rand", "-q", "--device", "cpu"],
    "glm": ["glm", "-i", "{maps}", "-d", "{design}", "-t", "{con}", "-m", "{mask}", "-o", "{out}/glm",
            "--device", "cpu"],
    "clusters": ["clusters", "-i", "{stat}", "-t", "2", "-m", "{mask}", "-o", "{out}/cl"],
    "design": ["design", "regression", "{participants}", "--variable", "pcs", "--covariate", "age",
               "-o", "{out}/des"],
    "study-run": ["study", "run", "{study}", "-o", "{out}/study", "-q"],
    "simulate": ["simulate", "{out}/sim", "--n-patients", "3", "--n-controls", "2", "--n-volumes", "20",
                 "--voxel-size", "8", "-q"],
}
# The 4D inputs (volumes in time or subjects) and 3D inputs of each command.
# (A 3D group map / component image is one map: valid for dualreg and ica match.)
INPUTS_4D = {"denoise": ["bold"], "seed": ["bold"], "ica-run": ["bold"], "dualreg": ["bold"],
             "randomise": ["maps"], "glm": ["maps"]}
INPUTS_3D = {"denoise": ["mask"], "seed": ["mask"], "roi": ["mask"], "ica-run": ["mask"], "ica-match": ["mask"],
             "dualreg": ["mask"], "randomise": ["mask"], "glm": ["mask"], "clusters": ["stat", "mask"]}
# Images whose grid must match the command's data (the mask; the templates of ica match).
GRID_CHECKED = {c: ["mask"] for c in INPUTS_3D if c != "clusters"} | {
    "clusters": ["mask"], "ica-match": ["mask", "templates"], "dualreg": ["mask", "bold2"],
    "ica-run": ["mask", "bold2"]}
# The data image of each command (NaN/Inf injected there; clusters: see test_clusters_non_finite).
DATA = {"denoise": "bold", "seed": "bold", "roi": "maps", "ica-run": "bold", "ica-match": "groupmaps",
        "dualreg": "bold", "randomise": "maps", "glm": "maps"}


@dataclass
class Case:
    """One bad input: how to break the workspace, and what the message must name."""

    id: str
    command: str
    # (ws) -> {slot: replacement path or text}; extra argv appended.
    make: Callable[[dict], dict] = lambda ws: {}
    extra: list[tuple[str, str | None]] = field(default_factory=list)
    expect: tuple[str, ...] = ()
    inject: str | None = None  # 'full-first', 'full-later', 'eacces'
    argv: list[str] | None = None  # instead of the command's template


def _argv(command: str, ws: dict, overrides: dict, extra: list[tuple[str, str | None]],
          template: list[str] | None = None) -> list[str]:
    slots = {k: str(v) for k, v in ws.items()} | {k: str(v) for k, v in overrides.items()}
    argv = [token.format(**slots) for token in (template or COMMANDS[command])]
    for option, value in extra:  # an option of the template gets the case's value; others are appended
        value = None if value is None else value.format(**slots)
        if option in argv and value is not None:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option] if value is None else [option, value]
    return argv


def _bad_image(ws: dict, slot: str, name: str, data=None, affine=AFFINE) -> Path:
    source = nib.load(str(ws[slot]))
    values = np.asarray(source.dataobj) if data is None else data
    return _image(ws["in"] / f"bad_{name}_{slot}.nii.gz", values, affine)


def _truncated(ws: dict, slot: str) -> Path:
    raw = Path(ws[slot]).read_bytes()
    path = ws["in"] / f"truncated_{slot}.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _with_nan(ws: dict, slot: str, value: float) -> Path:
    data = np.asarray(nib.load(str(ws[slot])).dataobj).copy()
    data[2, 3, 2, ...] = value  # inside the mask
    return _bad_image(ws, slot, "nan" if np.isnan(value) else "inf", data)


def _afni_head_only(ws: dict, slot: str) -> Path:
    """An AFNI dataset of the slot's image whose .BRIK is missing."""
    from afni_files import write_dataset

    head = write_dataset(ws["in"] / f"nobrik_{slot}", np.asarray(nib.load(str(ws[slot])).dataobj), AFFINE, tr=2.0)
    Path(str(head)[: -len(".HEAD")] + ".BRIK").unlink()
    return head


def _feat_without_reg(ws: dict) -> Path:
    """A first-level FEAT folder whose registration (reg/) is missing."""
    folder = ws["in"] / "noreg.feat"
    (folder / "mc").mkdir(parents=True)
    _image(folder / "filtered_func_data.nii.gz", np.asarray(nib.load(str(ws["bold"])).dataobj))
    _image(folder / "mask.nii.gz", np.asarray(nib.load(str(ws["mask"])).dataobj))
    np.savetxt(folder / "mc" / "prefiltered_func_data_mcf.par", np.zeros((N_VOLUMES, 6)))
    return folder


def _atlas(ws: dict) -> Path:
    """An atlas of two labels (1 and 2) inside the mask."""
    labels = np.zeros(SHAPE)
    labels[1:3, 1:6, 1:4], labels[3:5, 1:6, 1:4] = 1, 2
    return _image(ws["in"] / "atlas.nii.gz", labels)


def _text(ws: dict, name: str, text: str) -> Path:
    path = ws["in"] / name
    path.write_text(text)
    return path


def _design_case(ws: dict, matrix: np.ndarray) -> dict:
    """A bad design with a contrast of its length (testing the design, not the contrast)."""
    contrast = np.eye(1, matrix.shape[1], 1)
    return {"design": _vest(ws["in"] / "bad.mat", matrix), "con": _vest(ws["in"] / "bad.con", contrast, "NumContrasts")}


def _confounds_case(ws: dict, change: Callable[[pd.DataFrame], pd.DataFrame]) -> dict:
    table = change(pd.read_csv(ws["confounds"], sep="\t"))
    path = ws["in"] / "bad_confounds.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return {"confounds": path}


def _participants_case(ws: dict, change: Callable[[pd.DataFrame], pd.DataFrame]) -> dict:
    table = change(pd.read_csv(ws["participants"], sep="\t"))
    path = ws["in"] / "bad_participants.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return {"participants": path}


def _cases() -> list[Case]:
    cases = []
    file_slots = {c: sorted({t[1:-1] for t in argv if t.startswith("{") and t != "{out}" and "/" not in t})
                  for c, argv in COMMANDS.items()}
    for command, slots in file_slots.items():
        for slot in slots:
            cases.append(Case(f"missing-{slot}", command, lambda ws, s=slot: {s: ws["in"] / f"nope_{s}.nii.gz"},
                              expect=(f"nope_{slot}",)))
            if str(COMMANDS[command]).find("{" + slot + "}") >= 0 and slot not in (
                    "confounds", "participants", "design", "con", "study"):
                cases.append(Case(f"truncated-{slot}", command, lambda ws, s=slot: {s: _truncated(ws, s)},
                                  expect=(f"truncated_{slot}",)))
    for command, slots in INPUTS_4D.items():
        for slot in slots:
            cases.append(Case(f"3d-for-4d-{slot}", command,
                              lambda ws, s=slot: {s: _bad_image(ws, "stat", f"3d_{s}")}, expect=("bad_3d",)))
    for command, slots in INPUTS_3D.items():
        for slot in slots:
            cases.append(Case(f"4d-for-3d-{slot}", command,
                              lambda ws, s=slot: {s: _bad_image(ws, "bold", f"4d_{s}")}, expect=("bad_4d",)))
    for command, slots in GRID_CHECKED.items():
        for slot in slots:
            def shape(ws, s=slot):
                data = np.asarray(nib.load(str(ws[s])).dataobj)
                return {s: _bad_image(ws, s, "shape", data[:-1])}

            def affine(ws, s=slot):
                shifted = AFFINE.copy()
                shifted[0, 3] += 2.0
                return {s: _bad_image(ws, s, "affine", affine=shifted)}
            cases.append(Case(f"shape-mismatch-{slot}", command, shape, expect=("bad_shape",)))
            cases.append(Case(f"affine-mismatch-{slot}", command, affine, expect=("bad_affine",)))
        cases.append(Case("empty-mask", command, lambda ws: {"mask": _bad_image(ws, "mask", "empty", np.zeros(SHAPE))},
                          expect=("bad_empty_mask",)))
    for command, slot in DATA.items():
        cases.append(Case("nan-in-data", command, lambda ws, s=slot: {s: _with_nan(ws, s, np.nan)},
                          expect=("bad_nan",)))
        cases.append(Case("inf-in-data", command, lambda ws, s=slot: {s: _with_nan(ws, s, np.inf)},
                          expect=("bad_inf",)))
        cases.append(Case("afni-missing-brik", command, lambda ws, s=slot: {s: _afni_head_only(ws, s)},
                          expect=(f"nobrik_{slot}+tlrc.HEAD", ".BRIK")))
    x = np.random.default_rng(3).standard_normal(N_SUBJECTS)
    ones = np.ones(N_SUBJECTS)
    ages = np.arange(30.0, 30.0 + N_SUBJECTS)  # exact in text: age and age - 20 are collinear with the intercept
    for command in ("randomise", "glm"):
        cases += [
            Case("design-wrong-rows", command, lambda ws: _design_case(ws, np.column_stack([ones, x])[:-1]),
                 expect=("bad.mat",)),
            Case("design-rank-deficient", command,
                 lambda ws: _design_case(ws, np.column_stack([ones, ages, ages - 20])),
                 expect=("bad.mat",)),
            Case("design-constant-column", command, lambda ws: _design_case(ws, np.column_stack([ones, x, ones])),
                 expect=("bad.mat",)),
            Case("design-zero-column", command,
                 lambda ws: _design_case(ws, np.column_stack([ones, x, np.zeros(N_SUBJECTS)])), expect=("bad.mat",)),
            Case("design-missing-values", command,
                 lambda ws: {"design": _text(ws, "bad.mat", ws["design"].read_text().replace("\n1 ", "\nNaN ", 1))},
                 expect=("bad.mat",)),
            Case("design-malformed", command, lambda ws: {"design": _text(ws, "bad.mat", "/Matrix\n1 2\n3\n")},
                 expect=("bad.mat", "/NumWaves")),
            Case("contrast-wrong-length", command,
                 lambda ws: {"con": _vest(ws["in"] / "bad.con", np.array([[0.0, 1.0, 0.0]]), "NumContrasts")},
                 expect=("bad.con",)),
        ]
    cases += [
        Case("n-below-1", "randomise", extra=[("-n", "-1")], expect=("-n",)),
        Case("n-exhaustive-too-many", "randomise", extra=[("-n", "0")], expect=("-n",)),
        Case("one-sample-with-design", "randomise", extra=[("-1", None)], expect=("-1",)),
        Case("groups-wrong-length", "randomise",
             lambda ws: {"grp": _vest(ws["in"] / "bad.grp", np.ones((N_SUBJECTS - 2, 1)))},
             extra=[("-e", "{grp}")], expect=("bad.grp",)),
        Case("ftest-wrong-width", "randomise",
             lambda ws: {"fts": _vest(ws["in"] / "bad.fts", np.ones((1, 3)), "NumContrasts")},
             extra=[("-f", "{fts}")], expect=("bad.fts",)),
        Case("stage3-design-wrong-rows", "dualreg", extra=[("-d", "{design}"), ("-t", "{con}"), ("-n", "1")],
             expect=("design.mat",)),
        Case("stage3-contrast-wrong-length", "dualreg",
             lambda ws: {"design": _vest(ws["in"] / "dr.mat", np.ones((2, 1))),
                         "con": _vest(ws["in"] / "bad.con", np.array([[0.0, 1.0]]), "NumContrasts")},
             extra=[("-d", "{design}"), ("-t", "{con}"), ("-n", "1")], expect=("bad.con",)),
        Case("derivatives-missing", "denoise", argv=["denoise", "--derivatives", "{in}/nowhere", "-o", "{out}/d"],
             expect=("nowhere",)),
        Case("derivatives-missing", "seed", argv=["seed", "--derivatives", "{in}/nowhere", "--seed-coord", "0,0,0",
                                                  "--radius", "6",
                                                  "-o", "{out}/s"], expect=("nowhere",)),
        Case("derivatives-missing", "qc", argv=["qc", "--derivatives", "{in}/nowhere", "-o", "{out}/qc.tsv"],
             expect=("nowhere",)),
        Case("derivatives-empty", "denoise", argv=["denoise", "--derivatives", "{in}", "-o", "{out}/d"],
             expect=("in",)),
        Case("feat-without-reg", "denoise", lambda ws: {"feat": _feat_without_reg(ws)},
             argv=["denoise", "--feat", "{feat}", "--acompcor", "0", "-o", "{out}/d", "-q", "--device", "cpu"],
             expect=("noreg.feat", "reg/")),
        Case("feat-without-reg", "seed", lambda ws: {"feat": _feat_without_reg(ws)},
             argv=["seed", "--feat", "{feat}", "--seed-coord", "0,0,0", "--radius", "6", "-o", "{out}/s", "-q",
                   "--device", "cpu"], expect=("noreg.feat", "reg/")),
        Case("feat-as-bold-without-reg", "ica-run", lambda ws: {"bold": _feat_without_reg(ws)},
             expect=("noreg.feat", "reg/")),
        Case("confounds-wrong-length", "denoise", lambda ws: _confounds_case(ws, lambda t: t.iloc[:-5]),
             expect=("bad_confounds",)),
        Case("confounds-missing-motion", "denoise", lambda ws: _confounds_case(ws, lambda t: t.drop(columns=MOTION)),
             expect=("bad_confounds",)),
        Case("afni-1d-motion-wrong-rows", "denoise",
             lambda ws: {"m": _text(ws, "dfile_rall.1D", "# roll pitch yaw dS dL dP\n" + "0 0 0 0 0 0\n" * (N_VOLUMES - 3))},
             extra=[("--motion-par", "{m}")], expect=("dfile_rall.1D", f"{N_VOLUMES - 3} rows", f"{N_VOLUMES} volumes")),
        Case("afni-1d-censor-wrong-rows", "denoise",
             lambda ws: {"c": _text(ws, "censor_s_combined_2.1D", "1\n" * (N_VOLUMES + 2))},
             extra=[("--censor-file", "{c}")], expect=("censor_s_combined_2.1D", f"{N_VOLUMES + 2} rows")),
        Case("confounds-missing-column", "denoise", extra=[("--column", "not_a_column")], expect=("not_a_column",)),
        Case("high-pass-above-nyquist", "denoise", extra=[("--high-pass", "0.3")],
             expect=("--high-pass 0.3 Hz", "Nyquist frequency 0.25 Hz", "TR 2 s")),
        Case("motion-par-in-degrees", "denoise",
             lambda ws: {"m": _text(ws, "degrees.par", "".join(f"{8 * np.sin(t / 9):.4f} 0.5 -1 0.1 0.2 0.3\n"
                                                                for t in range(N_VOLUMES)))},
             extra=[("--motion-par", "{m}")], expect=("degrees.par", "look like degrees", "radians")),
        Case("max-memory-too-small", "randomise", extra=[("--max-memory", "1KB")],
             expect=("--max-memory 1000 bytes is too small", "at least")),
        Case("max-memory-too-small", "dualreg", extra=[("--max-memory", "1KB")],
             expect=("--max-memory 1000 bytes is too small", "at least")),
        Case("participants-comma-separated-tsv", "design",
             lambda ws: {"participants": _text(ws, "comma.tsv", pd.read_csv(ws["participants"], sep="\t").to_csv(index=False))},
             expect=("comma.tsv", "comma-separated", ".csv")),
        Case("confounds-missing-values", "denoise",
             lambda ws: _confounds_case(ws, lambda t: t.assign(trans_x=t.trans_x.where(t.index != 7))),
             expect=("bad_confounds",)),
        Case("too-few-volumes-after-censoring", "denoise",
             extra=[("--censor", "drop"), ("--outlier-threshold", "0.01")], expect=("bold.nii.gz",)),
        Case("confounds-missing-motion", "qc", lambda ws: _confounds_case(ws, lambda t: t.drop(columns=MOTION)),
             expect=("bad_confounds",)),
        Case("confounds-missing-values", "qc",
             lambda ws: _confounds_case(ws, lambda t: t.assign(trans_x=t.trans_x.where(t.index != 7))),
             expect=("bad_confounds",)),
        Case("dim-above-volumes", "ica-run", extra=[("-d", "500")], expect=("--dim",)),
        # option values checked by the options objects (and the maps library): the message names the flag typed
        Case("mirror-with-bilateral", "seed", extra=[("--mirror", None), ("--bilateral", None)],
             expect=("--mirror (separate mirrored region) and --bilateral (union with the mirror) exclude each other",)),
        Case("coord-not-xyz", "seed", extra=[("--seed-coord", "1,2")],
             expect=("--seed-coord '1,2' is not x,y,z in mm; write it as e.g. --seed-coord -18,-38,72",)),
        Case("layout-unknown", "seed", extra=[("--layout", "voxel")], expect=("--layout 'voxel' is not one of",)),
        Case("bold-without-mask", "seed", argv=["seed", "--bold", "{bold}", "--seed-coord", "0,0,0", "-o", "{out}/s"],
             expect=("--bold needs --mask",)),
        Case("radius-not-per-coordinate", "roi",
             argv=["roi", "extract", "{maps}", "--roi-coord", "0,0,0", "--roi-coord", "1,1,1", "--radius", "4",
                   "--radius", "5", "--radius", "6", "-o", "{out}/roi.tsv"],
             expect=("--radius was given 3 times for 2 --roi-coord",)),
        Case("label-not-atlas-label", "roi", extra=[("--roi-label", "atlas.nii.gz")],
             expect=("--roi-label 'atlas.nii.gz' must be ATLAS:LABEL, e.g. --roi-label atlas.nii.gz:7",)),
        Case("batch-below-1", "dualreg", extra=[("--batch", "0")], expect=("--batch must be at least 1, got 0",)),
        Case("dualreg-batch-below-1", "study-run",
             lambda ws: {"study": _text(ws, "bad.toml", ws["study"].read_text() + "\n[dualreg]\nbatch_size = -1\n")},
             expect=("bad.toml: dualreg.batch_size must be at least 1, got -1",)),
        Case("seed-outside-grid", "seed", extra=[("--seed-coord", "300,0,0")], expect=("300",)),
        Case("roi-outside-grid", "roi", extra=[("--roi-coord", "300,0,0")], expect=("300",)),
        Case("atlas-without-label-in-table", "roi",
             lambda ws: {"atlas": _atlas(ws), "t": _text(ws, "rois.tsv", "name\timage\nparc\tatlas.nii.gz\n")},
             extra=[("--roi-table", "{t}")], expect=("atlas.nii.gz", "holds 2 labels", "--roi-mask")),
        Case("atlas-label-table-without-columns", "roi",
             lambda ws: {"atlas": _atlas(ws), "l": _text(ws, "labels.tsv", "id\tlabel\n1\ta\n2\tb\n")},
             extra=[("--roi-mask", "{atlas}"), ("--atlas-labels", "{l}")], expect=("labels.tsv", "'index'", "'name'")),
        Case("atlas-label-name-without-table", "roi", lambda ws: {"atlas": _atlas(ws)},
             extra=[("--roi-label", "{atlas}:Insula")], expect=("--roi-label", "atlas.nii.gz", "--atlas-labels")),
        Case("design-missing-values", "design",
             lambda ws: _participants_case(ws, lambda t: t.assign(age=t.age.where(t.index != 2))),
             expect=("age",)),
        Case("design-constant-column", "design", lambda ws: _participants_case(ws, lambda t: t.assign(age=40)),
             expect=("age",)),
        Case("design-missing-column", "design", extra=[("--covariate", "height")], expect=("height",)),
        Case("design-constant-variable", "design", lambda ws: _participants_case(ws, lambda t: t.assign(pcs=3)),
             expect=("pcs", "--variable")),
        Case("too-few-volumes", "simulate", extra=[("--n-volumes", "10")], expect=("--n-volumes",)),
        Case("malformed-toml", "study-run", lambda ws: {"study": _text(ws, "bad.toml", "[inputs\nx=")},
             expect=("bad.toml",)),
        Case("unknown-key", "study-run",
             lambda ws: {"study": _text(ws, "bad.toml", ws["study"].read_text() + "\n[qc]\nabs_treshold = 2\n")},
             expect=("abs_treshold",)),
        Case("derivatives-missing", "study-run",
             lambda ws: {"study": _text(ws, "bad.toml", ws["study"].read_text().replace('"."', '"nowhere"'))},
             expect=("nowhere",)),
        Case("negative-n-perm", "study-run",
             lambda ws: {"study": _text(ws, "bad.toml", ws["study"].read_text() + "\n[inference]\nn_perm = -3\n")},
             expect=("n_perm",)),
    ]
    for command in COMMANDS:
        if command == "study-run":
            continue
        cases.append(Case("output-under-a-file", command, lambda ws: {"out": _text(ws, "a_file", "x") / "sub"},
                          expect=("a_file",)))
        cases.append(Case("output-not-writable", command, inject="eacces", expect=("out",)))
        cases.append(Case("disk-full-first-write", command, inject="full-first", expect=("out",)))
        cases.append(Case("disk-full-later-write", command, inject="full-later", expect=("out",)))
    return cases


CASES = _cases()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


class _FullDisk:
    """``os`` for :mod:`gpuconn.core.io` whose atomic rename fails with ENOSPC after ``n_ok`` renames."""

    def __init__(self, n_ok: int):
        self.n_ok = n_ok

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if self.n_ok <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        self.n_ok -= 1
        return os.replace(src, dst)


def _inject(kind: str | None, monkeypatch) -> None:
    if kind == "eacces":
        def mkstemp(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr(gpuconn.core.io.tempfile, "mkstemp", mkstemp)
    elif kind == "full-first":
        monkeypatch.setattr(gpuconn.core.io, "os", _FullDisk(0))
    elif kind == "full-later":
        monkeypatch.setattr(gpuconn.core.io, "os", _FullDisk(1))


def _check_error(rc: int, err: str, expect: tuple[str, ...]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, "exit code 0 for a bad input"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("gpuconn: error:"), line
    for word in expect:
        assert word.lower() in line.lower(), f"message does not name {word!r}: {line}"
    return line


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}:{c.id}" for c in CASES])
def test_bad_input(case: Case, ws, capsys, monkeypatch):
    overrides = case.make(ws)
    argv = _argv(case.command, ws, overrides, case.extra, case.argv)
    before = _files(ws["in"].parent)
    capsys.readouterr()
    _inject(case.inject, monkeypatch)
    rc = run(argv)
    monkeypatch.undo()
    line = _check_error(rc, capsys.readouterr().err, case.expect)
    left = _files(ws["in"].parent) - before
    assert not left, f"{line}\nleft behind: {sorted(str(p.relative_to(ws['in'].parent)) for p in left)}"
    _MESSAGES[(case.command, case.id)] = line


_MESSAGES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_catalogue():
    """With GPUCONN_CATALOGUE=file.md, write every case and its message (for the issue note)."""
    yield
    target = os.environ.get("GPUCONN_CATALOGUE")
    if target and _MESSAGES:
        rows = [f"| {c} | {i} | `{m.removeprefix('gpuconn: error: ')}` |" for (c, i), m in sorted(_MESSAGES.items())]
        Path(target).write_text("| command | case | message |\n|---|---|---|\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("command", ["randomise", "denoise", "clusters"])
def test_controls_pass(command, ws, capsys):
    """The catalogue's baseline: the untouched workspace runs (a case fails only for its fault)."""
    assert run(_argv(command, ws, {}, [])) == 0, capsys.readouterr().err
    assert _files(ws["out"])


@pytest.mark.parametrize("command", ["randomise", "denoise"])
def test_subprocess_one_line_no_traceback(command, ws):
    """Through ``python -m gpuconn.cli`` too: a missing file is one line on stderr, exit 2, no traceback."""
    argv = _argv(command, ws, {"mask": ws["in"] / "nope_mask.nii.gz"}, [])
    proc = subprocess.run([sys.executable, "-m", "gpuconn.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = _check_error(proc.returncode, proc.stderr, ("nope_mask",))
    assert "not found" in line
    assert not ws["out"].exists()


def test_n_above_distinct_rearrangements_is_exhaustive(ws, capsys):
    """Documented: -n above the number of distinct rearrangements runs the exhaustive test (as FSL)."""
    design = _vest(ws["in"] / "small.mat", np.ones((4, 1)))
    maps = _image(ws["in"] / "small.nii.gz", np.asarray(nib.load(str(ws["maps"])).dataobj)[..., :4])
    argv = ["randomise", "-i", str(maps), "-d", str(design), "-t", str(ws["con"]).replace("design.con", "one.con"),
            "-m", str(ws["mask"]), "-n", "5000", "-o", str(ws["out"] / "r"), "-q", "--device", "cpu"]
    _vest(ws["in"] / "one.con", np.array([[1.0]]), "NumContrasts")
    assert run(argv) == 0, capsys.readouterr().err
    record = json.loads((ws["out"] / "r.json").read_text())["Parameters"]
    assert record["exhaustive"] and record["n_perm"] == 2 ** 4 == record["n_possible"]


@pytest.mark.parametrize("command", ["randomise", "seed", "denoise"])
def test_constant_voxels(command, ws, capsys):
    """Documented: voxels constant in time/subjects give finite outputs (0 statistic, 0 residual), not NaN.

    Tolerance: the denoised residual of a constant series is 0 up to float64
    round-off of the projection (|x| < 1e-6 of a value of 7).
    """
    slot = DATA[command]
    data = np.asarray(nib.load(str(ws[slot])).dataobj).copy()
    data[2, 3, 2, :] = 7.0
    argv = _argv(command, ws, {slot: _bad_image(ws, slot, "constant", data)}, [])
    assert run(argv) == 0, capsys.readouterr().err
    for path in ws["out"].rglob("*.nii.gz"):
        values = np.asarray(nib.load(str(path)).dataobj)
        assert np.isfinite(values).all(), path.name
        if path.name.endswith("_desc-brain_mask.nii.gz"):  # the mask a run was denoised in: 1 inside, not a statistic
            continue
        assert np.allclose(values[2, 3, 2], 0, atol=1e-6), path.name


def test_clusters_non_finite(ws, capsys):
    """Documented: 'gpuconn clusters' treats NaN/Inf voxels as outside every cluster (as FSL cluster)."""
    data = np.asarray(nib.load(str(ws["stat"])).dataobj).copy()
    data[2, 3, 2], data[3, 3, 2] = np.nan, np.inf
    argv = _argv("clusters", ws, {"stat": _bad_image(ws, "stat", "nan", data)}, [])
    assert run(argv) == 0, capsys.readouterr().err
    index = np.asarray(nib.load(str(ws["out"] / "cl_cluster_index.nii.gz")).dataobj)
    assert index[2, 3, 2] == 0 and index[3, 3, 2] == 0


def test_gzip_corrupt_not_truncated(ws, capsys):
    """A .nii.gz whose bytes are not gzip at all is named too."""
    path = ws["in"] / "garbage.nii.gz"
    path.write_bytes(b"not a nifti" * 10)
    argv = _argv("randomise", ws, {"maps": path}, [])
    line = _check_error(run(argv), capsys.readouterr().err, ("garbage.nii.gz",))
    assert not ws["out"].exists(), line


def test_output_transaction_semantics(tmp_path):
    """Files created in a failed block are removed; files that existed before and successful blocks are kept."""
    from gpuconn.core.io import output_transaction, write_text

    old = write_text(tmp_path / "old.txt", "before")
    with pytest.raises(RuntimeError):
        with output_transaction():
            write_text(tmp_path / "new.txt", "x")
            write_text(old, "overwritten")
            with output_transaction() as inner:  # a nested block that succeeds hands its files up
                write_text(tmp_path / "inner.txt", "y")
            assert inner == [tmp_path / "inner.txt"]
            raise RuntimeError("fails after three writes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    assert old.read_text() == "overwritten"  # an overwritten file cannot be restored; it is not deleted
    with pytest.raises(SystemExit):
        with output_transaction():  # a CLI that ends normally exits with code 0: success
            write_text(tmp_path / "kept.txt", "z")
            raise SystemExit(0)
    assert (tmp_path / "kept.txt").exists()


def test_participants_csv_is_read(ws, capsys):
    """Documented: a participants file named .csv is read comma-separated (the same design as the TSV)."""
    csv = ws["in"] / "participants.csv"
    pd.read_csv(ws["participants"], sep="\t").to_csv(csv, index=False)
    assert run(_argv("design", ws, {}, [])) == 0, capsys.readouterr().err
    assert run(_argv("design", ws, {"participants": csv, "out": ws["out"] / "csv"}, [])) == 0, capsys.readouterr().err
    assert (ws["out"] / "csv" / "des.mat").read_text() == (ws["out"] / "des.mat").read_text()


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_negative_seed_coord_and_default_radius(form, ws, capsys):
    """``--seed-coord -2,-4,0`` and ``--seed-coord=-2,-4,0`` (a negative first number) both work; no --radius: 6 mm."""
    argv = [t for t in _argv("seed", ws, {}, []) if t not in ("--radius", "6")]
    at = argv.index("--seed-coord")
    argv[at: at + 2] = ["--seed-coord", "-2,-4,0"] if form == "separate" else ["--seed-coord=-2,-4,0"]
    assert run(argv) == 0, capsys.readouterr().err
    sidecar = next((ws["out"] / "seed").glob("*.json"))
    seeds = json.loads(sidecar.read_text())["Parameters"]["seeds"]
    assert seeds == [{"name": "seed1", "centers_mm": [[-2.0, -4.0, 0.0]], "radius_mm": 6.0}]


def test_rotations_like_degrees_warn(ws, capsys):
    """Rotations above 0.5 rad (but below 2 pi) run, with a one-line warning that they look like degrees."""
    par = _text(ws, "deg.par", "".join(f"{2 * np.sin(t / 9):.4f} 0.5 -1 0.1 0.2 0.3\n" for t in range(N_VOLUMES)))
    assert run(_argv("denoise", ws, {}, [("--motion-par", str(par)), ("--outlier-metric", "none")])) == 0
    err = capsys.readouterr().err
    assert "gpuconn: warning: motion parameters" in err and "deg.par" in err and "look like degrees" in err, err


def test_participant_ids_spelled_as_in_the_table(ws, capsys):
    """Documented: participant_id values such as 001 stay 001 in the outputs (read as text, not as the number 1)."""
    table = pd.read_csv(ws["participants"], sep="\t")
    table["participant_id"] = [f"{i:03d}" for i in range(len(table))]
    table.to_csv(ws["in"] / "bare.tsv", sep="\t", index=False)
    assert run(_argv("design", ws, {"participants": ws["in"] / "bare.tsv"}, [])) == 0, capsys.readouterr().err
    written = pd.read_csv(ws["out"] / "des.tsv", sep="\t", dtype=str)
    assert written["participant_id"].tolist() == table["participant_id"].tolist()
