"""Permutation and sign-flip sets: identity first, chunk invariance, blocks, exhaustive enumeration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpuconn.core.errors import InputError, OptionError
from gpuconn.stats.permute import MAX_EXHAUSTIVE, count_rearrangements, make_scheme


def _two_groups(n1, n2):
    g = np.r_[np.ones(n1), np.zeros(n2)]
    return np.c_[g, 1 - g]


def test_identity_first_and_chunk_size_invariant():
    design = np.c_[np.ones(30), np.arange(30.0)]
    scheme = make_scheme(design, n_perm=50, seed=7, permute=True, flip=True)
    orders, signs = scheme.chunk(0, 50)
    np.testing.assert_array_equal(orders[0], np.arange(30))
    np.testing.assert_array_equal(signs[0], np.ones(30))
    pieces = [scheme.chunk(a, min(a + 7, 50)) for a in range(0, 50, 7)]
    np.testing.assert_array_equal(np.vstack([p[0] for p in pieces]), orders)
    np.testing.assert_array_equal(np.vstack([p[1] for p in pieces]), signs)
    assert all(sorted(o) == list(range(30)) for o in orders)
    assert set(np.unique(signs)) == {-1.0, 1.0}


def test_seed_reproducible_and_different_seeds_differ():
    design = np.c_[np.arange(20.0)]
    a = make_scheme(design, n_perm=10, seed=1).chunk(1, 10)[0]
    b = make_scheme(design, n_perm=10, seed=1).chunk(1, 10)[0]
    c = make_scheme(design, n_perm=10, seed=2).chunk(1, 10)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_within_block_permutation_stays_in_blocks():
    blocks = np.repeat([1, 2, 3, 4], 5)
    scheme = make_scheme(np.c_[np.arange(20.0)], n_perm=30, seed=0, blocks=blocks)
    orders, _ = scheme.chunk(0, 30)
    np.testing.assert_array_equal(blocks[orders], np.broadcast_to(blocks, orders.shape))
    assert (orders != np.arange(20)).any(axis=1)[1:].all()


def test_whole_block_permutation_moves_blocks_intact():
    blocks = np.repeat([1, 2, 3, 4, 5], 3)
    scheme = make_scheme(np.c_[np.arange(15.0)], n_perm=40, seed=0, blocks=blocks, whole_blocks=True, flip=True)
    orders, signs = scheme.chunk(0, scheme.n_perm)
    for order, sign in zip(orders, signs):
        moved = order.reshape(5, 3)
        np.testing.assert_array_equal(moved - moved[:, :1], np.broadcast_to([0, 1, 2], (5, 3)))
        assert (sign.reshape(5, 3) == sign.reshape(5, 3)[:, :1]).all()


@pytest.mark.parametrize("n_perm", [40, 0])
def test_whole_blocks_need_not_be_contiguous(n_perm):
    """Interleaved blocks move and flip as units, identity first: the same rearrangements as stored contiguously."""
    blocks = np.tile([1, 2, 3, 4], 3)  # 1 2 3 4 1 2 3 4 ...
    stored = np.argsort(blocks, kind="stable")  # contiguous position p holds interleaved observation stored[p]
    design = np.c_[np.arange(12.0)]
    options = {"n_perm": n_perm, "seed": 3, "flip": True, "whole_blocks": True}
    interleaved = make_scheme(design, blocks=blocks, **options)
    contiguous = make_scheme(design[stored], blocks=blocks[stored], **options)
    assert interleaved.n_perm == contiguous.n_perm == (40 if n_perm else math.factorial(4) * 2**4)
    orders, signs = interleaved.chunk(0, interleaved.n_perm)
    orders_c, signs_c = contiguous.chunk(0, contiguous.n_perm)
    np.testing.assert_array_equal(orders[0], np.arange(12))
    np.testing.assert_array_equal(signs[0], np.ones(12))
    np.testing.assert_array_equal(orders[:, stored], stored[orders_c])
    np.testing.assert_array_equal(signs[:, stored], signs_c)


@pytest.mark.parametrize(
    ("design", "kwargs", "expected"),
    [
        (_two_groups(4, 3), {}, math.comb(7, 4)),
        (np.ones((6, 1)), {"permute": False, "flip": True}, 2**6),
        (np.c_[np.arange(5.0)], {}, math.factorial(5)),
        (np.c_[np.tile([-1.0, 1.0], 4)], {"blocks": np.repeat([1, 2, 3, 4], 2)}, 2**4),
        (np.ones((6, 1)), {"permute": False, "flip": True, "blocks": np.repeat([1, 2, 3], 2), "whole_blocks": True},
         2**3),
    ],
)
def test_exhaustive_enumerates_every_distinct_rearrangement_once(design, kwargs, expected):
    assert count_rearrangements(design, **kwargs) == expected
    scheme = make_scheme(design, n_perm=10_000, **kwargs)
    assert scheme.exhaustive and scheme.n_perm == expected
    orders, signs = scheme.chunk(0, scheme.n_perm)
    np.testing.assert_array_equal(orders[0], np.arange(design.shape[0]))
    assert (signs[0] == 1).all()
    rearranged = {tuple((s[:, None] * design[o]).ravel()) for o, s in zip(orders, signs)}
    assert len(rearranged) == expected


def test_n_zero_means_exhaustive_and_refuses_huge_sets():
    scheme = make_scheme(_two_groups(5, 5), n_perm=0)
    assert scheme.exhaustive and scheme.n_perm == math.comb(10, 5)
    with pytest.raises(OptionError, match=r"^n_perm 0 asks for all .* give a number of permutations, e\.g\. n_perm 5000$"):
        make_scheme(np.c_[np.arange(12.0)], n_perm=0)
    assert math.factorial(12) > MAX_EXHAUSTIVE


@pytest.mark.parametrize("n_perm", [-1, 2.5])
def test_bad_n_perm(n_perm):
    with pytest.raises(OptionError, match="^n_perm must be a positive number"):
        make_scheme(np.c_[np.arange(10.0)], n_perm=n_perm)


def test_block_errors_name_the_problem():
    design = np.c_[np.arange(6.0)]
    with pytest.raises(InputError, match="has 4 rows but the design has 6"):
        make_scheme(design, blocks=np.arange(4), blocks_source="design.grp")
    with pytest.raises(InputError, match="needs blocks of equal size"):
        make_scheme(design, blocks=np.array([1, 1, 1, 2, 2, 3]), whole_blocks=True)
    with pytest.raises(InputError, match="^permute_blocks needs exchangeability blocks \\(groups_path design.grp\\)$"):
        make_scheme(design, whole_blocks=True)
