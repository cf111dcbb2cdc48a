"""Inference across contrasts and inputs: FWER over several statistics, non-parametric combination, parametric p.

PALM's joint inference (Winkler et al. 2016, "Non-parametric combination
and related permutation tests for neuroimaging"), on the rearrangements of
:mod:`gpuconn.stats.randomise`. Several inputs share the design, the mask and
the rearrangements (the scheme depends on the design, ``-n`` and ``--seed``
only, so every input's run draws the same ones).

- **FWER across statistics** (PALM ``-corrcon``, ``-corrmod``): the null of
  the maximum over several statistics is, per rearrangement, the maximum
  over them of each one's maximum, made comparable as PALM does: each
  statistic (t, F) is turned into z at its own degrees of freedom
  (:func:`gpuconn.stats.zstat.t_to_z`, :func:`~gpuconn.stats.zstat.f_to_z`).
  z is increasing in the statistic at fixed df, so the maximum z of a
  rearrangement is the z of its maximum statistic, which the engine keeps
  (:attr:`ContrastResult.null_max`); no rearrangement is evaluated again.
  ``p(v) = #{i : max_s Z_{s,i} >= z(v)} / n``. Spatial statistics (TFCE,
  cluster extent/mass) are compared as they are: their null is the maximum
  over the statistics of each one's maximum (PALM does the same when the
  contrasts have one rank; gpuconn's TFCE is of t for t contrasts and of z
  for F tests).
- **Non-parametric combination** (PALM ``-npc``/``-npcmod``, methods
  Fisher, Stouffer, Tippett): per rearrangement and voxel, each input's
  statistic is turned into z at its df and into the one-sided partial p
  ``p_k = 1 - Phi(z_k)`` (PALM's ``palm_gtoz`` then ``palm_gpval(., 0)``),
  and combined: Fisher ``T = -2 sum_k log p_k``, Stouffer
  ``T = sum_k z_k / sqrt(K)``, Tippett ``T = min_k p_k`` (larger is more
  significant for the first two, smaller for Tippett; Tippett is kept and
  written as ``max_k z_k``, the z of ``min_k p_k``, so that larger is more
  significant for all three). The combined statistic's own permutation
  distribution gives its uncorrected and FWER p by randomise's counting
  rule; its parametric p is PALM's (``chi2(2K)``, normal, ``1 - (1 - T)^K``).
- **Parametric p** (PALM ``-saveparametric``): ``1 - Phi(z)`` of each
  statistic (t one-sided, as randomise's contrasts are; F upper tail).

Output names (p-maps as ``1 - p``, as randomise writes them): with one input
the files keep randomise's names; with several each input's files take the
root ``<root>_m<k>`` (PALM's ``_m1``, ``_m2``). Beside them
``<root>_vox_ccorrp_<stat>`` (FWER across contrasts), ``..._mcorrp_...``
(across inputs), ``..._mccorrp_...`` (across both), the same with
``<tfce|clustere|clusterm>`` for spatial statistics, ``<root>_vox_parap_<stat>``
(parametric p), and ``<root>_npc_<method>_<stat>`` (combined statistic),
``<root>_npc_<method>_vox_corrp_<stat>``, ``_vox_p_`` (with ``uncorrp``),
``_vox_ccorrp_`` (with ``corrcon``), ``_vox_parap_`` (with
``save_parametric``) and its null ``<root>_perm_npc_<method>_<stat>.txt``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import special

from ..core.backend import run_chunked, to_numpy
from ..core.errors import InputError, OptionError
from ..core.io import load_image, provenance, save_image, unmask, write_json, write_text
from ..core.progress import progress_bar
from .randomise import (
    ContrastResult,
    PermutationTestResult,
    PreparedTest,
    Runner,
    fwe_p,
    analysis_mask,
    chunk_rearrangements,
    contrast_statistics,
    randomise,
    run_chunk_loop,
)
from .zstat import f_to_z, t_to_z, t_to_z_tensor

__all__ = [
    "NPC_METHODS",
    "CombinedResult",
    "statistic_z",
    "parametric_p",
    "fwe_across",
    "combined_fwe_across",
    "combine_statistics",
    "npc_test",
    "input_roots",
    "write_across",
    "randomise_inputs",
]

NPC_METHODS = ("fisher", "stouffer", "tippett")


@dataclass(frozen=True)
class CombinedResult:
    """Non-parametric combination of one contrast over the inputs.

    Attributes
    ----------
    name : str
        The contrast (``tstat1``, ``fstat1``...).
    method : {'fisher', 'stouffer', 'tippett'}
    n_inputs : int
    stat : ndarray, shape (n_voxels,)
        Combined statistic (Tippett: ``max_k z_k``), float64.
    p_uncorrected, p_fwe, p_parametric : ndarray, shape (n_voxels,)
    null_max : ndarray, shape (n_perm,)
        Maximum combined statistic of each rearrangement (0 = observed).
    """

    name: str
    method: str
    n_inputs: int
    stat: np.ndarray
    p_uncorrected: np.ndarray
    p_fwe: np.ndarray
    p_parametric: np.ndarray
    null_max: np.ndarray


def statistic_z(values: np.ndarray, kind: str, df: tuple[int, int]) -> np.ndarray:
    """z (float64) of t (``kind='t'``) or F statistics with degrees of freedom ``df = (s, dof)``."""
    values = np.asarray(values, dtype=np.float64)
    return t_to_z(values, df[1]) if kind == "t" else f_to_z(values, df[0], df[1])


def _null_z(c: ContrastResult) -> np.ndarray:
    """z of each rearrangement's maximum (with variance groups the engine compares z of v/G already)."""
    return np.asarray(c.null_max, dtype=np.float64) if c.df2 is not None else statistic_z(c.null_max, c.kind, c.df)


def observed_z(c: ContrastResult) -> np.ndarray:
    """z of a contrast's observed statistic (float64): of t or F at their df, or of v/G at each voxel's df."""
    return np.asarray(c.z, dtype=np.float64) if c.df2 is not None else statistic_z(c.stat, c.kind, c.df)


def parametric_p(c: ContrastResult) -> np.ndarray:
    """Parametric p of a contrast's statistic: one-sided for t (and v), upper tail for F (and G), float64."""
    return special.ndtr(-observed_z(c))


def fwe_across(group: Sequence[ContrastResult]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """FWER p of each statistic against the maximum over all of ``group``, per rearrangement.

    Parameters
    ----------
    group : sequence of ContrastResult
        Statistics evaluated on the same rearrangements (one run's
        contrasts, one contrast of several inputs, or both).

    Returns
    -------
    list of (ndarray, dict)
        Per member: the voxelwise FWER p (via z, see the module docstring)
        and, per spatial statistic, its FWER p against the maximum over the
        members that have it.
    """
    lengths = {c.null_max.shape[0] for c in group}
    if len(lengths) != 1:
        raise ValueError(f"statistics from different numbers of rearrangements {sorted(lengths)}")
    null = np.max([_null_z(c) for c in group], axis=0)
    spatial_null: dict[str, np.ndarray] = {}
    for c in group:
        for key, mapped in c.spatial.items():
            spatial_null[key] = np.maximum(spatial_null.get(key, mapped.null_max), mapped.null_max)
    return [(fwe_p(null, observed_z(c)),
             {key: fwe_p(spatial_null[key], mapped.stat) for key, mapped in c.spatial.items()}) for c in group]


def combine_statistics(z: torch.Tensor, method: str) -> torch.Tensor:
    """Combined statistic of partial z values ``(n_inputs, ...)``, larger more significant (float64).

    Fisher ``-2 sum log(1 - Phi(z))``, Stouffer ``sum z / sqrt(K)``,
    Tippett ``max z`` (the z of the smallest partial p).
    """
    if method == "fisher":
        return -2.0 * torch.special.log_ndtr(-z).sum(0)
    if method == "stouffer":
        return z.sum(0) / math.sqrt(z.shape[0])
    if method == "tippett":
        return z.amax(0)
    raise ValueError(f"unknown combining method {method!r}; one of {', '.join(NPC_METHODS)}")


def _check_npc(method: str) -> None:
    if method not in NPC_METHODS:
        raise OptionError(f"{{npc}} {method!r} is not one of {', '.join(NPC_METHODS)}")


def _combined_parametric_p(stat: np.ndarray, method: str, n_inputs: int) -> np.ndarray:
    """PALM's parametric p of the combined statistic (fisherp, stoufferp, tippettp)."""
    if method == "fisher":
        return special.chdtrc(2 * n_inputs, stat)
    if method == "stouffer":
        return special.ndtr(-stat)
    return -np.expm1(n_inputs * special.log_ndtr(stat))  # 1 - (1 - min p)^K, min p = 1 - Phi(max z)


def _partial_z(prepared: Sequence[PreparedTest], j: int, rearrangements: tuple, start: int) -> torch.Tensor:
    """z of contrast ``j`` of every input for a chunk: ``(n_inputs, n_chunk, n_voxels)`` float64."""
    zs = []
    for test in prepared:
        c = test.contrasts[j]
        stats = contrast_statistics(c, rearrangements, start)
        if c.groups is not None:  # variance groups: the engine's statistic is the z of v/G already
            zs.append(stats.double())
        elif c.kind == "t":  # on the device (CUDA: series in float64; CPU: SciPy)
            zs.append(t_to_z_tensor(stats.double(), c.model.df[1]))
        else:
            zs.append(torch.as_tensor(statistic_z(to_numpy(stats), c.kind, c.model.df), device=test.device))
    return torch.stack(zs)


def _check_same_test(prepared: Sequence[PreparedTest]) -> None:
    first = prepared[0]
    for test in prepared[1:]:
        same = (test.scheme.n_perm == first.scheme.n_perm and test.scheme.seed == first.scheme.seed
                and np.array_equal(test.scheme.chunk(0, min(8, test.scheme.n_perm))[0],
                                   first.scheme.chunk(0, min(8, first.scheme.n_perm))[0])
                and [c.name for c in test.contrasts] == [c.name for c in first.contrasts]
                and test.contrasts[0].residuals.shape == first.contrasts[0].residuals.shape)
        if not same:
            raise ValueError("combined tests must share the design, contrasts, voxels and rearrangements")


def npc_test(prepared: Sequence[PreparedTest], method: str, *, progress: bool = False) -> list[CombinedResult]:
    """Non-parametric combination of several inputs' statistics, contrast by contrast.

    Every chunk of rearrangements is evaluated for every input together
    (:func:`gpuconn.stats.randomise.contrast_statistics`); the statistics
    are turned into z (t: :func:`gpuconn.stats.zstat.t_to_z_tensor`, on the
    device; F: :func:`statistic_z`, on the host), combined on the device
    (:func:`combine_statistics`) and reduced, as the engine does, to
    voxelwise exceedance counts and per-rearrangement maxima. Chunks are
    halved on OOM; results do not depend on the chunk size.

    Parameters
    ----------
    prepared : sequence of PreparedTest
        One per input (:func:`gpuconn.stats.randomise.prepare_permutation_test`
        with the same design, options and seed), at least two.
    method : {'fisher', 'stouffer', 'tippett'}
    progress : bool, default False

    Returns
    -------
    list of CombinedResult
        One per contrast, in the prepared tests' order.
    """
    _check_npc(method)
    if len(prepared) < 2:
        raise OptionError("{npc} combines several inputs; give two or more {input_paths} images")
    _check_same_test(prepared)
    first = prepared[0]
    n_perm, device, n_inputs = first.scheme.n_perm, first.device, len(prepared)
    names = [c.name for c in first.contrasts]
    identity = chunk_rearrangements(first, 0, 1)
    observed = [combine_statistics(_partial_z(prepared, j, identity, 0), method)[0] for j in range(len(names))]

    def evaluate(start: int, stop: int) -> list[tuple[torch.Tensor, np.ndarray]]:
        rearrangements = chunk_rearrangements(first, start, stop)
        out = []
        for j in range(len(names)):
            combined = combine_statistics(_partial_z(prepared, j, rearrangements, start), method)
            out.append(((combined >= observed[j]).sum(0), to_numpy(combined.amax(1))))
        return out

    counts = [torch.zeros_like(o, dtype=torch.int64) for o in observed]
    maxima: list[list[np.ndarray]] = [[] for _ in names]
    chunk = max(1, first.chunk // n_inputs)
    with progress_bar(f"npc ({method})", n_perm, enabled=progress) as advance:
        for start, stop, out in run_chunked(evaluate, n_perm, chunk, device=device):
            for j, (count, top) in enumerate(out):
                counts[j] += count
                maxima[j].append(top)
            advance(stop - start)
    results = []
    for j, name in enumerate(names):
        stat = to_numpy(observed[j])
        null_max = np.concatenate(maxima[j])
        results.append(CombinedResult(
            name, method, n_inputs, stat, to_numpy(counts[j]).astype(np.float64) / n_perm, fwe_p(null_max, stat),
            _combined_parametric_p(stat, method, n_inputs), null_max))
    return results


def combined_fwe_across(combined: Sequence[CombinedResult]) -> list[np.ndarray]:
    """FWER p of each contrast's combined statistic against the maximum over all the contrasts (``--corrcon``).

    One method and number of inputs, so the combined statistics of the
    contrasts are on one scale.
    """
    null = np.max([r.null_max for r in combined], axis=0)
    return [fwe_p(null, r.stat) for r in combined]


class _Writer:
    """Randomise-style image writer (values in mask order) for one output root."""

    def __init__(self, root: str, mask: np.ndarray, reference: Any):
        self.root, self.mask, self.reference = root, mask, reference

    def image(self, values: np.ndarray, suffix: str) -> None:
        data = unmask(np.asarray(values, dtype=np.float32), self.mask)
        save_image(data, self.reference, f"{self.root}_{suffix}.nii.gz", sidecar=False)

    def fwe(self, tag: str, c: ContrastResult, p: tuple[np.ndarray, dict[str, np.ndarray]], voxelwise: bool) -> None:
        voxel, spatial = p
        if voxelwise:
            self.image(1 - voxel, f"vox_{tag}_{c.name}")
        for key, values in spatial.items():
            self.image(1 - values, f"{key}_{tag}_{c.name}")


def write_across(roots: Sequence[str], mask: np.ndarray, reference: Any, results: Sequence[PermutationTestResult], *,
                 corrcon: bool, corrmod: bool, save_parametric: bool = False, voxelwise: bool = True) -> None:
    """Write each map's parametric p and FWER p across contrasts (``ccorrp``), maps (``mcorrp``), both (``mccorrp``).

    Parameters
    ----------
    roots : sequence of str
        Output root of each result (``<root>_vox_ccorrp_tstat1.nii.gz``...).
    mask : ndarray of bool, shape (x, y, z)
        The voxels of every result (mask order), on ``reference``'s grid.
    reference : nibabel image
    results : sequence of PermutationTestResult
        Tests of one design on the same rearrangements (the inputs of one
        run, or the maps of one study model), with the same contrasts.
    corrcon, corrmod : bool
        FWER across the contrasts of each result / across the results.
    save_parametric : bool
        Also ``<root>_vox_parap_<stat>``.
    voxelwise : bool
        Write the voxelwise maps (spatial statistics' maps are always written).
    """
    writers = [_Writer(str(root), mask, reference) for root in roots]
    for writer, result in zip(writers, results):
        if save_parametric:
            for c in result.contrasts:
                writer.image(1 - parametric_p(c), f"vox_parap_{c.name}")
        if corrcon:
            for c, p in zip(result.contrasts, fwe_across(result.contrasts)):
                writer.fwe("ccorrp", c, p, voxelwise)
    if not corrmod:
        return
    for j in range(len(results[0].contrasts)):
        group = [r.contrasts[j] for r in results]
        for writer, c, p in zip(writers, group, fwe_across(group)):
            writer.fwe("mcorrp", c, p, voxelwise)
    if corrcon:
        p_all = iter(fwe_across([c for r in results for c in r.contrasts]))
        for writer, r in zip(writers, results):
            for c in r.contrasts:
                writer.fwe("mccorrp", c, next(p_all), voxelwise)


def _write_npc(writer: _Writer, combined: list[CombinedResult], *, corrcon: bool, save_parametric: bool,
               uncorrp: bool, null_root: str) -> None:
    """The combined statistic, its p-maps (``1 - p``) and its null, per contrast."""
    across = combined_fwe_across(combined) if corrcon else [None] * len(combined)
    for r, p_across in zip(combined, across):
        writer.image(r.stat, r.name)
        writer.image(1 - r.p_fwe, f"vox_corrp_{r.name}")
        if uncorrp:
            writer.image(1 - r.p_uncorrected, f"vox_p_{r.name}")
        if corrcon:
            writer.image(1 - p_across, f"vox_ccorrp_{r.name}")
        if save_parametric:
            writer.image(1 - r.p_parametric, f"vox_parap_{r.name}")
        write_text(f"{null_root}_{r.name}.txt", "\n".join(f"{v:.9g}" for v in r.null_max) + "\n")


def input_roots(output_root: str | os.PathLike, n_inputs: int) -> list[str]:
    """Each input's output root: ``<root>`` for one input, ``<root>_m1``, ``<root>_m2``... for several."""
    return [str(output_root)] if n_inputs == 1 else [f"{output_root}_m{k + 1}" for k in range(n_inputs)]


def _check_inputs(input_paths: Sequence[str | os.PathLike], mask_path, *, corrmod: bool, npc: str | None) -> None:
    """Several inputs: one grid, one number of volumes, one mask; ``corrmod``/``npc`` need two or more."""
    if len(input_paths) < 2:
        for name, given in (("corrmod", corrmod), ("npc", npc)):
            if given:
                raise OptionError(f"{{{name}}} works across several inputs; give two or more {{input_paths}} images, "
                                  f"or drop {{{name}}}")
        return
    images = [load_image(p, ndim=4, what="input (-i)") for p in input_paths]
    first, path0 = images[0], input_paths[0]
    for img, path in zip(images[1:], input_paths[1:]):
        if img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine, atol=1e-4):
            raise InputError(f"input (-i) {path} is not on the grid of {path0} (shape {img.shape[:3]} vs "
                             f"{first.shape[:3]}, or a different affine); resample the inputs to one grid")
        if img.shape[3] != first.shape[3]:
            raise InputError(f"input (-i) {path} has {img.shape[3]} volumes but {path0} has {first.shape[3]}; "
                             "every input needs one volume per row of the design, in the same order")
    if mask_path is None:
        mask0 = analysis_mask(first, path0, None)
        for img, path in zip(images[1:], input_paths[1:]):
            if not np.array_equal(analysis_mask(img, path, None), mask0):
                raise OptionError(f"inputs {path0} and {path} have different default masks (voxels non-zero in "
                                  "some volume); give one mask for all inputs with {mask_path}")


def randomise_inputs(
    input_paths: Sequence[str | os.PathLike],
    output_root: str | os.PathLike,
    *,
    corrcon: bool = False,
    corrmod: bool = False,
    npc: str | None = None,
    save_parametric: bool = False,
    runner_for: Callable[[str], Runner | None] = lambda root: None,
    progress: bool = True,
    params: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[PermutationTestResult]:
    """File-level randomise of one or several inputs with one design, and inference across them.

    Each input runs as :func:`gpuconn.stats.randomise.randomise` runs it
    (the same files, under ``<root>_m<k>`` when there are several inputs;
    one input keeps ``<root>`` and randomise's names). Then the outputs
    across contrasts and inputs named in the module docstring are written,
    and with several inputs a sidecar ``<root>.json`` naming the inputs and
    their roots.

    Parameters
    ----------
    input_paths : sequence of path-like
        4D images with the same grid and volumes (``-i``, repeatable).
    output_root : path-like
    corrcon : bool
        FWER across all contrasts (PALM ``-corrcon``).
    corrmod : bool
        FWER across the inputs (PALM ``-corrmod``); needs several inputs.
        With ``corrcon``: across contrasts and inputs.
    npc : {'fisher', 'stouffer', 'tippett'}, optional
        Non-parametric combination of the inputs (PALM ``-npc``); needs
        several inputs; evaluated in this process, not checkpointed.
    save_parametric : bool
        Write the parametric p of each statistic (PALM ``-saveparametric``).
    runner_for : callable, optional
        ``runner_for(root)`` gives the runner of the input with output root
        ``root`` (a checkpointing runner per input, or Dask).
    progress : bool, default True
    params : mapping, optional
        Extra sidecar parameters.
    **options
        Keyword options of :func:`gpuconn.stats.randomise.randomise`
        (``mask_path``, ``design_path``..., ``uncorrp``, ``voxelwise``).

    Returns
    -------
    list of PermutationTestResult
        One per input.
    """
    input_paths = list(input_paths)
    root = str(output_root)
    n_inputs = len(input_paths)
    if npc is not None:
        _check_npc(npc)
    _check_inputs(input_paths, options.get("mask_path"), corrmod=corrmod, npc=npc)
    record = {"inputs": [str(p) for p in input_paths], "corrcon": corrcon, "corrmod": corrmod, "npc": npc,
              "save_parametric": save_parametric}
    prepared: list[PreparedTest] = []

    def keeping(runner: Runner | None) -> Runner:
        def run(test: PreparedTest, show: bool) -> PermutationTestResult:
            if npc is not None:
                prepared.append(test)
            return (runner or run_chunk_loop)(test, show)
        return run

    roots = input_roots(root, n_inputs)
    results = [randomise(path, root_k, runner=keeping(runner_for(root_k)), progress=progress,
                         params={**dict(params or {}), **record}, **options)
               for path, root_k in zip(input_paths, roots)]
    if corrcon or corrmod or npc or save_parametric:
        img = load_image(input_paths[0], ndim=4, what="input (-i)")
        mask = analysis_mask(img, input_paths[0], options.get("mask_path"))  # every input's (_check_inputs)
        write_across(roots, mask, img, results, corrcon=corrcon, corrmod=corrmod, save_parametric=save_parametric,
                     voxelwise=options.get("voxelwise", True))
    if npc is not None:
        began = time.perf_counter()
        combined = npc_test(prepared, npc, progress=progress)
        record["npc_seconds"] = round(time.perf_counter() - began, 3)
        writer = _Writer(f"{root}_npc_{npc}", mask, img)
        _write_npc(writer, combined, corrcon=corrcon, save_parametric=save_parametric,
                   uncorrp=options.get("uncorrp", False), null_root=f"{root}_perm_npc_{npc}")
    if n_inputs > 1:
        record |= {"input_roots": input_roots(root, n_inputs),
                   "npc_statistic": {"fisher": "-2 sum_k log p_k", "stouffer": "sum_k z_k / sqrt(K)",
                                     "tippett": "max_k z_k (the z of min_k p_k)"}.get(npc),
                   "partial_p": "one-sided parametric p of each input's statistic (1 - Phi(z))" if npc else None}
        write_json(root + ".json", provenance({**record, **dict(params or {})}))
    return results
