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

__all__ = ["PERMUTATION_METHODS", "ACCEL_MODES", "CONNECTIVITIES", "TFCE_METHODS", "check_connectivity",
           "PermutationOptions", "TfceOptions", "ClusterOptions", "GrfOptions", "McmcOptions"]

#: Permutation methods: auto, permute (exchangeable errors), flip (independent symmetric errors), both.
PERMUTATION_METHODS = ("auto", "permute", "flip", "both")
#: PALM's accelerations (``randomise --accel``; :mod:`gpuconn.stats.accel`).
ACCEL_MODES = ("tail", "gamma", "negbin", "noperm")
#: Voxel connectivities of clusters and TFCE: faces; faces and edges; faces, edges and corners.
CONNECTIVITIES = (6, 18, 26)
#: TFCE conventions (:mod:`gpuconn.stats.tfce`): randomise's stepped sum, PALM's per-map steps, the exact integral.
TFCE_METHODS = ("stepped", "palm", "exact")


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
class TfceOptions:
    """Threshold-free cluster enhancement as randomise ``-T`` computes it: the one home of its defaults and checks.

    Taken by :func:`gpuconn.stats.spatial.spatial_transforms`,
    :func:`gpuconn.stats.tfce.tfce_transform` (and checks the parameters of
    :func:`~gpuconn.stats.tfce.tfce`); ``gpuconn randomise -T`` takes its
    defaults from it (``--T2``: :meth:`skeleton`), a study's ``[inference]``
    sets ``tfce_H``/``tfce_E``, and dual regression's stage 3 uses the defaults.

    Attributes
    ----------
    H, E : float, default 2.0 and 0.5
        Height and extent exponents (``--tfce-H``, ``--tfce-E``).
    connectivity : {6, 18, 26}, default 6
        Voxel neighbours of a cluster (``--tfce-C``).
    dh : float, optional
        Step of the stepped sum for every rearrangement (``--tfce-dh``,
        randomise ``--tfce_D``). None: randomise's rule, the unpermuted
        map's maximum / 100 (``palm`` and ``exact`` take no step).
    method : {'stepped', 'palm', 'exact'}, default 'stepped'
        randomise's stepped sum, PALM's (each map its own step), or the exact
        integral (``--tfce-exact``); see :mod:`gpuconn.stats.tfce`.

    Raises
    ------
    OptionError
        ``H`` or ``E`` not positive, an unknown ``connectivity`` or
        ``method``, ``dh`` not positive or given to a method without steps.
    """

    H: float = 2.0
    E: float = 0.5
    connectivity: int = 6
    dh: float | None = None
    method: str = "stepped"

    def __post_init__(self):
        if self.method not in TFCE_METHODS:
            raise OptionError(f"TFCE {{method}} {self.method!r} is not one of {', '.join(TFCE_METHODS)}")
        if not self.H > 0:
            raise OptionError(f"TFCE height exponent {{H}} must be positive, got {self.H} (randomise uses 2)")
        if not self.E > 0:
            raise OptionError(f"TFCE extent exponent {{E}} must be positive, got {self.E} (randomise uses 0.5; 1 "
                              "for 2D or skeleton data)")
        check_connectivity(self.connectivity)
        if self.dh is None:
            return
        if not self.dh > 0:
            raise OptionError(f"{{dh}} must be positive, got {self.dh}")
        if self.method != "stepped":
            other = "the exact integral has none" if self.method == "exact" else "PALM's rule takes each map's own"
            raise OptionError(f"{{dh}} sets the step of the stepped sum; {other}: drop one of them")

    @classmethod
    def skeleton(cls, **given) -> TfceOptions:
        """randomise ``--T2``, TFCE of 2D or skeleton (TBSS) data: E = 1 and 26-connectivity, ``given`` fields winning."""
        return cls(**{"E": 1.0, "connectivity": 26, **given})


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """Permutation cluster inference (randomise ``-c``/``-C``, ``-F``/``-S`` for F tests): thresholds and connectivity.

    Taken by :func:`gpuconn.stats.spatial.spatial_transforms`; a study's
    ``[inference]`` sets ``connectivity`` (and ``cluster_threshold``, a z
    the runner turns into each model's t).

    Attributes
    ----------
    extent, mass : float, optional
        Cluster-forming thresholds of cluster-extent and cluster-mass FWER
        (mass: the sum of the statistic over the cluster, as randomise); None:
        not computed.
    connectivity : {6, 18, 26}, default 26
        Voxel neighbours of a cluster, as FSL ``cluster`` and randomise.

    Raises
    ------
    OptionError
        An unknown ``connectivity``.
    """

    extent: float | None = None
    mass: float | None = None
    connectivity: int = 26

    def __post_init__(self):
        check_connectivity(self.connectivity)


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
