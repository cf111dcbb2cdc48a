"""Subject series I/O shared by the connectivity maps: BOLD discovery, checks, masks, streaming.

- :class:`BoldInput` and :func:`bold_inputs`: the runs to analyse, from
  ``--bold`` files or a fMRIPrep-style derivatives folder (afni_proc.py
  results with their censor file);
  :func:`prepare_inputs` validates them (headers only) and places the
  regions on each run's mask; :func:`stream_inputs` yields their data
  without the censored volumes, reading the next runs on threads
  meanwhile (seed maps, ROI values).
- :func:`check_subjects`, :func:`common_mask`, :func:`read_series` and
  :func:`iter_series`: subject series on one grid for group ICA and dual
  regression (FSL's common mask; reading ahead on threads).
- :func:`matrix_text`: matrices as FSL-style text (``melodic_mix``,
  ``dr_stage1_*.txt``).

Both readers read ahead through :func:`gpuconn.core.prefetch.prefetch`,
bounded by host memory, with the data of a serial read.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..core.afni import read_censor_1d
from ..core.bids import DEFAULT_SPACE, find_runs
from ..core.errors import InputError, OptionError
from ..core.io import check_same_grid, load_header, load_image, load_mask, load_masked, sidecar_path, split_ext
from ..core.prefetch import images_ahead, prefetch
from ..core.progress import progress_bar
from ..subject.denoise import SPIKE_VOLUMES_KEY
from .regions import Region, region_masks, region_weights

__all__ = [
    "BoldInput",
    "label_entities",
    "bold_inputs",
    "PreparedInput",
    "prepare_inputs",
    "stream_inputs",
    "check_subjects",
    "read_series",
    "common_mask",
    "iter_series",
    "matrix_text",
]


_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")



@dataclass(frozen=True)
class BoldInput:
    """One 4D series to analyse: its output label, BOLD file and brain mask.

    Attributes
    ----------
    label : str
    bold, mask : Path
    censor : Path or None
        afni_proc.py censor file (``censor_<subj>_combined_2.1D``: one row
        per volume, 1 = keep, 0 = censor); the censored volumes are left out
        of everything computed from the run (afni_proc's ``errts`` holds
        zeros there).
    """

    label: str
    bold: Path
    mask: Path
    censor: Path | None = None

    @property
    def entities(self) -> dict[str, str | None]:
        """``subject`` and ``session`` parsed from the label (None when absent)."""
        return label_entities(self.label)



def label_entities(text: str) -> dict[str, str | None]:
    """``subject`` and ``session`` from the ``sub-``/``ses-`` entities of a label or file stem (None when absent)."""
    found = dict(_ENTITY.findall(text))
    return {"subject": found.get("sub"), "session": found.get("ses")}



@dataclass(frozen=True)
class PreparedInput:
    """A validated run with its regions placed (see :func:`prepare_inputs`).

    Attributes
    ----------
    source : BoldInput
    mask : ndarray of bool, shape (x, y, z)
        The run's brain mask.
    weights : ndarray of float32, shape (n_regions, n_voxels)
        Region averaging weights over the mask's voxels (:func:`gpuconn.maps.regions.region_weights`).
    keep : ndarray of bool, shape (n_volumes,), or None
        The volumes :func:`stream_inputs` yields (None: all); from the
        run's censor file, or the spike volumes its gpuconn denoise sidecar lists.
    censor_source : str or None
        Where ``keep`` comes from (a file, or ``<sidecar> SpikeCensoredVolumes``).
    """

    source: BoldInput
    mask: np.ndarray
    weights: np.ndarray
    keep: np.ndarray | None = None
    censor_source: str | None = None

    @property
    def n_censored(self) -> int:
        """How many volumes the censoring leaves out (0 without any)."""
        return 0 if self.keep is None else int((~self.keep).sum())

    def kept_volumes(self) -> list[int] | str:
        """The 0-based volumes :func:`stream_inputs` yields, or ``'all'``."""
        return "all" if self.keep is None else np.flatnonzero(self.keep).tolist()

    def censor_record(self) -> dict:
        """Sidecar entries for the censoring: ``censor`` (its source) and ``censored_volumes``; empty without any."""
        if self.keep is None:
            return {}
        return {"censor": self.censor_source, "censored_volumes": self.n_censored}



def prepare_inputs(
    inputs: Sequence[BoldInput], regions: Sequence[Region], *, what: str
) -> tuple[list[PreparedInput], nib.Nifti1Image]:
    """Validate every input and place the regions on each run's mask, reading headers only (before any output).

    Parameters
    ----------
    inputs : sequence of BoldInput
    regions : sequence of Region
    what : {'seed', 'ROI'}
        For error messages.

    Returns
    -------
    prepared : list of PreparedInput
        In input order; runs sharing a mask file share its weights.
    reference : nibabel.Nifti1Image
        The first run's header (all runs are checked to be on its grid).

    Raises
    ------
    InputError
        No input, repeated labels, a missing/unreadable/non-4D BOLD or one
        with fewer than 3 volumes (kept by its censoring), grids that
        differ, a bad mask, a region with no voxel in a mask, or a censor
        file that is unreadable or not one row per volume.

    Notes
    -----
    A run's volumes are censored by its censor file (afni_proc.py's), else,
    for a gpuconn denoise output, by the volumes its sidecar lists under
    ``SpikeCensoredVolumes`` (fitted by spike regressors, all zero).
    """
    if not inputs:
        raise InputError("no BOLD input given; use --bold or --derivatives")
    labels = [item.label for item in inputs]
    repeated = sorted({lab for lab in labels if labels.count(lab) > 1})
    if repeated:
        raise InputError(f"two inputs share the output label(s) {', '.join(repeated)}; give each run its own file name")
    prepared: list[PreparedInput] = []
    masks: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    first_img, first_path = None, None
    for item in inputs:
        header = load_header(item.bold, ndim=4, what="BOLD")
        if header.shape[3] < 3:
            raise InputError(f"BOLD {item.bold} has shape {header.shape}; expected a 4D series with at least 3 volumes")
        keep, censor_source = _censor_keep(item, header.shape[3])
        if first_img is None:
            first_img, first_path = header, item.bold
        check_same_grid(first_img, first_path, header, item.bold)
        if item.mask not in masks:
            mask, _ = load_mask(item.mask, reference=header, reference_path=item.bold, what="brain mask")
            found = region_masks(regions, header, mask=mask, reference_path=item.bold, mask_path=item.mask, what=what)
            masks[item.mask] = (mask, region_weights(found, mask))
        mask, weights = masks[item.mask]
        prepared.append(PreparedInput(item, mask, weights, keep, censor_source))
    return prepared, first_img



def _spike_volumes(bold: Path) -> tuple[list[int], Path] | None:
    """The volumes a gpuconn denoise output's sidecar lists as spike-censored (None without such a sidecar)."""
    sidecar = sidecar_path(bold)
    if not sidecar.is_file():
        return None
    try:
        volumes = json.loads(sidecar.read_text()).get("Parameters", {}).get(SPIKE_VOLUMES_KEY)
    except (json.JSONDecodeError, OSError, AttributeError):
        return None
    if not isinstance(volumes, list) or not all(isinstance(v, int) for v in volumes):
        return None
    return volumes, sidecar


def _censor_keep(item: BoldInput, n_volumes: int) -> tuple[np.ndarray | None, str | None]:
    """The volumes a run keeps and where that comes from, checked against the run's length ((None, None): all).

    From the run's censor file (afni_proc.py), else from the sidecar of a
    gpuconn denoise output: the volumes it fitted with spike regressors are
    all zero, and are left out, not correlated as zeros.
    """
    if item.censor is not None:
        keep, source, what = ~read_censor_1d(item.censor).any(axis=1), str(item.censor), f"censor file {item.censor}"
    elif (spikes := _spike_volumes(item.bold)) is not None and spikes[0]:
        volumes, sidecar = spikes
        if max(volumes) >= n_volumes or min(volumes) < 0:
            raise InputError(f"{sidecar} lists {SPIKE_VOLUMES_KEY} up to {max(volumes)} but BOLD {item.bold} has "
                             f"{n_volumes} volumes; give the sidecar of this run")
        keep = np.ones(n_volumes, dtype=bool)
        keep[volumes] = False
        source, what = f"{sidecar} {SPIKE_VOLUMES_KEY}", f"the spike censoring of {sidecar}"
    else:
        return None, None
    if len(keep) != n_volumes:
        raise InputError(f"censor file {item.censor} has {len(keep)} rows but BOLD {item.bold} has {n_volumes} volumes; "
                         "give the censor file of this run (one row per volume)")
    if keep.sum() < 3:
        raise InputError(f"{what} keeps {int(keep.sum())} of the {n_volumes} volumes of {item.bold}; "
                         "a correlation needs at least 3: leave this run out")
    return keep, source


def _load_series(item: PreparedInput) -> np.ndarray:
    data = load_masked(item.source.bold, item.mask, ndim=4, what="BOLD")
    return data if item.keep is None else data[item.keep]



def stream_inputs(prepared: Sequence[PreparedInput], *, ahead: int = 2) -> Iterator[tuple[PreparedInput, np.ndarray]]:
    """Yield each run with its ``(n_kept, n_voxels)`` float32 data, reading the next ones on threads meanwhile.

    ``n_kept`` is the run's volumes less those its censor file leaves out
    (:attr:`PreparedInput.keep`).

    Reading goes through :func:`gpuconn.core.prefetch.prefetch`: up to
    ``ahead`` runs are read on two threads in a copy of the caller's context
    (its :func:`gpuconn.core.backend.device_scope`: FEAT inputs resample
    there), fewer when they would take over a quarter of the host's
    available memory; the data are those of a serial read. ``ahead=0`` reads each run when it is reached.

    Raises
    ------
    InputError
        A BOLD file that does not decode or has NaN/Inf inside its mask
        (found on reading, after the runs before it were yielded).
    """
    ahead = images_ahead(prepared[0].source.bold, ahead, n_items=len(prepared), what="BOLD") if prepared else 0
    yield from zip(prepared, prefetch(prepared, _load_series, ahead=ahead), strict=True)


def _run_label(path: Path) -> str:
    """Output prefix of a BOLD file: its name up to ``_space-`` (or without extension and ``_bold``)."""
    stem = Path(split_ext(path.name)[0]).name
    return stem.split("_space-")[0].removesuffix("_bold")



def bold_inputs(
    *,
    bold: Sequence[str | os.PathLike] = (),
    mask: str | os.PathLike | None = None,
    derivatives: str | os.PathLike | None = None,
    participant_label: Sequence[str] | None = None,
    desc: str = "preproc",
    space: str = DEFAULT_SPACE,
) -> list[BoldInput]:
    """The runs to analyse, from BOLD files or a derivatives folder.

    Parameters
    ----------
    bold : sequence of path
        4D files (``--bold``); they need ``mask``.
    mask : path, optional
        Brain mask for every run; with ``derivatives`` it replaces each run's
        own ``*_desc-brain_mask`` (required where a run has none).
    derivatives : path, optional
        A fMRIPrep-style folder searched with :func:`gpuconn.core.bids.find_runs`.
    participant_label : sequence of str, optional
    desc : str, default 'preproc'
        ``desc-`` entity of the BOLD files there (e.g. ``denoised``).
    space : str
        ``space-`` entity.

    Returns
    -------
    list of BoldInput
        Labelled by the file name up to ``_space-`` (e.g.
        ``sub-01_ses-pre_task-rest``); afni_proc.py runs carry their censor
        file.

    Raises
    ------
    OptionError
        Both or neither of ``bold`` and ``derivatives``, ``bold`` without
        ``mask``, or a run under ``derivatives`` without its brain mask and no
        ``mask`` (named as the CLI's ``--bold``/``--mask``/``--derivatives``).
    """
    if bool(bold) == (derivatives is not None):
        raise OptionError("give either {bold} files (with {mask}) or {derivatives}, not both or neither")
    if derivatives is None:
        if mask is None:
            raise OptionError("{bold} needs {mask} (a brain mask on the BOLD grid)")
        return [BoldInput(_run_label(Path(path)), Path(path), Path(mask)) for path in bold]
    inputs = []
    for run in find_runs(derivatives, participant_label=participant_label, space=space, desc=desc):
        run_mask = Path(mask) if mask is not None else run.mask
        if run_mask is None:
            raise OptionError(f"no brain mask (*_desc-brain_mask.nii.gz) beside {run.bold}; give one with {{mask}}")
        inputs.append(BoldInput(run.prefix, run.bold, run_mask, run.censor))
    return inputs


def check_subjects(
    subject_paths: Sequence[str | os.PathLike],
    reference: nib.Nifti1Image,
    reference_path: str | os.PathLike,
    *,
    min_volumes: int,
    purpose: str,
) -> list[int]:
    """Check every subject series against a reference grid, reading headers only.

    Parameters
    ----------
    subject_paths : sequence of path-like
        4D series, in order.
    reference : nibabel.Nifti1Image
        Image whose grid (shape and affine) every subject must share.
    reference_path : path-like
        Its file, named in errors.
    min_volumes : int
        Fewest volumes a subject may have.
    purpose : str
        Why ``min_volumes`` are needed, for the error message.

    Returns
    -------
    list of int
        Number of volumes of each subject.

    Raises
    ------
    InputError
        A missing or unreadable file, a 3D image, a grid mismatch, or too few volumes.
    """
    if not subject_paths:
        raise InputError("no subject series given; pass one 4D image per subject")
    n_volumes = []
    for path in map(Path, subject_paths):
        img = load_header(path, what="subject series")
        if len(img.shape) != 4:
            raise InputError(f"subject series {path} has shape {img.shape}; expected a 4D series (x, y, z, time)")
        check_same_grid(reference, reference_path, img, path)
        if img.shape[3] < min_volumes:
            raise InputError(
                f"subject series {path} has {img.shape[3]} volumes but {purpose} needs at least {min_volumes}; "
                "leave this subject out or use fewer components"
            )
        n_volumes.append(int(img.shape[3]))
    return n_volumes



def read_series(path: str | os.PathLike, mask: np.ndarray) -> np.ndarray:
    """A subject's masked series, ``(n_volumes, n_voxels)`` float32."""
    return load_masked(path, mask, ndim=4, what="subject series")



def common_mask(
    subject_paths: Sequence[str | os.PathLike],
    *,
    progress: bool = False,
) -> np.ndarray:
    """Voxels with non-zero temporal standard deviation in every subject (FSL's common mask).

    ``dual_regression`` builds its mask as ``fslmaths subj -Tstd -bin`` per
    subject, then the minimum over subjects; the same here, one subject in
    memory at a time. Voxels that are NaN or infinite in any subject are left
    out too.

    Parameters
    ----------
    subject_paths : sequence of path-like
        4D series on one grid (checked by the caller).
    progress : bool, default False

    Returns
    -------
    ndarray of bool, shape (x, y, z)

    Raises
    ------
    InputError
        If no voxel survives.
    """
    mask = None
    with progress_bar("common mask", len(subject_paths), enabled=progress) as advance:
        for path in subject_paths:
            data = np.asarray(load_image(path, ndim=4, what="subject series").dataobj, dtype=np.float32)
            finite = np.isfinite(data).all(axis=3)
            varying = np.nan_to_num(data).std(axis=3) > 0
            mask = (finite & varying) if mask is None else (mask & finite & varying)
            advance()
    if not mask.any():
        raise InputError(
            "no voxel varies over time in every subject (common mask is empty); "
            "check the inputs or pass --mask"
        )
    return mask



def iter_series(paths: Sequence[Path], mask: np.ndarray, n_ahead: int) -> Iterator[np.ndarray]:
    """Yield each subject's masked series, ``(n_volumes, n_voxels)`` float32, in order.

    Up to ``n_ahead`` files are read ahead on two threads
    (:func:`gpuconn.core.prefetch.prefetch`; NIfTI decoding and gzip release
    the GIL), so reading overlaps the device work; fewer when they would
    take over a quarter of the host's available memory. Besides the
    subjects the caller holds, memory holds at most ``n_ahead`` more; 0
    reads each subject when it is reached.
    """
    ahead = images_ahead(paths[0], n_ahead, n_items=len(paths), what="subject series") if paths else 0
    yield from prefetch(paths, functools.partial(read_series, mask=mask), ahead=ahead)



def matrix_text(matrix: np.ndarray) -> str:
    """A matrix as FSL-style text: one row per line, values separated by two spaces."""
    return "\n".join("  ".join(f"{v:.8g}" for v in row) for row in np.atleast_2d(matrix)) + "\n"
