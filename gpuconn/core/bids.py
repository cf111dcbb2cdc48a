"""Find runs in a fMRIPrep-style derivatives folder by their BIDS entities.

A run is one preprocessed BOLD series in MNI space with the files fMRIPrep
writes beside it: brain mask, confounds TSV, and (from the raw dataset, or
beside the BOLD as the simulator writes them) physiological recordings, plus
the subject's WM/CSF probability maps in the same space. afni_proc.py
``<subj>.results`` folders are found as runs too (:func:`find_results_runs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = ["Run", "find_runs", "DEFAULT_SPACE", "is_results_layout", "find_results_runs"]

DEFAULT_SPACE = "MNI152NLin2009cAsym"
_ENTITY = re.compile(r"(?P<key>[a-z]+)-(?P<value>[a-zA-Z0-9]+)")


@dataclass(frozen=True)
class Run:
    """One BOLD run and its companion files (None where absent).

    Attributes
    ----------
    subject : str
        Label without ``sub-``.
    session : str or None
        Label without ``ses-``.
    bold : Path
        ``*_space-<space>_desc-preproc_bold.nii.gz``.
    mask, confounds, physio, wm, csf : Path or None
        Brain mask, ``*_desc-confounds_timeseries.tsv``, ``*_physio.tsv.gz``
        (with its JSON), and ``*_label-WM/CSF_probseg.nii.gz`` (from the
        session's ``anat`` folder when it has one, else the subject's).
    motion, censor : Path or None
        Motion parameters and censor file outside the confounds TSV
        (afni_proc.py's ``dfile_rall.1D`` and ``censor_*_combined_2.1D``,
        FEAT's ``.par``).
    """

    subject: str
    session: str | None
    bold: Path
    mask: Path | None = None
    confounds: Path | None = None
    physio: Path | None = None
    wm: Path | None = None
    csf: Path | None = None
    motion: Path | None = None
    censor: Path | None = None

    @property
    def label(self) -> str:
        """``sub-XX`` or ``sub-XX_ses-YY``: the prefix of this run's outputs."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def prefix(self) -> str:
        """The BOLD file name up to (not including) its ``_space-`` entity (:attr:`label` when it has none)."""
        return self.bold.name.split("_space-")[0] if "_space-" in self.bold.name else self.label


def _entities(name: str) -> dict[str, str]:
    return {m["key"]: m["value"] for m in _ENTITY.finditer(name.split(".")[0])}


def _first(paths: list[Path]) -> Path | None:
    return sorted(paths)[0] if paths else None


def _probseg(folders: list[Path], space: str, label: str) -> Path | None:
    """The ``*space-<space>*label-<label>_probseg.nii[.gz]`` of the first folder that has one (session anat first)."""
    for folder in (f for f in folders if f.is_dir()):
        found = [p for p in folder.iterdir() if f"space-{space}" in p.name and f"label-{label}_probseg.nii" in p.name]
        if found:
            return _first(found)
    return None


def find_runs(
    root: str | os.PathLike,
    *,
    participant_label: Sequence[str] | None = None,
    space: str = DEFAULT_SPACE,
    desc: str = "preproc",
) -> list[Run]:
    """List the preprocessed BOLD runs under a derivatives folder.

    Parameters
    ----------
    root : path-like
        fMRIPrep-style derivatives folder (``sub-*/[ses-*/]func/...``), or
        afni_proc.py ``*.results`` folders (see
        :func:`find_results_runs`; ``space`` is not used).
    participant_label : sequence of str, optional
        Subjects to keep (with or without ``sub-``); empty or None keeps all.
    space : str, default 'MNI152NLin2009cAsym'
        The ``space-`` entity of the BOLD files.
    desc : str, default 'preproc'
        The ``desc-`` entity of the BOLD files (e.g. ``'denoised'`` for
        ``*_desc-denoised_bold.nii.gz``).

    Returns
    -------
    list of Run
        Sorted by subject, session, file name.

    Raises
    ------
    InputError
        If the folder is missing or holds no matching BOLD file.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"derivatives folder not found: {root}")
    if is_results_layout(root):  # afni_proc.py *.results folders
        return find_results_runs(root, participant_label=participant_label, desc=desc)
    wanted = {label.removeprefix("sub-") for label in participant_label} if participant_label else None
    runs = []
    for bold in sorted(root.glob(f"sub-*/**/func/*_space-{space}*_desc-{desc}_bold.nii*")):
        ents = _entities(bold.name)
        subject, session = ents.get("sub"), ents.get("ses")
        if subject is None or (wanted is not None and subject not in wanted):
            continue
        func = bold.parent
        prefix = bold.name.split("_space-")[0]
        space_part = bold.name.split(f"_desc-{desc}_bold")[0]
        anat_dirs = [root / f"sub-{subject}" / "anat"]
        if session:
            anat_dirs.insert(0, root / f"sub-{subject}" / f"ses-{session}" / "anat")
        runs.append(
            Run(
                subject=subject,
                session=session,
                bold=bold,
                mask=_first(list(func.glob(f"{space_part}_desc-brain_mask.nii*"))),
                confounds=_first(list(func.glob(f"{prefix}_desc-confounds_time*.tsv"))),
                physio=_first(list(func.glob(f"{prefix}*_physio.tsv.gz"))),
                wm=_probseg(anat_dirs, space, "WM"),
                csf=_probseg(anat_dirs, space, "CSF"),
            )
        )
    if not runs:
        which = f" for participant(s) {sorted(wanted)}" if wanted else ""
        raise InputError(
            f"no *_space-{space}_desc-{desc}_bold.nii.gz files{which} under {root}; "
            "is this a fMRIPrep derivatives folder?"
        )
    return sorted(runs, key=lambda r: (r.subject, r.session or "", r.bold.name))


# afni_proc.py results folders (<subj>.results): the runs AFNI's pipeline leaves.
_RESULTS = ".results"


def _results_folders(root: Path) -> list[Path]:
    if root.name.endswith(_RESULTS) and root.is_dir():
        return [root]
    found: list[Path] = []
    for pattern in (f"*{_RESULTS}", f"*/*{_RESULTS}", f"*/*/*{_RESULTS}"):
        found += [p for p in root.glob(pattern) if p.is_dir()]
    return sorted(found)


def is_results_layout(root: str | os.PathLike) -> bool:
    """Whether ``root`` is an afni_proc.py ``*.results`` folder or holds some (up to two levels down)."""
    root = Path(root)
    return root.is_dir() and bool(_results_folders(root))


def _dataset(folder: Path, *prefixes: str) -> Path | None:
    """The first ``<prefix>+tlrc.HEAD`` (then ``+orig``) found, in the order given."""
    for view in ("tlrc", "orig"):
        for prefix in prefixes:
            head = folder / f"{prefix}+{view}.HEAD"
            if head.exists():
                return head
    return None


def find_results_runs(
    root: str | os.PathLike,
    *,
    participant_label=None,
    desc: str = "preproc",
) -> list:
    """The runs of afni_proc.py results folders, as :class:`Run` objects.

    Parameters
    ----------
    root : path-like
        A ``<subj>.results`` folder or a folder holding them.
    participant_label : sequence of str, optional
        Subjects to keep (with or without ``sub-``).
    desc : {'preproc', 'denoised'}
        ``preproc``: ``all_runs`` (to denoise with the motion and censor
        files); ``denoised``: the residual series ``errts``.

    Returns
    -------
    list of Run
        Subject from the folder name (``sub-`` removed), session from a
        ``ses-`` entity in the path; ``motion`` and ``censor`` set when the
        files exist.

    Raises
    ------
    InputError
        An unknown ``desc``, a folder without the series asked for or
        without a mask, or no folder left.
    """
    if desc not in ("preproc", "denoised"):
        raise InputError(f"afni_proc results have desc 'preproc' (all_runs) or 'denoised' (errts), not {desc!r}")
    root = Path(root)
    wanted = {label.removeprefix("sub-") for label in participant_label} if participant_label else None
    runs = []
    for folder in _results_folders(root):
        subj = folder.name[: -len(_RESULTS)]
        subject = subj.removeprefix("sub-")
        if wanted is not None and subject not in wanted:
            continue
        if desc == "denoised":
            bold = _dataset(folder, f"errts.{subj}.fanaticor", f"errts.{subj}.tproject", f"errts.{subj}")
            what = f"errts.{subj}+tlrc (afni_proc's residuals)"
        else:
            bold = _dataset(folder, f"all_runs.{subj}")
            what = f"all_runs.{subj}+tlrc (volume-registered runs); use the residuals with --bold-desc denoised"
        if bold is None:
            raise InputError(f"afni_proc folder {folder} has no {what}")
        mask = _dataset(folder, f"full_mask.{subj}", f"mask_epi_anat.{subj}")
        if mask is None:
            raise InputError(f"afni_proc folder {folder} has no full_mask.{subj}+tlrc; give a brain mask with --mask")
        session = next((part[4:] for part in folder.resolve().parts if part.startswith("ses-")), None)
        motion, censor = folder / "dfile_rall.1D", folder / f"censor_{subj}_combined_2.1D"
        runs.append(Run(subject=subject, session=session, bold=bold, mask=mask,
                        motion=motion if motion.exists() else None, censor=censor if censor.exists() else None))
    if not runs:
        which = f" for participant(s) {sorted(wanted)}" if wanted else ""
        raise InputError(f"no afni_proc.py *.results folder{which} under {root}")
    return sorted(runs, key=lambda r: (r.subject, r.session or ""))
