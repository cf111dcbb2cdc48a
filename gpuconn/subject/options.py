"""Options objects of the subject-level stages: each one's defaults and checks, in one place.

:class:`QcOptions` is taken by :func:`gpuconn.subject.qc.qc_table`
(``gpuconn qc``, a study's ``[qc]``) and :class:`DenoiseOptions` by
:func:`gpuconn.subject.denoise.denoise_runs` (``gpuconn denoise``, a study's
``[denoise]``, whose outlier rule is ``[qc]``'s); each command takes its
defaults from its object and the study file's section is filled from its
fields. This module imports nothing heavy, so the
CLI reads defaults without importing torch. A bad value raises
:class:`~gpuconn.core.errors.OptionError` naming the field, which the CLI shows
as its flag and the study runner as its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.errors import OptionError

__all__ = ["QC_METRICS", "QcOptions", "DenoiseOptions"]

#: Motion metrics that count outlier volumes: Power's framewise displacement, Jenkinson's relative RMS.
QC_METRICS = ("fd", "rms")


@dataclass(frozen=True, kw_only=True)
class QcOptions:
    """Motion QC: which runs are excluded and which volumes are outliers (defaults: the reference study).

    Attributes
    ----------
    abs_threshold : float, default 3.0
        mm; a run whose maximum absolute RMS displacement exceeds it is excluded.
    rel_threshold : float, default 2.0
        mm; a run whose maximum relative RMS displacement exceeds it is excluded.
    outlier_metric : {'fd', 'rms'}, default 'fd'
        Power's framewise displacement or Jenkinson's relative RMS displacement.
    outlier_threshold : float, default 0.5
        mm; volumes whose metric exceeds it are outliers (counted by QC,
        censored by denoising).

    Raises
    ------
    OptionError
        An unknown metric or a threshold that is not positive.
    """

    abs_threshold: float = 3.0
    rel_threshold: float = 2.0
    outlier_metric: Literal["fd", "rms"] = "fd"
    outlier_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.outlier_metric not in QC_METRICS:
            raise OptionError(f"{{outlier_metric}} {self.outlier_metric!r} is not one of {', '.join(QC_METRICS)}")
        for name in ("abs_threshold", "rel_threshold", "outlier_threshold"):
            if not getattr(self, name) > 0:
                raise OptionError(f"{{{name}}} must be a positive number of mm, got {getattr(self, name)}")


@dataclass(frozen=True)
class DenoiseOptions:
    """What goes into the nuisance model (defaults: the reference study).

    Attributes
    ----------
    motion : {'6', '24', 'none'}
        Motion parameters, Friston 24 expansion, or none.
    acompcor : int
        Number of aCompCor components (0: none).
    acompcor_mode : {'combined', 'separate'}
        One PCA of WM and CSF together, or ``acompcor`` components from each.
    tissue_threshold : float
        Probability above which a voxel is WM/CSF.
    erode : int
        Erosion iterations of the tissue masks.
    physio : {'auto', 'yes', 'no'}
        HR/RV regressors when a recording (or per-volume ``heart_rate`` and
        ``respiratory_volume`` confounds columns) is there, always (error
        when absent), or never.
    global_signal : bool
        Add the mean signal in the brain mask.
    outlier_metric : {'fd', 'rms', 'none'}
        Power FD or Jenkinson relative RMS for spike detection (default
        :class:`QcOptions`').
    outlier_threshold : float
        mm; volumes above it are outliers (default :class:`QcOptions`').
    censor : {'spikes', 'drop'}
    high_pass : float or None
        Hz; None for no high-pass.
    low_pass : float or None
        Hz; None for no low-pass.
    fwhm : float
        mm; 0 for no smoothing.
    columns : tuple of str
        Extra confound columns from the confounds TSV.
    min_dof : int
        Least residual degrees of freedom accepted.
    tr : float or None
        Repetition time (s); None reads it from the BOLD header.
    """

    motion: Literal["6", "24", "none"] = "6"
    acompcor: int = 5
    acompcor_mode: Literal["combined", "separate"] = "combined"
    tissue_threshold: float = 0.9
    erode: int = 1
    physio: Literal["auto", "yes", "no"] = "auto"
    global_signal: bool = False
    outlier_metric: Literal["fd", "rms", "none"] = QcOptions.outlier_metric
    outlier_threshold: float = QcOptions.outlier_threshold
    censor: Literal["spikes", "drop"] = "spikes"
    high_pass: float | None = 0.006
    low_pass: float | None = None
    fwhm: float = 6.0
    columns: tuple[str, ...] = ()
    min_dof: int = 10
    tr: float | None = None

    def __post_init__(self) -> None:
        choices = {
            "motion": ("6", "24", "none"),
            "acompcor_mode": ("combined", "separate"),
            "physio": ("auto", "yes", "no"),
            "outlier_metric": ("fd", "rms", "none"),
            "censor": ("spikes", "drop"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise OptionError(f"{{{name}}} {value!r} is not one of {', '.join(allowed)}")
        for name in ("acompcor", "erode", "fwhm", "min_dof"):
            if getattr(self, name) < 0:
                raise OptionError(f"{{{name}}} must be >= 0, got {getattr(self, name)}")
        for name in ("high_pass", "low_pass"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise OptionError(f"{{{name}}} must be >= 0 Hz, got {value}")
