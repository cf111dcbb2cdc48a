"""Find runs in a fMRIPrep-style derivatives folder by their BIDS entities.

A run is one preprocessed BOLD series in MNI space with the files fMRIPrep
writes beside it: brain mask, confounds TSV, and (from the raw dataset, or
beside the BOLD as the simulator writes them) physiological recordings, plus
the subject's WM/CSF probability maps in the same space.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = ["Run", "find_runs", "DEFAULT_SPACE"]

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
    """

    subject: str
    session: str | None
    bold: Path
    mask: Path | None = None
    confounds: Path | None = None
    physio: Path | None = None
    wm: Path | None = None
    csf: Path | None = None

    @property
    def label(self) -> str:
        """``sub-XX`` or ``sub-XX_ses-YY``: the prefix of this run's outputs."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def prefix(self) -> str:
        """The BOLD file name up to (not including) its ``_space-`` entity."""
        return self.bold.name.split("_space-")[0]


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
        fMRIPrep-style derivatives folder (``sub-*/[ses-*/]func/...``).
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
