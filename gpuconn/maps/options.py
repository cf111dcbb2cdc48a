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

__all__ = ["ICAOptions"]


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
