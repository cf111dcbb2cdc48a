"""Permutation and sign-flip sets, drawn on the host in chunks.

A rearrangement of the observations is an ``order`` (which observation goes
to each position) and a vector of ``signs``: the rearranged residuals are
``(P e)[j] = signs[j] * e[order[j]]``. Rearrangement 0 is always the
identity (the unpermuted data).

Random rearrangement ``i >= 1`` is drawn from its own generator,
``numpy.random.default_rng(SeedSequence(seed, spawn_key=(i,)))``, so chunk
``[start, stop)`` is the same whatever the chunk size, on whichever device
or Dask worker asks for it. When the design allows fewer distinct
rearrangements than asked for (or ``n_perm=0``), all of them are enumerated
instead (exhaustive test), identity first.

Schemes (Winkler et al. 2014, NeuroImage 92:381; randomise and PALM):

- permutation (exchangeable errors, EE): rows are shuffled, within
  exchangeability blocks when ``blocks`` is given, or whole blocks are
  shuffled as units (``whole_blocks=True``, equal block sizes required);
- sign flipping (independent symmetric errors, ISE): each observation (or
  each whole block) gets a random sign;
- both (EE + ISE).

Distinct rearrangements are counted on the rows of the regressors given
(:func:`gpuconn.stats.randomise.prepare_permutation_test` gives the effect
of interest: the design columns its contrasts weight, PALM's Guttman
partition, ``palm_takeargs.m``): two row orders that give the same
rearranged regressors count once, so a two-sample design of n1 + n2
subjects has ``C(n1 + n2, n1)`` distinct permutations whatever its
covariates, a one-sample design ``2**n`` sign flips.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError, OptionError
from .options import PermutationOptions

__all__ = ["PermutationScheme", "make_scheme", "count_rearrangements", "MAX_EXHAUSTIVE"]

#: Largest number of rearrangements ``n_perm=0`` (exhaustive) will enumerate.
MAX_EXHAUSTIVE = 1_000_000


@dataclass(frozen=True)
class PermutationScheme:
    """A reproducible set of rearrangements of ``n_obs`` observations.

    Attributes
    ----------
    n_obs : int
        Number of observations (rows of the design).
    n_perm : int
        Number of rearrangements, the identity included.
    permute, flip : bool
        Whether rows are shuffled and/or signs flipped.
    blocks : ndarray of int, shape (n_obs,) or None
        Exchangeability block of each observation.
    whole_blocks : bool
        Shuffle (and flip) whole blocks instead of observations within blocks.
    seed : int
        Seed of the random draws.
    exhaustive : bool
        True when every distinct rearrangement is enumerated.
    n_possible : int
        Number of distinct rearrangements the design allows.
    """

    n_obs: int
    n_perm: int
    permute: bool
    flip: bool
    blocks: np.ndarray | None
    whole_blocks: bool
    seed: int
    exhaustive: bool
    n_possible: int
    _orders: np.ndarray | None = None
    _signs: np.ndarray | None = None

    @property
    def method(self) -> str:
        """``'permute'``, ``'flip'`` or ``'permute+flip'``."""
        return "+".join(name for name, used in (("permute", self.permute), ("flip", self.flip)) if used)

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rearrangements ``start`` to ``stop - 1``.

        Returns
        -------
        orders : ndarray of int64, shape (stop - start, n_obs)
            ``orders[i, j]`` is the observation placed at position ``j``.
        signs : ndarray of float64, shape (stop - start, n_obs)
            ``+1`` or ``-1`` for each position.
        """
        if not 0 <= start <= stop <= self.n_perm:
            raise ValueError(f"chunk [{start}, {stop}) outside [0, {self.n_perm})")
        if self.exhaustive:
            return self._orders[start:stop].copy(), self._signs[start:stop].copy()
        orders = np.empty((stop - start, self.n_obs), dtype=np.int64)
        signs = np.ones((stop - start, self.n_obs))
        for row, index in enumerate(range(start, stop)):
            if index == 0:
                orders[row] = np.arange(self.n_obs)
                continue
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(index,)))
            orders[row], signs[row] = self._draw(rng)
        return orders, signs

    @functools.cached_property
    def _groups(self) -> list[np.ndarray]:
        return _block_members(self.blocks, self.n_obs)

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        groups = self._groups
        order = np.arange(self.n_obs)
        signs = np.ones(self.n_obs)
        if self.whole_blocks:
            if self.permute:
                order = _place_blocks(groups, rng.permutation(len(groups)), self.n_obs)
            if self.flip:
                signs = _block_signs(groups, rng.choice([-1.0, 1.0], size=len(groups)), self.n_obs)
            return order, signs
        if self.permute:
            for members in groups:
                order[members] = rng.permutation(members)
        if self.flip:
            signs = rng.choice([-1.0, 1.0], size=self.n_obs)
        return order, signs


def _block_members(blocks: np.ndarray | None, n_obs: int) -> list[np.ndarray]:
    """Indices of each block's observations, blocks in order of first appearance."""
    if blocks is None:
        return [np.arange(n_obs)]
    _, first = np.unique(blocks, return_index=True)
    return [np.flatnonzero(blocks == label) for label in blocks[np.sort(first)]]


def _place_blocks(groups: list[np.ndarray], block_order: np.ndarray, n_obs: int) -> np.ndarray:
    """Whole-block order: the positions of block ``i`` receive block ``block_order[i]``, member by member.

    Blocks need not be contiguous: ``groups[i][k]`` gets ``groups[block_order[i]][k]``.
    """
    order = np.empty(n_obs, dtype=np.int64)
    for members, source in zip(groups, block_order):
        order[members] = groups[source]
    return order


def _block_signs(groups: list[np.ndarray], block_signs, n_obs: int) -> np.ndarray:
    """Per-position signs from one sign per block."""
    signs = np.empty(n_obs)
    for members, sign in zip(groups, block_signs):
        signs[members] = sign
    return signs


def _row_labels(design: np.ndarray) -> np.ndarray:
    """Integer label per row; equal rows share a label."""
    return np.unique(np.round(np.asarray(design, dtype=np.float64), 10), axis=0, return_inverse=True)[1].ravel()


def _multinomial(labels: np.ndarray) -> int:
    counts = np.unique(labels, return_counts=True)[1]
    total = math.factorial(len(labels))
    for count in counts:
        total //= math.factorial(int(count))
    return total


def _unit_labels(design: np.ndarray, groups: list[np.ndarray], whole_blocks: bool) -> list[np.ndarray]:
    """Labels of the units that are shuffled together: rows per block, or whole blocks."""
    labels = _row_labels(design)
    if whole_blocks:
        contents = np.array([labels[g] for g in groups])
        return [_row_labels(contents)]
    return [labels[g] for g in groups]


def count_rearrangements(
    design: np.ndarray,
    *,
    permute: bool = True,
    flip: bool = False,
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
) -> int:
    """Number of distinct rearrangements of a design (an exact Python int).

    Parameters
    ----------
    design : ndarray, shape (n_obs, n_regressors)
    permute, flip : bool
        Shuffle rows and/or flip signs.
    blocks : ndarray of int, shape (n_obs,), optional
        Exchangeability blocks.
    whole_blocks : bool
        Blocks move as units.

    Returns
    -------
    int
    """
    design = np.asarray(design)
    groups = _block_members(blocks, design.shape[0])
    total = 1
    if permute:
        for labels in _unit_labels(design, groups, whole_blocks):
            total *= _multinomial(labels)
    if flip:
        total *= 2 ** (len(groups) if whole_blocks else design.shape[0])
    return total


def _multiset_orders(labels: np.ndarray) -> Iterator[np.ndarray]:
    """Every distinct arrangement of ``labels`` as an order of the units, identity first."""
    labels = np.asarray(labels)
    n = len(labels)
    values, counts = np.unique(labels, return_counts=True)
    members = {v: np.flatnonzero(labels == v) for v in values}

    def arrangements(remaining: dict, prefix: list) -> Iterator[list]:
        if len(prefix) == n:
            yield list(prefix)
            return
        for value in values:
            if remaining[value]:
                remaining[value] -= 1
                prefix.append(value)
                yield from arrangements(remaining, prefix)
                prefix.pop()
                remaining[value] += 1

    yield np.arange(n)
    identity = labels.tolist()
    for arrangement in arrangements(dict(zip(values, counts.tolist())), []):
        if arrangement == identity:
            continue
        order = np.empty(n, dtype=np.int64)
        arr = np.asarray(arrangement)
        for value in values:
            order[arr == value] = members[value]
        yield order


def _enumerate(
    design: np.ndarray, groups: list[np.ndarray], *, permute: bool, flip: bool, whole_blocks: bool
) -> tuple[np.ndarray, np.ndarray]:
    """All distinct rearrangements as (orders, signs), identity first."""
    n_obs = design.shape[0]
    if permute:
        unit_orders = [list(_multiset_orders(labels)) for labels in _unit_labels(design, groups, whole_blocks)]
        if whole_blocks:
            perms = [_place_blocks(groups, order, n_obs) for order in unit_orders[0]]
        else:
            perms = []
            for combo in itertools.product(*unit_orders):
                order = np.arange(n_obs)
                for members, sub in zip(groups, combo):
                    order[members] = members[sub]
                perms.append(order)
    else:
        perms = [np.arange(n_obs)]
    if flip:
        n_units = len(groups) if whole_blocks else n_obs
        flips = []
        for bits in itertools.product((1.0, -1.0), repeat=n_units):
            flips.append(_block_signs(groups, bits, n_obs) if whole_blocks else np.asarray(bits))
    else:
        flips = [np.ones(n_obs)]
    pairs = list(itertools.product(perms, flips))
    return np.array([p for p, _ in pairs], dtype=np.int64), np.array([s for _, s in pairs])


def _check_blocks(blocks: np.ndarray | None, n_obs: int, whole_blocks: bool, source: str) -> np.ndarray | None:
    if blocks is None:
        if whole_blocks:
            raise OptionError("{permute_blocks} needs exchangeability blocks ({groups_path} design.grp)")
        return None
    blocks = np.asarray(blocks).ravel()
    if blocks.shape[0] != n_obs:
        raise InputError(f"{source} has {blocks.shape[0]} rows but the design has {n_obs}; give one block per row")
    if not np.all(np.isfinite(blocks.astype(float))):
        raise InputError(f"{source} has missing or non-finite block labels")
    if whole_blocks:
        sizes = np.unique(np.unique(blocks, return_counts=True)[1])
        if len(sizes) != 1:
            raise OptionError(
                f"{source}: {{permute_blocks}} needs blocks of equal size, got sizes {sizes.tolist()}; "
                "drop {permute_blocks} to shuffle within blocks"
            )
        if len(np.unique(blocks)) < 2:
            raise OptionError(f"{source}: {{permute_blocks}} needs at least 2 blocks")
    return blocks


def make_scheme(
    design: np.ndarray,
    *,
    n_perm: int = PermutationOptions.n_perm,
    seed: int = PermutationOptions.seed,
    permute: bool = True,
    flip: bool = False,
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
    blocks_source: str = "exchangeability blocks",
) -> PermutationScheme:
    """Choose random or exhaustive rearrangements for a design.

    Parameters
    ----------
    design : ndarray, shape (n_obs, n_regressors)
        The regressors whose rows decide which rearrangements are distinct
        (the effect of interest; the full design counts every covariate).
    n_perm : int, default 5000 (:class:`~gpuconn.stats.options.PermutationOptions`' default, as ``seed``'s)
        Rearrangements wanted, the identity included; 0 means all of them
        (exhaustive, at most :data:`MAX_EXHAUSTIVE`). When the design allows
        fewer than ``n_perm`` distinct ones, all are enumerated.
    seed : int, default 0
        Seed of the random draws.
    permute, flip : bool
        Shuffle rows (EE) and/or flip signs (ISE); at least one.
    blocks : ndarray of int, shape (n_obs,), optional
        Exchangeability blocks (``design.grp``).
    whole_blocks : bool, default False
        Shuffle whole blocks as units (``PermutationOptions.permute_blocks``).
    blocks_source : str
        Name of the blocks' file, for error messages.

    Returns
    -------
    PermutationScheme

    Raises
    ------
    OptionError
        ``n_perm`` negative, too many rearrangements for ``n_perm=0``,
        ``whole_blocks`` without blocks, or with blocks of unequal sizes.
    InputError
        Blocks of the wrong length or with missing labels.
    """
    design = np.asarray(design, dtype=np.float64)
    n_obs = design.shape[0]
    if not (permute or flip):
        raise ValueError("at least one of permute and flip must be True")
    if isinstance(n_perm, bool) or int(n_perm) != n_perm or n_perm < 0:
        raise OptionError(f"{{n_perm}} must be a positive number of permutations or 0 for exhaustive, got {n_perm}")
    n_perm = int(n_perm)
    blocks = _check_blocks(blocks, n_obs, whole_blocks, blocks_source)
    n_possible = count_rearrangements(design, permute=permute, flip=flip, blocks=blocks, whole_blocks=whole_blocks)
    exhaustive = n_perm == 0 or n_possible <= n_perm
    if n_perm == 0 and n_possible > MAX_EXHAUSTIVE:
        raise OptionError(
            f"{{n_perm}} 0 asks for all {n_possible:.3g} distinct rearrangements of this design, more than "
            f"{MAX_EXHAUSTIVE}; give a number of permutations, e.g. {{n_perm}} 5000"
        )
    if not exhaustive:
        return PermutationScheme(n_obs, n_perm, permute, flip, blocks, whole_blocks, int(seed), False, n_possible)
    groups = _block_members(blocks, n_obs)
    orders, signs = _enumerate(design, groups, permute=permute, flip=flip, whole_blocks=whole_blocks)
    return PermutationScheme(
        n_obs, len(orders), permute, flip, blocks, whole_blocks, int(seed), True, n_possible, orders, signs
    )
