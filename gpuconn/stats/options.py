"""Options objects of the group-statistics stages: each one's defaults and checks, in one place.

The library functions take these objects; the CLI takes its defaults from
them (``gpuconn.cli.options.stage_options`` builds one from a command's
arguments) and the study runner builds them from its sections. This module
imports nothing heavy, so the CLI reads defaults without importing torch. A
bad value raises :class:`~gpuconn.core.errors.OptionError` naming the field,
which the CLI shows as its flag and the study runner as its key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import OptionError

__all__ = ["PERMUTATION_METHODS", "ACCEL_MODES", "CONNECTIVITIES", "check_connectivity", "PermutationOptions",
           "GrfOptions", "McmcOptions"]

#: Permutation methods: auto, permute (exchangeable errors), flip (independent symmetric errors), both.
PERMUTATION_METHODS = ("auto", "permute", "flip", "both")
#: PALM's accelerations (``randomise --accel``; :mod:`gpuconn.stats.accel`).
ACCEL_MODES = ("tail", "gamma", "negbin", "noperm")
#: Voxel connectivities of clusters and TFCE: faces; faces and edges; faces, edges and corners.
CONNECTIVITIES = (6, 18, 26)


def check_connectivity(connectivity: int) -> int:
    """``connectivity`` when it is one of :data:`CONNECTIVITIES`, else an OptionError naming the parameter."""
    if connectivity not in CONNECTIVITIES:
        raise OptionError(f"{{connectivity}} must be one of 6, 18, 26 (got {connectivity!r})")
    return connectivity


@dataclass(frozen=True, kw_only=True)
class PermutationOptions:
    """How randomise draws and counts its rearrangements: the one home of these defaults and checks.

    Taken by :func:`gpuconn.stats.randomise.prepare_permutation_test`,
    :func:`~gpuconn.stats.randomise.run_permutation_test` and
    :func:`~gpuconn.stats.randomise.randomise`; ``gpuconn randomise`` takes
    its defaults from it, and a study's ``[inference]`` fills it.

    Attributes
    ----------
    n_perm : int, default 5000
        Rearrangements including the identity (``-n``); 0 = exhaustive. All
        distinct rearrangements are used when there are fewer than ``n_perm``.
    seed : int, default 0
    method : {'auto', 'permute', 'flip', 'both'}
        ``auto`` flips signs when a contrast tests the mean (one-sample,
        paired differences) and permutes otherwise.
    permute_blocks : bool, default False
        Shuffle whole exchangeability blocks (``--permute-blocks``).
    demean : bool, default False
        randomise ``-D``: demean design columns; the mean becomes a nuisance
        regressor (one degree of freedom).
    accel : {'tail', 'gamma', 'negbin', 'noperm'}, optional
        PALM's acceleration (:mod:`gpuconn.stats.accel`); None: plain counting.
    accel_g1out : bool, default False
        Leave the unpermuted statistic out of the tail/gamma fits (PALM's
        ``-accel tail out``, ``--accel-out``).

    Raises
    ------
    OptionError
        ``n_perm`` not a whole number >= 0, an unknown ``method`` or ``accel``, or
        ``accel_g1out`` without ``accel`` tail or gamma.
    """

    n_perm: int = 5000
    seed: int = 0
    method: str = "auto"
    permute_blocks: bool = False
    demean: bool = False
    accel: str | None = None
    accel_g1out: bool = False

    def __post_init__(self):
        if isinstance(self.n_perm, bool) or int(self.n_perm) != self.n_perm or self.n_perm < 0:
            raise OptionError(f"{{n_perm}} must be a whole number >= 0 (0 = exhaustive), got {self.n_perm}")
        if self.method not in PERMUTATION_METHODS:
            raise OptionError(f"{{method}} {self.method!r} is not one of {', '.join(PERMUTATION_METHODS)}")
        if self.accel is not None and self.accel not in ACCEL_MODES:
            raise OptionError(f"{{accel}} {self.accel!r} is not one of {', '.join(ACCEL_MODES)}")
        if self.accel_g1out and self.accel not in ("tail", "gamma"):
            raise OptionError("{accel_g1out} leaves the unpermuted statistic out of the tail/gamma fits; "
                              "give {accel} tail or {accel} gamma")


@dataclass(frozen=True, kw_only=True)
class GrfOptions:
    """Gaussian-random-field cluster inference (FSL ``cluster``/easythresh), as ``gpuconn glm`` and ``flame`` run it.

    Attributes
    ----------
    cluster_z : float, default 2.3
        Cluster-forming z threshold (FEAT's default).
    cluster_p : float, default 0.05
        Clusters whose GRF p is below it are kept.

    Raises
    ------
    OptionError
        ``cluster_z`` at or below 1 (GRF's cluster-size law needs a high
        threshold) or ``cluster_p`` outside (0, 1].
    """

    cluster_z: float = 2.3
    cluster_p: float = 0.05

    def __post_init__(self):
        if not self.cluster_z > 1:
            raise OptionError(f"{{cluster_z}} must be above 1 for GRF cluster inference, got {self.cluster_z}")
        if not 0 < self.cluster_p <= 1:
            raise OptionError(f"{{cluster_p}} must be in (0, 1], got {self.cluster_p}")


@dataclass(frozen=True, kw_only=True)
class McmcOptions:
    """FLAME stage 2 (``flame12``) settings, flameo's names and defaults.

    Attributes
    ----------
    n_jumps : int, default 5000
        ``--nj``: Metropolis-Hastings sweeps per voxel.
    burnin : int, default 500
        ``--bi``: sweeps discarded at the start.
    sample_every : int, default 1
        ``--se``.
    seed : int, default 10
        ``--seed``: one NumPy generator draws every chain's numbers.
    fix_mean : bool, default False
        ``--fm``: keep FLAME1's parameter estimates as the mean of the t fit.
    z_lower, z_upper : float, default 2.0 and 20.0
        ``--zlt`` / ``--zut``: voxels whose FLAME1 z (with dof 1000 and with
        the FLAME1 dof) both lie above ``z_upper`` or both below ``z_lower``
        skip stage 2 (FEAT's values).
    sigma_dof_mm : float, default 1.0
        ``--sdof``: Gaussian sigma (mm) smoothing the stage-2 dof maps
        (applied by :func:`run_flame`, which knows the grid); -1 turns it off.
    """

    n_jumps: int = 5000
    burnin: int = 500
    sample_every: int = 1
    seed: int = 10
    fix_mean: bool = False
    z_lower: float = 2.0
    z_upper: float = 20.0
    sigma_dof_mm: float = 1.0

    def __post_init__(self):
        if not 0 <= self.burnin < self.n_jumps or self.sample_every < 1:
            raise OptionError(f"{{n_jumps}} {self.n_jumps}, {{burnin}} {self.burnin}, {{sample_every}} "
                              f"{self.sample_every}: need 0 <= {{burnin}} < {{n_jumps}} and {{sample_every}} >= 1")
        if not self.z_lower < self.z_upper:
            raise OptionError(f"{{z_lower}} ({self.z_lower}) must be below {{z_upper}} ({self.z_upper})")
