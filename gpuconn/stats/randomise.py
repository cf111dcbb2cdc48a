"""Permutation inference engine: randomise-style GLM with max-statistic FWER.

:func:`run_permutation_test` takes arrays (data ``(n_obs, n_voxels)``, a
design, contrasts) and returns arrays; :func:`randomise` is the file-level
wrapper behind ``gpuconn randomise`` that reads NIfTI/VEST inputs and
writes outputs named as FSL randomise names them (p-maps hold ``1 - p``).

How a run works
---------------
1. Each contrast is partitioned into effect of interest and nuisance
   (:mod:`gpuconn.stats.glm`) and the data are residualised on the nuisance
   once (Freedman-Lane).
2. Rearrangements (permutations, sign flips or both; rearrangement 0 is the
   identity) come from :mod:`gpuconn.stats.permute` in chunks of the
   permutation index, on the host, from ``seed``.
3. For each chunk and contrast, the statistics of every rearrangement are
   one matrix product on the device; the chunk is then reduced to its
   per-rearrangement maxima (the max-statistic null) and to voxelwise
   exceedance counts. Chunks are sized from device memory
   (:func:`gpuconn.core.backend.chunk_size`) and halved on CUDA OOM
   (:func:`gpuconn.core.backend.run_chunked`); results do not depend on the
   chunk size.
4. p-values follow randomise's counting rule, the identity included:
   uncorrected ``p(v) = #{i : T_i(v) >= T_0(v)} / n``, FWER-corrected
   ``p(v) = #{i : max_w T_i(w) >= T_0(v)} / n``; FDR (Benjamini-Hochberg)
   is applied to the uncorrected p.
5. With variance groups (``variance_groups``, PALM ``-vg``) each contrast's
   statistic is Aspin-Welch v or G (:mod:`gpuconn.stats.gstat`), and its z
   (per-voxel degrees of freedom) takes the place of t/F in step 4 and in
   the spatial statistics, as PALM does.

Acceleration (``accel``, PALM's ``-accel``)
-------------------------------------------
With ``tail`` or ``gamma`` each chunk also returns, per statistic (voxel
and spatial), each voxel's state for the fit (its largest values, or float64
power sums), merged by :func:`merge_chunk_outputs`; :func:`_summarise` turns
them and the null of the maximum into p (:mod:`gpuconn.stats.accel`).
``negbin`` evaluates each chunk on the voxels still running only and ends
the loop once every voxel has stopped; ``noperm`` evaluates none
(:func:`_noperm_result`). Neither has FWER p.

Spatial statistics hook (TFCE, cluster extent/mass)
---------------------------------------------------
``spatial`` (for t contrasts) and ``spatial_f`` (for F contrasts) map a
name to a callable ``transform(stats) -> transformed``:

- ``stats`` is a ``torch.Tensor`` of shape ``(n_perm_chunk, n_voxels)``,
  float32, on the run's device: one statistic map per rearrangement of the
  chunk, voxels in mask order (row 0 of the first chunk is the observed
  map). The tensor must not be modified in place.
- ``transformed`` must have the same shape (e.g. TFCE values, or each
  voxel's cluster extent or mass, 0 outside clusters), on the same device.
- The transform must treat rows independently (a chunk-size-invariant
  result) and be deterministic.
- A transform whose statistic depends on the unpermuted map (randomise's
  TFCE step, ``dh`` = unpermuted maximum / 100) has a method
  ``bind(observed, kind=, df=)`` returning the transform to use for one
  contrast; :func:`prepare_permutation_test` calls it with the contrast's
  unpermuted map before any rearrangement is evaluated.

For each name the engine keeps the observed transformed map, the
per-rearrangement maximum of the transformed maps (the null) and voxelwise
exceedance counts, and reports ``p_fwe(v) = #{i : max_w S_i(w) >= S_0(v)} / n``
and the uncorrected ``p(v) = #{i : S_i(v) >= S_0(v)} / n`` in
:attr:`ContrastResult.spatial`. :func:`write_outputs` writes
``<root>_<name>_corrp_<tstat|fstat><i>`` (``1 - p``; with ``uncorrp`` also
``<root>_<name>_p_<tstat|fstat><i>``), the null as
``<root>_perm_<name>_<tstat|fstat><i>.txt``, and for names in
``write_raw`` (TFCE) the observed transformed map as
``<root>_<name>_<tstat|fstat><i>``. An OOM inside a transform halves the
chunk like one in the GLM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.backend import DESIGN_DTYPE, as_data, chunk_size, cuda_chunk_cap, resolve_device, run_chunked, to_host, to_numpy
from ..core.errors import InputError, OptionError
from ..core.io import load_image, load_mask, masked_data, provenance, save_image, unmask, write_json, write_text
from ..core.progress import progress_bar
from . import accel as _accel
from .design import Design, check_design, load_design, read_vest
from .fdr import fdr_adjust
from .glm import (
    ContrastModel,
    contrast_model,
    partition,
    permuted_statistics,
    residualise,
)
from .options import PermutationOptions
from .gstat import GroupModel, g_statistics, group_model, statistic_name
from .gstat import variance_groups as resolve_variance_groups
from .permute import PermutationScheme, make_scheme
from .zstat import f_to_z, t_to_z

__all__ = [
    "SpatialTransform",
    "MapResult",
    "ContrastResult",
    "PermutationTestResult",
    "PreparedTest",
    "Runner",
    "ChunkMerger",
    "merge_chunk_outputs",
    "fwe_p",
    "run_permutation_test",
    "prepare_permutation_test",
    "evaluate_chunk",
    "chunk_rearrangements",
    "contrast_statistics",
    "plan_chunk",
    "run_chunk_loop",
    "analysis_mask",
    "write_outputs",
    "randomise",
]

#: A spatial statistic: (n_perm_chunk, n_voxels) maps -> same-shape transformed maps.
SpatialTransform = Callable[[torch.Tensor], torch.Tensor]
#: Evaluates a prepared test: (prepared, progress) -> PermutationTestResult.
Runner = Callable[["PreparedTest", bool], "PermutationTestResult"]
# Plan at most this much working memory per chunk on the CPU (shared hosts).
_CPU_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class MapResult:
    """A spatial statistic of one contrast.

    Attributes
    ----------
    stat : ndarray, shape (n_voxels,)
        Observed transformed map.
    p_fwe : ndarray, shape (n_voxels,)
        FWER-corrected p (max-statistic, randomise's counting rule).
    p_uncorrected : ndarray, shape (n_voxels,)
        ``#{i : S_i(v) >= S_0(v)} / n``.
    null_max : ndarray, shape (n_perm,)
        Maximum of the transformed map for each rearrangement (0 = observed).
    settings : dict
        What defines the statistic (TFCE H, E, connectivity, the step used;
        cluster threshold, connectivity), from the transform's ``settings``.
    """

    stat: np.ndarray
    p_fwe: np.ndarray
    p_uncorrected: np.ndarray
    null_max: np.ndarray
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ContrastResult:
    """Statistics and p-values of one t or F contrast.

    Attributes
    ----------
    name : str
        ``tstat1``, ``tstat2``, ``fstat1``... (randomise's numbering).
    kind : {'t', 'f'}
    contrast : ndarray, shape (s, n_regressors)
    df : tuple of int
        ``(s, dof)``; a t statistic has ``dof`` degrees of freedom.
    stat, z, p_uncorrected, p_fwe, p_fdr : ndarray, shape (n_voxels,)
    null_max : ndarray, shape (n_perm,)
        Maximum statistic of each rearrangement (0 = observed).
    spatial : dict of str to MapResult
    statistic : str
        What ``stat`` holds: ``'t'``, ``'F'``, or with variance groups
        ``'Aspin-Welch v'`` (t contrasts) or ``'G'`` (F tests), whose z (with
        ``df2``) is then the statistic that ``null_max``, the p-values and the
        spatial statistics use (:mod:`gpuconn.stats.gstat`).
    df2 : ndarray, shape (n_voxels,), or None
        Per-voxel degrees of freedom of v or G (None for t and F).
    """

    name: str
    kind: str
    contrast: np.ndarray
    df: tuple[int, int]
    stat: np.ndarray
    z: np.ndarray
    p_uncorrected: np.ndarray
    p_fwe: np.ndarray
    p_fdr: np.ndarray
    null_max: np.ndarray
    spatial: dict[str, MapResult] = field(default_factory=dict)
    statistic: str = "t"
    df2: np.ndarray | None = None


@dataclass(frozen=True)
class PermutationTestResult:
    """Output of :func:`run_permutation_test`.

    Attributes
    ----------
    contrasts : list of ContrastResult
        t contrasts first, then F tests.
    scheme : PermutationScheme
        The rearrangements used (``n_perm``, ``method``, ``exhaustive``...).
    device : str
    chunk_size : int
        Rearrangements per chunk at the start (OOM may have halved it).
    seconds : float
        Wall time of the permutation loop.
    resumed_from : int
        Rearrangements restored from a checkpoint (0: not resumed).
    accel : dict or None
        The acceleration and its parameters (:meth:`gpuconn.stats.accel.Accel.record`).
    variance_groups : ndarray of int, shape (n_obs,), or None
        Variance-group label of each observation (None: one group).
    """

    contrasts: list[ContrastResult]
    scheme: PermutationScheme
    device: str
    chunk_size: int
    seconds: float
    resumed_from: int = 0
    accel: dict | None = None
    variance_groups: np.ndarray | None = None

    def __getitem__(self, name: str) -> ContrastResult:
        for result in self.contrasts:
            if result.name == name:
                return result
        raise KeyError(f"no contrast {name!r}; have {[r.name for r in self.contrasts]}")


@dataclass
class _Contrast:
    name: str
    kind: str
    matrix: np.ndarray
    model: ContrastModel
    residuals: torch.Tensor
    sum_squares: torch.Tensor
    observed: torch.Tensor
    transforms: Mapping[str, SpatialTransform]
    spatial_observed: Mapping[str, torch.Tensor]
    # Variance groups: their constants, and the observed v/G map and its df (``observed`` is then its z).
    groups: GroupModel | None = None
    gstat: torch.Tensor | None = None
    df2: torch.Tensor | None = None

    def to(self, device: torch.device) -> "_Contrast":
        model = replace(self.model, nuisance=self.model.nuisance.to(device), rows=self.model.rows.to(device))
        moved = {} if self.groups is None else {"groups": self.groups.to(device), "gstat": self.gstat.to(device),
                                                "df2": self.df2.to(device)}
        return replace(self, model=model, residuals=self.residuals.to(device), sum_squares=self.sum_squares.to(device),
                       observed=self.observed.to(device),
                       spatial_observed={k: v.to(device) for k, v in self.spatial_observed.items()}, **moved)

    def statistics(self, orders: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """The compared statistic of rearrangements (t or F; with variance groups the z of v or G), float32."""
        if self.groups is None:
            return permuted_statistics(self.model, self.residuals, self.sum_squares, orders, signs)
        return g_statistics(self.model, self.groups, self.residuals, self.sum_squares, orders, signs)[1]


@dataclass(frozen=True)
class PreparedTest:
    """A permutation test ready to evaluate chunk by chunk (:func:`prepare_permutation_test`).

    Attributes
    ----------
    contrasts : list
        Per contrast: its model, residualised data ``(n_obs, n_voxels)``
        float64, the unpermuted statistic map (float32), the spatial
        transforms bound to it and their unpermuted maps, on ``device``.
    scheme : PermutationScheme
    device : torch.device
    chunk : int
        Rearrangements per chunk.
    accel : Accel or None
        Acceleration (:mod:`gpuconn.stats.accel`; None: plain counting).
    variance_groups : ndarray of int, shape (n_obs,), or None
        Variance-group labels (None: one group, t and F statistics).
    """

    contrasts: list[_Contrast]
    scheme: PermutationScheme
    device: torch.device
    chunk: int
    accel: _accel.Accel | None = None
    variance_groups: np.ndarray | None = None

    def to(self, device: str | torch.device) -> "PreparedTest":
        """The same test with its tensors on ``device`` (this object when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return replace(self, contrasts=[c.to(device) for c in self.contrasts], device=device)


def _contains_ones(basis: np.ndarray) -> bool:
    ones = np.ones(basis.shape[0])
    if basis.shape[1] == 0:
        return False
    fit = basis @ np.linalg.lstsq(basis, ones, rcond=None)[0]
    return bool(np.linalg.norm(fit - ones) < 1e-8 * np.sqrt(basis.shape[0]))


def _choose_method(method: str, design: np.ndarray, contrasts: list[np.ndarray]) -> tuple[bool, bool]:
    """(permute, flip) flags; ``auto`` flips signs when a contrast tests the mean."""
    if method != "auto":
        return method in ("permute", "both"), method in ("flip", "both")
    if not _contains_ones(design):
        return True, False
    tests_mean = any(not _contains_ones(partition(design, c)[1]) for c in contrasts)
    return not tests_mean, tests_mean


def _invariant_vectors(scheme: PermutationScheme) -> np.ndarray | None:
    """Vectors every rearrangement of the scheme leaves unchanged."""
    if scheme.flip:
        return None
    if scheme.blocks is None or scheme.whole_blocks:
        return np.ones((scheme.n_obs, 1))
    labels = np.unique(scheme.blocks)
    return (scheme.blocks[:, None] == labels[None]).astype(np.float64)


def _spatial_maps(
    transforms: Mapping[str, SpatialTransform], stats: torch.Tensor, name: str
) -> dict[str, torch.Tensor]:
    out = {}
    for key, transform in transforms.items():
        mapped = transform(stats)
        if not torch.is_tensor(mapped) or tuple(mapped.shape) != tuple(stats.shape):
            shape = tuple(mapped.shape) if torch.is_tensor(mapped) else type(mapped).__name__
            raise ValueError(f"spatial transform {key!r} on {name} returned {shape}; expected {tuple(stats.shape)}")
        out[key] = mapped
    return out


def fwe_p(null_max: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Family-wise error p of every voxel from the null distribution of the maximum.

    Parameters
    ----------
    null_max : ndarray, shape (n_perm,)
        The maximum statistic of each rearrangement (the unpermuted one included).
    observed : ndarray, shape (n_voxels,)

    Returns
    -------
    ndarray of float64
        ``#{i : null_max[i] >= observed[v]} / n_perm`` for every voxel ``v``.
    """
    ordered = np.sort(null_max)
    return (ordered.size - np.searchsorted(ordered, observed, side="left")) / ordered.size


def _prepare_design(
    design: np.ndarray, contrasts: np.ndarray, demean: bool, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``demean`` (randomise ``-D``): demean the columns and add the intercept as nuisance."""
    if not demean:
        return design, contrasts
    centred = design - design.mean(axis=0)
    constant = [j + 1 for j in range(design.shape[1]) if np.ptp(design[:, j]) == 0]
    if constant:
        raise OptionError(
            f"{source}: column(s) {constant} are constant, and {{demean}} removes the mean; "
            "drop the intercept column or leave {demean} off"
        )
    padded = np.hstack([contrasts, np.zeros((contrasts.shape[0], 1))])
    return np.hstack([centred, np.ones((design.shape[0], 1))]), padded


def _as_design(design: Design | np.ndarray, contrasts: np.ndarray | None, ftests: np.ndarray | None,
               groups: np.ndarray | None) -> Design:
    if isinstance(design, Design):
        if contrasts is not None or ftests is not None:
            raise TypeError("a Design carries its contrasts and F tests; pass contrasts/ftests only with an array design")
        return design
    if contrasts is None:
        raise TypeError("contrasts are required when design is an array")
    contrasts = np.atleast_2d(np.asarray(contrasts, dtype=np.float64))
    ftests = np.zeros((0, contrasts.shape[0]), dtype=int) if ftests is None else np.atleast_2d(ftests).astype(int)
    return Design(np.asarray(design, dtype=np.float64), contrasts, ftests, groups)


def run_permutation_test(
    data: np.ndarray | torch.Tensor,
    design: Design | np.ndarray,
    contrasts: np.ndarray | None = None,
    permutation: PermutationOptions | None = None,
    *,
    progress: bool = False,
    runner: Runner | None = None,
    **options: Any,
) -> PermutationTestResult:
    """Permutation test of every contrast of a GLM, voxel by voxel.

    Prepares the test with :func:`prepare_permutation_test` (which documents
    the data, design, ``permutation`` and the other keywords: ``ftests``,
    ``groups``, ``device``, ``spatial``, ``spatial_f``, ``chunk``,
    ``design_source``, ``variance_groups``), then evaluates all chunks of
    rearrangements.

    Parameters
    ----------
    data : ndarray or torch.Tensor, shape (n_obs, n_voxels)
        One row per observation (input volume), finite values.
    design : Design or ndarray, shape (n_obs, n_regressors)
    contrasts : ndarray, shape (n_contrasts, n_regressors), optional
        t contrasts (required when ``design`` is an array).
    permutation : PermutationOptions, optional
        The rearrangements (``n_perm``, ``seed``, ``method``, ``accel``...).
    progress : bool, default False
        Show a progress bar over rearrangements.
    runner : callable, optional
        ``runner(prepared, progress) -> PermutationTestResult`` evaluates the
        chunks elsewhere (e.g. :func:`gpuconn.stats.dask_runner.dask_runner`);
        default: one process, chunk after chunk on ``device``.
    **options
        The other keywords of :func:`prepare_permutation_test`.

    Returns
    -------
    PermutationTestResult
    """
    prepared = prepare_permutation_test(data, design, contrasts, permutation, **options)
    if prepared.accel is not None and prepared.accel.mode == "noperm":
        return _noperm_result(prepared)  # no rearrangement to run
    return (runner or run_chunk_loop)(prepared, progress)


def prepare_permutation_test(
    data: np.ndarray | torch.Tensor,
    design: Design | np.ndarray,
    contrasts: np.ndarray | None = None,
    permutation: PermutationOptions | None = None,
    *,
    ftests: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    device: str | torch.device = "auto",
    spatial: Mapping[str, SpatialTransform] | None = None,
    spatial_f: Mapping[str, SpatialTransform] | None = None,
    chunk: int | None = None,
    design_source: str = "design",
    variance_groups: np.ndarray | str | None = None,
    variance_groups_source: str = "variance groups (--vg)",
) -> PreparedTest:
    """Validate the inputs, draw the scheme and residualise the data, once.

    Chunks of the returned model are then evaluated by
    :func:`evaluate_chunk` and merged by :class:`ChunkMerger`, in one
    process or as independent tasks (:func:`run_permutation_test` does both).

    Parameters
    ----------
    data : ndarray or torch.Tensor, shape (n_obs, n_voxels)
        One row per observation (input volume), finite values.
    design : Design or ndarray, shape (n_obs, n_regressors)
    contrasts : ndarray, shape (n_contrasts, n_regressors), optional
        t contrasts (required when ``design`` is an array).
    permutation : PermutationOptions, optional
        Rearrangements and their counting (``n_perm``, ``seed``, ``method``,
        ``permute_blocks``, ``demean``, ``accel``...); default
        ``PermutationOptions()``. ``accel`` ``negbin`` and ``noperm`` give
        uncorrected p only and take no spatial statistics; ``noperm`` needs
        plain permutation and the intercept in the model.
    ftests : ndarray of 0/1, shape (n_ftests, n_contrasts), optional
    groups : ndarray of int, shape (n_obs,), optional
        Exchangeability blocks (overrides ``design.groups``).
    device : str or torch.device, default 'auto'
    spatial, spatial_f : mapping of str to callable, optional
        Spatial statistics for t and F contrasts (see the module docstring).
    chunk : int, optional
        Rearrangements per chunk; default from free device memory.
    design_source : str
        Design file name for error messages.
    variance_groups : ndarray of int, shape (n_obs,), or 'auto', optional
        Variance groups (PALM ``-vg``; ``'auto'``: from the blocks, see
        :func:`gpuconn.stats.gstat.variance_groups`). With two or more, each
        contrast's statistic is Aspin-Welch v (t) or G (F), and its z (per
        voxel df) is what the max statistic, the p-values and the spatial
        statistics use (:mod:`gpuconn.stats.gstat`); distinct rearrangements
        are then counted on the effect of interest and the group labels.
    variance_groups_source : str
        The variance groups' file name for error messages.

    Returns
    -------
    PreparedTest
    """
    permutation = permutation or PermutationOptions()
    n_perm, seed, permute_blocks, demean = (permutation.n_perm, permutation.seed, permutation.permute_blocks,
                                            permutation.demean)
    design = _as_design(design, contrasts, ftests, groups)
    groups = design.groups if groups is None else np.asarray(groups)
    data_t = data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
    if data_t.ndim != 2:
        raise InputError(f"data must be (n_obs, n_voxels), got shape {tuple(data_t.shape)}")
    check_design(design, source=design_source, n_obs=data_t.shape[0], data_source="the data")
    if not bool(torch.isfinite(data_t).all()):
        raise InputError("the data have NaN or Inf values; mask them out")
    device = resolve_device(device)
    matrix, t_contrasts = _prepare_design(design.matrix, np.atleast_2d(design.contrasts), demean, design_source)
    specs = [(f"tstat{i + 1}", "t", row[None]) for i, row in enumerate(t_contrasts)]
    specs += [(f"fstat{j + 1}", "f", t_contrasts[row == 1]) for j, row in enumerate(np.asarray(design.ftests))]
    do_permute, do_flip = _choose_method(permutation.method, matrix, [c for _, _, c in specs])
    if demean and do_flip:
        raise OptionError("{demean} removes the mean, which sign flipping ({one_sample} or a one-sample test) tests; "
                          "drop {demean}")
    # Distinct rearrangements are counted on the effect of interest, as PALM does (Guttman partition: the
    # design columns a contrast weights); one scheme serves every contrast, so on the columns any of them weights.
    interest = matrix[:, np.any(np.atleast_2d(t_contrasts) != 0, axis=0)]
    # With variance groups also on their labels (PALM: on X only), so that no two rearrangements that give
    # different v or G count as one.
    labels = resolve_variance_groups(variance_groups, n_obs=matrix.shape[0], blocks=groups,
                                     whole_blocks=permute_blocks, source=variance_groups_source)
    scheme = make_scheme(
        interest if labels is None else np.column_stack([interest, labels]), n_perm=n_perm, seed=seed,
        permute=do_permute, flip=do_flip, blocks=groups,
        whole_blocks=permute_blocks, blocks_source="exchangeability blocks (-e)",
    )
    accel = _check_accel(permutation, scheme, labels is not None, spatial, spatial_f)  # before the residualising
    invariant = _invariant_vectors(scheme)
    values = as_data(data_t, device)
    identity = torch.arange(scheme.n_obs, device=device)[None]
    no_flip = torch.ones((1, scheme.n_obs), dtype=DESIGN_DTYPE, device=device)
    contrasts_state = []
    for name, kind, matrix_c in specs:
        model = contrast_model(matrix, matrix_c, kind=kind, device=device, invariant=invariant)
        residuals, sum_squares = residualise(values, model)
        extra = {}
        if labels is None:
            observed = permuted_statistics(model, residuals, sum_squares, identity, no_flip)[0]
        else:  # the z of v or G stands in for t (TFCE and clusters of z, as PALM)
            gm = group_model(model, labels, source=variance_groups_source)
            gstat, observed, df2 = (v[0] for v in g_statistics(model, gm, residuals, sum_squares, identity, no_flip))
            extra = {"groups": gm, "gstat": gstat, "df2": df2}
        transforms = {
            key: transform.bind(observed, kind="t" if extra else kind, df=model.df) if hasattr(transform, "bind")
            else transform
            for key, transform in ((spatial if kind == "t" else spatial_f) or {}).items()
        }
        # One map, through run_chunked for its out-of-memory message.
        ((_, _, spatial_observed),) = run_chunked(lambda *_: _spatial_maps(transforms, observed[None], name), 1, 1)
        contrasts_state.append(_Contrast(name, kind, matrix_c, model, residuals, sum_squares, observed, transforms,
                                         {k: v[0] for k, v in spatial_observed.items()}, **extra))
    del values
    chunk = plan_chunk(contrasts_state, device, scheme.n_perm) if chunk is None else chunk
    return PreparedTest(contrasts_state, scheme, device, int(chunk), variance_groups=labels, accel=accel)


def _check_accel(permutation: PermutationOptions, scheme: PermutationScheme, variance_groups: bool,
                 *spatial: Mapping | None) -> _accel.Accel | None:
    mode, g1out = permutation.accel, permutation.accel_g1out
    if mode is None:
        return None
    if mode in _accel.NO_FWER and any(spatial):
        raise OptionError(f"{{accel}} {mode} gives uncorrected p only (there is no null of the maximum); drop "
                          "{spatial} or use {accel} tail")
    if mode == "noperm" and (scheme.flip or scheme.blocks is not None):
        raise OptionError("{accel} noperm has closed-form moments for plain permutation only (no sign flips, "
                          "one-sample tests or exchangeability blocks {groups_path}); use {accel} tail or gamma")
    if mode in _accel.NO_FWER and variance_groups:
        raise OptionError(f"{{accel}} {mode} is for t and F statistics, not variance groups ({{variance_groups}}); "
                          "use {accel} tail or gamma")
    if mode == "negbin" and scheme.n_perm < 3:
        raise OptionError(f"{{accel}} negbin needs at least 3 rearrangements, got {{n_perm}} {scheme.n_perm}")
    return _accel.Accel(mode, scheme.n_perm, g1out=g1out)


def _noperm_result(prepared: PreparedTest) -> PermutationTestResult:
    """``noperm``: each contrast's p from the closed-form permutation moments (:func:`gpuconn.stats.accel.noperm_p`)."""
    results = []
    for c in prepared.contrasts:
        if not _contains_ones(to_host(c.model.nuisance)):
            raise OptionError(f"{{accel}} noperm needs the intercept among the nuisance regressors ({c.name} has "
                              "none); add a column of ones (or {demean}), or use {accel} tail or gamma")
        stat = to_host(c.observed)
        p = _accel.noperm_p(to_host(c.model.rows[:c.model.rank]), to_host(c.residuals), stat, c.kind)
        z = t_to_z(stat, c.model.dof) if c.kind == "t" else f_to_z(stat, c.model.rank, c.model.dof)
        results.append(ContrastResult(c.name, c.kind, c.matrix, c.model.df, stat, z.astype(np.float32), p,
                                      np.full(p.shape, np.nan), fdr_adjust(p), np.empty(0, np.float32),
                                      statistic=statistic_name(c.kind, 1)))
    record = {**prepared.accel.record(), "rearrangements_evaluated": 0}
    return PermutationTestResult(results, prepared.scheme, str(prepared.device), 0, 0.0, accel=record)


def plan_chunk(contrasts: list[_Contrast], device: torch.device, n_items: int) -> int:
    """Rearrangements per evaluation on ``device``, from its free memory.

    At most 1 GiB of working memory on the CPU (shared hosts); on CUDA
    capped so that progress and checkpoints come during the run
    (:func:`gpuconn.core.backend.cuda_chunk_cap`; the spatial kernels size their
    own launches). The permutation engine plans with it, and so does each
    Dask worker for its own device.

    Parameters
    ----------
    contrasts : list
        :attr:`PreparedTest.contrasts`.
    device : torch.device
    n_items : int
        Rearrangements to evaluate.

    Returns
    -------
    int
    """
    n_vox = contrasts[0].residuals.shape[1]
    rows = max(c.model.rows.shape[0] if c.groups is None else c.groups.work_rows for c in contrasts)
    n_maps = max(len(c.transforms) for c in contrasts)
    # float64: the projections (rows) and three voxel-sized temporaries; float32: the statistic and its maps.
    per_item = max(n_vox, 1) * (8 * (rows + 3) + 4 * (2 + 2 * n_maps))
    maximum = (cuda_chunk_cap(n_items, spatial=n_maps > 0) if device.type == "cuda"
               else max(1, _CPU_CHUNK_BYTES // per_item))
    return chunk_size(per_item, device, n_items=n_items, maximum=maximum)


def chunk_rearrangements(prepared: PreparedTest, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orders and signs of rearrangements ``start`` to ``stop - 1``, on the prepared test's device."""
    orders, signs = prepared.scheme.chunk(start, stop)
    return (torch.as_tensor(orders, device=prepared.device),
            torch.as_tensor(signs, dtype=DESIGN_DTYPE, device=prepared.device))


def contrast_statistics(c: _Contrast, rearrangements: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
    """Statistic maps ``(n_chunk, n_voxels)`` of one contrast for a chunk of rearrangements from ``start``.

    Row 0 of the chunk at ``start == 0`` is the identity: exactly the
    observed map every chunk compares with.
    """
    stats = c.statistics(*rearrangements)
    if start == 0:
        stats[0] = c.observed
    return stats


def evaluate_chunk(prepared: PreparedTest, start: int, stop: int,
                   running: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, dict[str, Any]]:
    """Statistics of rearrangements ``start`` to ``stop - 1``, reduced to what the merge needs.

    A pure function of its arguments: a chunk gives the same output in
    whichever process or order it runs (the rearrangements come from
    :meth:`PermutationScheme.chunk`).

    Parameters
    ----------
    prepared : PreparedTest
    start, stop : int
        Rearrangement indices, ``0 <= start < stop <= n_perm``.
    running : mapping, optional
        ``negbin`` only: per contrast, the voxels still running and the
        exceedances each still needs (:meth:`ChunkMerger.running`); default:
        every voxel, ``r`` each.

    Returns
    -------
    dict
        Per contrast name: ``count`` (``{'vox' or spatial name: voxelwise
        #{i in chunk : S_i >= S_0}}``, int64, shape (n_voxels,)) and ``max``
        (``{'vox' or spatial name: ndarray, shape (stop - start,)}``
        per-rearrangement maxima); with ``tail``/``gamma`` also ``accel``
        (``{key: per-voxel state}``, :func:`gpuconn.stats.accel.chunk_state`),
        with ``negbin`` ``stopped`` (see :func:`_negbin_chunk`).
    """
    rearrangements = chunk_rearrangements(prepared, start, stop)
    out = {}
    for c in prepared.contrasts:
        if prepared.accel is not None and prepared.accel.mode == "negbin":
            out[c.name] = _negbin_chunk(prepared.accel, c, start, *rearrangements, (running or {}).get(c.name))
            continue
        stats = contrast_statistics(c, rearrangements, start)
        maps = _spatial_maps(c.transforms, stats, c.name)
        references = {"vox": (stats, c.observed)} | {k: (m, c.spatial_observed[k]) for k, m in maps.items()}
        out[c.name] = {
            # Summed as int32 (~40% faster on the CPU than int64; a chunk is < 2**31), kept as int64.
            "count": {k: (m >= ref).sum(0, dtype=torch.int32).long() for k, (m, ref) in references.items()},
            "max": {k: to_numpy(m.amax(1)) for k, (m, _) in references.items()},
        }
        if prepared.accel is not None:
            skip = int(start == 0 and prepared.accel.g1out)  # the identity left out of the null
            out[c.name]["accel"] = {k: _accel.chunk_state(prepared.accel, m[skip:], ref)
                                    for k, (m, ref) in references.items()}
    return out


def _negbin_chunk(accel: _accel.Accel, c: _Contrast, start: int, orders: torch.Tensor, signs: torch.Tensor,
                  running: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """One chunk of ``negbin``, on the running voxels only (the saving).

    ``count``: exceedances counted until each voxel's ``r``-th (the
    identity not counted, as PALM); ``stopped``: the rearrangement of the
    ``r``-th exceedance (0: not in this chunk). Both integers, so the result
    does not depend on the chunk size.
    """
    n_vox = c.observed.shape[0]
    device = c.observed.device
    if running is None:
        index = torch.arange(n_vox, device=device)
        need = torch.full((n_vox,), accel.negbin_r, dtype=torch.int64, device=device)
    else:
        index, need = running
    stats = permuted_statistics(c.model, c.residuals[:, index], c.sum_squares[index], orders, signs)
    exceed = stats >= c.observed[index]
    if start == 0:
        exceed[0] = False
    total = exceed.cumsum(0)
    reached = total >= need
    hit = reached.any(0)
    rows = torch.arange(stats.shape[0], device=device)[:, None]
    first = torch.where(reached, rows, stats.shape[0]).amin(0)  # the row of the r-th exceedance
    count = torch.zeros(n_vox, dtype=torch.int64, device=device)
    count[index] = torch.minimum(total[-1], need)
    stopped = torch.zeros(n_vox, dtype=torch.int64, device=device)
    stopped[index[hit]] = start + first[hit]
    return {"count": {"vox": count}, "max": {"vox": np.full(stats.shape[0], np.nan, np.float32)},
            "stopped": stopped}


def merge_chunk_outputs(accel: _accel.Accel | None, first: Mapping[str, dict], second: Mapping[str, dict]) -> dict:
    """Merge the outputs of :func:`evaluate_chunk` for two consecutive ranges (``first`` before ``second``).

    The one merge of the engine (:class:`ChunkMerger`, and the Dask tasks'
    sub-chunks): counts summed, maxima concatenated, the acceleration state
    merged (:func:`gpuconn.stats.accel.merge_state`), ``negbin`` stops kept
    from the first range that has them. Fields absent from ``first`` are
    left out.
    """
    merged = {}
    for name, a in first.items():
        b = second[name]
        m = {"count": {k: a["count"][k] + b["count"][k] for k in a["count"]}}
        if "max" in a:
            m["max"] = {k: np.concatenate([a["max"][k], b["max"][k]]) for k in a["max"]}
        if "accel" in a:
            m["accel"] = {k: _accel.merge_state(accel, a["accel"][k], b["accel"][k]) for k in a["accel"]}
        if "stopped" in a:
            sa, sb = torch.as_tensor(a["stopped"]), torch.as_tensor(b["stopped"])
            m["stopped"] = torch.where(sa > 0, sa, sb.to(sa.device))
        merged[name] = m
    return merged


class ChunkMerger:
    """Merge chunk outputs (any completion order) into a :class:`PermutationTestResult`.

    Outputs are folded in rearrangement order with :func:`merge_chunk_outputs`
    as soon as they extend the merged prefix ``[0, done)`` (a chunk that
    completes early waits); maxima are kept per chunk and concatenated at
    the end. The result does not depend on the order of :meth:`add` calls.

    Parameters
    ----------
    prepared : PreparedTest

    Attributes
    ----------
    done : int
        Rearrangements merged (a prefix).
    merged : dict or None
        The merged output of ``[0, done)``, without maxima.
    """

    def __init__(self, prepared: PreparedTest):
        self.prepared = prepared
        self.done = 0
        self.merged: dict | None = None
        self.maxima: dict[int, dict] = {}
        self._pending: dict[int, tuple[int, dict]] = {}

    @property
    def counts(self) -> dict[tuple[str, str], Any]:
        """Per ``(contrast name, 'vox' or spatial name)``: merged exceedance counts (0 before any chunk)."""
        if self.merged is None:
            return {(c.name, k): 0 for c in self.prepared.contrasts for k in ("vox", *c.transforms)}
        return {(name, k): v for name, m in self.merged.items() for k, v in m["count"].items()}

    def add(self, start: int, stop: int, out: Mapping[str, dict]) -> None:
        """Add the output of :func:`evaluate_chunk` for ``[start, stop)`` (tensors or arrays)."""
        self.maxima[start] = {c.name: out[c.name]["max"] for c in self.prepared.contrasts}
        self._pending[start] = (stop, {name: {k: v for k, v in r.items() if k != "max"} for name, r in out.items()})
        while self.done in self._pending:
            stop, part = self._pending.pop(self.done)
            self.merged = part if self.merged is None else merge_chunk_outputs(self.prepared.accel, self.merged, part)
            self.done = stop

    def restore(self, merged: dict, maxima: dict[str, dict[str, np.ndarray]], done: int) -> None:
        """Continue from a saved prefix ``[0, done)`` (:mod:`gpuconn.stats.checkpoint`)."""
        self.merged, self.maxima, self.done, self._pending = merged, {0: maxima}, int(done), {}

    def running(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``negbin``: per contrast, the voxels not yet stopped and the exceedances each still needs."""
        if self.merged is None:
            return None
        r = self.prepared.accel.negbin_r
        out = {}
        for name, m in self.merged.items():
            stopped = torch.as_tensor(m["stopped"])
            index = torch.nonzero(stopped == 0).flatten()
            out[name] = (index, r - torch.as_tensor(m["count"]["vox"]).to(stopped.device)[index])
        return out

    def finished(self) -> bool:
        """``negbin``: every voxel of every contrast has stopped (later rearrangements change nothing)."""
        accel = self.prepared.accel
        if accel is None or accel.mode != "negbin" or self.merged is None:
            return False
        return all(bool((torch.as_tensor(m["stopped"]) > 0).all()) for m in self.merged.values())

    def merged_maxima(self) -> dict[tuple[str, str], np.ndarray]:
        """Per ``(contrast name, 'vox' or spatial name)``: the maxima of the rearrangements added, in order."""
        maxima: dict[tuple[str, str], list[np.ndarray]] = {}
        for start in sorted(self.maxima):
            for name, by_key in self.maxima[start].items():
                for key, values in by_key.items():
                    maxima.setdefault((name, key), []).append(values)
        return {k: np.concatenate(v) for k, v in maxima.items()}

    def result(self, seconds: float) -> PermutationTestResult:
        """The merged result; every rearrangement must have been added once (``negbin``: or all stopped)."""
        prepared = self.prepared
        maxima = self.merged_maxima()
        n_done = len(next(iter(maxima.values()), ()))
        if n_done != prepared.scheme.n_perm and not (self.finished() and n_done == self.done):
            raise ValueError(f"merged {n_done} rearrangements, expected {prepared.scheme.n_perm}")
        n_perm = prepared.scheme.n_perm
        results = [_summarise(c, n_perm, self.counts, maxima, prepared.accel, self.merged[c.name])
                   for c in prepared.contrasts]
        accel = None if prepared.accel is None else prepared.accel.record()
        if accel is not None and prepared.accel.mode == "negbin":
            accel["rearrangements_evaluated"] = self.done
        return PermutationTestResult(results, prepared.scheme, str(prepared.device), prepared.chunk, seconds,
                                     accel=accel, variance_groups=prepared.variance_groups)


def run_chunk_loop(
    prepared: PreparedTest,
    progress: bool,
    *,
    merger: ChunkMerger | None = None,
    done: int = 0,
    on_chunk: Callable[[ChunkMerger, int], None] | None = None,
) -> PermutationTestResult:
    """Evaluate rearrangements ``done..n_perm-1`` chunk after chunk into ``merger``.

    ``merger``/``done`` continue a run whose first ``done`` rearrangements
    are merged already (:mod:`gpuconn.stats.checkpoint`); ``on_chunk(merger,
    stop)`` is called after each chunk is merged.
    """
    merger = ChunkMerger(prepared) if merger is None else merger
    began = time.perf_counter()
    with progress_bar("randomise", prepared.scheme.n_perm, enabled=progress, completed=done) as advance:
        negbin = prepared.accel is not None and prepared.accel.mode == "negbin"
        evaluate = lambda start, stop: evaluate_chunk(  # noqa: E731
            prepared, done + start, done + stop, **({"running": merger.running()} if negbin else {}))
        for start, stop, out in run_chunked(evaluate, prepared.scheme.n_perm - done, prepared.chunk,
                                            device=prepared.device):
            merger.add(done + start, done + stop, out)
            advance(stop - start)
            if merger.finished():  # negbin: every voxel stopped
                break
            if on_chunk is not None:
                on_chunk(merger, done + stop)
    return merger.result(time.perf_counter() - began)


def _p_values(c: _Contrast, key: str, observed: np.ndarray, n_perm: int, counts: dict, null_max: np.ndarray,
              accel: _accel.Accel | None, state: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Uncorrected and FWER p of one statistic: counted, or from the acceleration's fits."""
    count = to_host(counts[(c.name, key)])
    if accel is None:
        return count.astype(np.float64) / n_perm, fwe_p(null_max, observed)
    if accel.mode == "negbin":
        no_fwer = np.full(observed.shape, np.nan)
        return _accel.negbin_p(count, to_host(state["stopped"]), n_perm, accel.negbin_r), no_fwer
    return (_accel.accel_p(accel, observed, count, to_host(state["accel"][key])),
            _accel.accel_fwe_p(accel, observed, null_max))


def _summarise(c: _Contrast, n_perm: int, counts: dict, maxima: dict, accel: _accel.Accel | None = None,
               state: dict | None = None) -> ContrastResult:
    null_max = maxima[(c.name, "vox")] if accel is None or accel.mode != "negbin" else np.empty(0, np.float32)
    # the compared map: the statistic, or with variance groups the z of v or G (as PALM)
    p_unc, p_fwe = _p_values(c, "vox", to_host(c.observed), n_perm, counts, null_max, accel, state)
    dof = c.model.dof
    statistic = statistic_name(c.kind, 1 if c.groups is None else c.groups.n_groups)
    if c.groups is None:
        stat = to_host(c.observed)
        z = t_to_z(stat, dof) if c.kind == "t" else f_to_z(stat, c.model.rank, dof)
    else:  # p-values and null of the z of v or G, as PALM
        stat, z = to_host(c.gstat), to_host(c.observed)
    spatial = {}
    for key, transform in c.transforms.items():
        mapped = to_host(c.spatial_observed[key])
        key_max = maxima[(c.name, key)]
        key_unc, key_fwe = _p_values(c, key, mapped, n_perm, counts, key_max, accel, state)
        settings = dict(getattr(transform, "settings", {}))
        if c.groups is not None:
            settings["on"] = f"z of {statistic}"
        spatial[key] = MapResult(mapped, key_fwe, key_unc, key_max, settings)
    return ContrastResult(
        name=c.name,
        kind=c.kind,
        contrast=c.matrix,
        df=c.model.df,
        stat=stat,
        z=z.astype(np.float32),
        p_uncorrected=p_unc,
        p_fwe=p_fwe,
        p_fdr=fdr_adjust(p_unc),
        null_max=null_max,
        spatial=spatial,
        statistic=statistic,
        df2=None if c.groups is None else to_host(c.df2),
    )


def write_outputs(
    result: PermutationTestResult,
    root: str | os.PathLike,
    mask: np.ndarray,
    reference: Any,
    *,
    uncorrp: bool = False,
    voxelwise: bool = True,
    fdr: bool = False,
    write_raw: Collection[str] = (),
    params: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write randomise-named outputs of a permutation test.

    Parameters
    ----------
    result : PermutationTestResult
    root : path-like
        Output root (randomise ``-o``); files are ``<root>_tstat1.nii.gz``...
    mask : ndarray of bool, shape (x, y, z)
        The voxels of ``result`` (mask order).
    reference : nibabel.Nifti1Image
        Grid and header of the outputs.
    uncorrp : bool
        Write ``<root>_vox_p_<stat>`` (1 - uncorrected p), and
        ``<root>_<name>_p_<stat>`` for each spatial statistic.
    voxelwise : bool
        Write ``<root>_vox_corrp_<stat>`` (1 - FWER p).
    fdr : bool
        Write ``<root>_vox_fdrp_<stat>`` (1 - FDR-adjusted p).
    write_raw : collection of str
        Spatial statistics whose observed map is written too (TFCE).
    params : mapping, optional
        Extra parameters for ``<root>.json``.

    Returns
    -------
    list of Path
        Every file written; the statistic maps, the z maps
        (``<root>_zstat<i>`` / ``<root>_zfstat<i>``), the max-statistic null
        ``<root>_perm_<stat>.txt`` and the JSON sidecar ``<root>.json``.
    """
    root = str(root)
    written = []

    def image(values: np.ndarray, suffix: str) -> None:
        path = f"{root}_{suffix}.nii.gz"
        written.append(save_image(unmask(np.asarray(values, dtype=np.float32), mask), reference, path, sidecar=False))

    def null(values: np.ndarray, suffix: str) -> None:
        text = "\n".join(f"{v:.9g}" for v in values) + "\n"
        written.append(write_text(f"{root}_perm_{suffix}.txt", text))

    for c in result.contrasts:
        image(c.stat, c.name)
        image(c.z, ("zstat" if c.kind == "t" else "zfstat") + c.name[5:])
        if uncorrp:
            image(1 - c.p_uncorrected, f"vox_p_{c.name}")
        if voxelwise:
            image(1 - c.p_fwe, f"vox_corrp_{c.name}")
        if fdr:
            image(1 - c.p_fdr, f"vox_fdrp_{c.name}")
        if c.null_max.size:  # negbin and noperm have no null of the maximum
            null(c.null_max, c.name)
        for key, mapped in c.spatial.items():
            if key in write_raw:
                image(mapped.stat, f"{key}_{c.name}")
            image(1 - mapped.p_fwe, f"{key}_corrp_{c.name}")
            if uncorrp:
                image(1 - mapped.p_uncorrected, f"{key}_p_{c.name}")
            null(mapped.null_max, f"{key}_{c.name}")
    scheme = result.scheme
    record = {
        "n_perm": scheme.n_perm,
        "n_possible": scheme.n_possible,
        "exhaustive": scheme.exhaustive,
        "method": scheme.method,
        "seed": scheme.seed,
        "whole_blocks": scheme.whole_blocks,
        "blocks": scheme.blocks,
        "resumed": result.resumed_from > 0,
        "resumed_from": result.resumed_from,
        "uncorrp": uncorrp,
        "voxelwise": voxelwise,
        "fdr": fdr,
        "device": result.device,
        "chunk_size": result.chunk_size,
        "permutation_seconds": round(result.seconds, 3),
        "contrasts": {c.name: {"kind": c.kind, "weights": c.contrast, "df": list(c.df), "statistic": c.statistic,
                               **({} if c.df2 is None else {"df2": "per voxel (Welch-Satterthwaite)",
                                                            "df2_range": [float(c.df2.min()), float(c.df2.max())]})}
                      for c in result.contrasts},
        "variance_groups": result.variance_groups,
        "spatial": {c.name: {k: m.settings for k, m in c.spatial.items()} for c in result.contrasts if c.spatial},
        "accel": result.accel,
        **dict(params or {}),
    }
    written.append(write_json(root + ".json", provenance(record)))
    return written


def analysis_mask(img: Any, input_path: str | os.PathLike, mask_path: str | os.PathLike | None) -> np.ndarray:
    """The ``-m`` mask on the input's grid; without one, voxels finite in every volume and non-zero in some."""
    if mask_path is not None:
        return load_mask(mask_path, reference=img, reference_path=input_path, what="mask (-m)")[0]
    data = np.asarray(img.dataobj)
    mask = np.all(np.isfinite(data), axis=3) & np.any(data != 0, axis=3)
    if not mask.any():
        raise OptionError("the input has no voxel that is non-zero in any volume; give a mask with {mask_path}")
    return mask


def randomise(
    input_path: str | os.PathLike,
    output_root: str | os.PathLike,
    permutation: PermutationOptions | None = None,
    *,
    design_path: str | os.PathLike | None = None,
    contrast_path: str | os.PathLike | None = None,
    ftest_path: str | os.PathLike | None = None,
    groups_path: str | os.PathLike | None = None,
    mask_path: str | os.PathLike | None = None,
    variance_groups_path: str | os.PathLike | None = None,
    one_sample: bool = False,
    voxelwise: bool = True,
    uncorrp: bool = False,
    fdr: bool = False,
    device: str = "auto",
    spatial: Mapping[str, SpatialTransform] | Callable[[np.ndarray], Mapping[str, SpatialTransform]] | None = None,
    spatial_f: Mapping[str, SpatialTransform] | Callable[[np.ndarray], Mapping[str, SpatialTransform]] | None = None,
    write_raw: Collection[str] = (),
    params: Mapping[str, Any] | None = None,
    progress: bool = True,
    runner: Runner | None = None,
) -> PermutationTestResult:
    """File-level randomise: NIfTI and VEST in, randomise-named NIfTI out.

    Parameters
    ----------
    input_path : path-like
        4D image, one volume per observation (``-i``).
    output_root : path-like
        Output root (``-o``).
    permutation : PermutationOptions, optional
        As in :func:`prepare_permutation_test`; ``accel`` ``negbin`` and
        ``noperm`` have no FWER p (``voxelwise`` must be False).
    design_path, contrast_path, ftest_path, groups_path : path-like, optional
        ``-d``, ``-t``, ``-f``, ``-e``.
    mask_path : path-like, optional
        ``-m``; default: voxels non-zero in some volume.
    variance_groups_path : path-like or 'auto', optional
        ``--vg``: variance groups (VEST ``design.grp``, one integer per
        volume) or ``'auto'`` (from ``-e``); see
        :func:`prepare_permutation_test`.
    one_sample : bool
        ``-1``: design is a column of ones, contrast ``[1]``, sign flipping;
        excludes ``-d``/``-t``.
    device
        As in :func:`prepare_permutation_test`.
    voxelwise, uncorrp, fdr, write_raw, params
        As in :func:`write_outputs`.
    spatial, spatial_f : mapping, or callable mask -> mapping, optional
        Spatial statistics; a callable receives the boolean mask
        ``(x, y, z)`` (to build neighbourhoods) and returns the mapping.
    progress : bool, default True
    runner : callable, optional
        As in :func:`run_permutation_test` (Dask: :func:`gpuconn.stats.dask_runner.dask_runner`).

    Returns
    -------
    PermutationTestResult
    """
    permutation = permutation or PermutationOptions()
    if permutation.accel in _accel.NO_FWER and voxelwise:
        raise OptionError(f"{{accel}} {permutation.accel} has no FWER p (there is no null of the maximum); drop "
                          "{voxelwise}, or use {accel} tail")
    img = load_image(input_path, ndim=4, what="input (-i)")
    n_obs = img.shape[3]
    if one_sample:
        if design_path or contrast_path or ftest_path:
            raise OptionError("{one_sample} (one-sample) builds its own design; drop "
                              "{design_path}/{contrast_path}/{ftest_path} or drop {one_sample}")
        design = Design(np.ones((n_obs, 1)), np.ones((1, 1)), contrast_names=["mean>0"])  # 'auto' flips signs
    else:
        if design_path is None or contrast_path is None:
            raise OptionError("give a design and contrasts ({design_path} design.mat {contrast_path} design.con), "
                              "or {one_sample} for a one-sample test")
        design = load_design(design_path, contrast_path, ftest_path, groups_path, n_obs=n_obs,
                             data_source=str(input_path))
    vg = variance_groups_path
    if vg is not None and str(vg) != "auto":
        vg = read_vest(vg, what="variance groups (--vg)")[0]
    mask = analysis_mask(img, input_path, mask_path)
    data = masked_data(img, mask, path=input_path)
    spatial = spatial(mask) if callable(spatial) else spatial
    spatial_f = spatial_f(mask) if callable(spatial_f) else spatial_f
    result = run_permutation_test(
        data, design, permutation=permutation, device=device, spatial=spatial, spatial_f=spatial_f, progress=progress,
        runner=runner, design_source=str(design_path or "-1 design"), variance_groups=vg,
        variance_groups_source=str(variance_groups_path),
    )
    inputs = {
        "input": str(input_path), "design_file": design_path, "contrast_file": contrast_path,
        "ftest_file": ftest_path, "groups_file": groups_path, "variance_groups_file": variance_groups_path,
        "mask": mask_path, "one_sample": one_sample, "demean": permutation.demean,
        "design_matrix": design.matrix, "contrast_names": design.contrast_names,
    }
    write_outputs(result, output_root, mask, img, uncorrp=uncorrp, voxelwise=voxelwise, fdr=fdr,
                  write_raw=write_raw, params={**inputs, **dict(params or {})})
    return result
