"""Options objects of the connectivity-map stages: each stage's defaults and checks, in one place.

The library functions take these objects; the CLI takes its defaults from
them (``gpuconn.cli.options.stage_options`` builds one from a command's
arguments) and the study file's sections are filled and checked by them.
This module imports nothing heavy, so the CLI can read defaults without
importing torch. A bad value raises :class:`~gpuconn.core.errors.OptionError`
naming the field, which the CLI shows as its flag and the study runner as
its key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import OptionError

__all__ = ["ICAOptions", "DualRegOptions"]


@dataclass(frozen=True, kw_only=True)
class ICAOptions:
    """Group ICA settings: their one home (defaults and checks) for the library, ``gpuconn ica run`` and ``[ica]``.

    Attributes
    ----------
    dim : int, default 10
        Number of components.
    subject_dim : int, optional
        Temporal components kept per subject; default ``max(2 * dim, 20)``.
    internal_dim : int, optional
        MIGP rows kept between subjects; default ``max(5 * dim, 50)``.
    max_iter : int, default 1000
        FastICA iteration limit.
    tol : float, default 1e-6
        FastICA convergence tolerance (see :func:`fastica`).
    seed : int, default 0
        Seeds ``numpy.random.default_rng`` for FastICA's initial unmixing matrix.

    Raises
    ------
    OptionError
        ``dim`` or ``max_iter`` below 1, ``subject_dim``/``internal_dim``
        below ``dim``, ``tol`` not positive.
    """

    dim: int = 10
    subject_dim: int | None = None
    internal_dim: int | None = None
    max_iter: int = 1000
    tol: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        if self.dim < 1:
            raise OptionError(f"{{dim}} must be at least 1, got {self.dim}")
        for name in ("subject_dim", "internal_dim"):
            value = getattr(self, name)
            if value is not None and value < self.dim:
                raise OptionError(f"{{{name}}} ({value}) must be at least {{dim}} ({self.dim})")
        if self.max_iter < 1:
            raise OptionError(f"{{max_iter}} must be at least 1, got {self.max_iter}")
        if not self.tol > 0:
            raise OptionError(f"{{tol}} must be positive, got {self.tol}")

    @property
    def subject_components(self) -> int:
        """Temporal components kept per subject (``subject_dim`` or its default)."""
        return self.subject_dim or max(2 * self.dim, 20)

    @property
    def internal_components(self) -> int:
        """MIGP rows kept between subjects (``internal_dim`` or its default)."""
        return self.internal_dim or max(5 * self.dim, 50)


@dataclass(frozen=True, kw_only=True)
class DualRegOptions:
    """Dual regression settings: their one home for the library, ``gpuconn dualreg`` and ``[dualreg]``.

    Taken by :func:`gpuconn.maps.dualreg.dual_regression`; the input files
    (maps, subjects, mask, stage-3 design and contrasts) stay its arguments.
    A study's ``[dualreg]`` section sets the stage-1/2 fields; the study's
    models do the group statistics, so its stage 3 stays off.

    Attributes
    ----------
    des_norm : bool, default True
        Scale each stage-2 regressor to unit standard deviation (FSL's
        ``des_norm`` 1); changes the betas, not the Z maps.
    varcb : bool, default False
        Also write ``dr_stage2_subjectNNNNN_varcb.nii.gz``, the variances of
        the stage-2 betas (``fsl_glm --out_varcb``), varcopes for ``gpuconn flame``.
    batch_size : int, optional
        Subjects per device batch; default from free memory (at most 32 on
        CUDA, 4 on CPU). With a Dask client: subjects per task (default 1).
    n_perm : int, default 0
        Stage 3, as dual_regression: 0 skips it; 1 writes raw t maps only
        (``randomise -n 1``); more runs randomise with TFCE on every
        ``dr_stage2_icNNNN``.
    seed : int, default 0
        Seed of stage 3's permutations.
    one_sample : bool, default False
        Stage 3 as a group-mean test (dual_regression's ``-1``) instead of a
        design.

    Raises
    ------
    OptionError
        ``batch_size`` below 1 or a negative ``n_perm``. Whether stage 3 has
        its design is checked by :func:`~gpuconn.maps.dualreg.dual_regression`,
        which holds the design's files.
    """

    des_norm: bool = True
    varcb: bool = False
    batch_size: int | None = None
    n_perm: int = 0
    seed: int = 0
    one_sample: bool = False

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError(f"{{batch_size}} must be at least 1, got {self.batch_size}")
        if self.n_perm < 0:
            raise OptionError(f"{{n_perm}} must be 0 (no randomise), 1 (raw t maps) or more, got {self.n_perm}")
