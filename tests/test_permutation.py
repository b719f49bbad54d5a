"""The shard reader's epoch order: a bijection of [0, n) evaluated point-wise, different per seed and
epoch, and as evenly spread as a shuffle."""
import random

import numpy as np
import pytest

from ernie_tiny_ds.data.permutation import Permutation


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 1000, 4097, "random"])
def test_every_position_maps_to_a_distinct_sequence(n):
    n = random.randint(2, 300_000) if n == "random" else n  # a fresh size each run
    values = Permutation(n, [random.randrange(2**32), 0])(np.arange(n))
    assert values.dtype == np.int64
    assert np.array_equal(np.sort(values), np.arange(n)), f"n={n}"


def test_any_slice_of_positions_gives_the_same_values_as_the_whole():
    n = random.randint(1000, 50_000)
    perm = Permutation(n, [7, 3])
    whole = perm(np.arange(n))
    start = random.randrange(n - 100)
    assert np.array_equal(perm(np.arange(start, start + 100)), whole[start:start + 100])
    picks = np.array(random.sample(range(n), 50))
    assert np.array_equal(perm(picks), whole[picks])
    assert np.array_equal(Permutation(n, [7, 3])(np.arange(n)), whole)  # a pure function of (n, seed)


def test_seed_and_epoch_each_change_the_order():
    n = 5000
    base = Permutation(n, [1, 0])(np.arange(n))
    for other in ([1, 1], [2, 0]):
        values = Permutation(n, other)(np.arange(n))
        assert (values == base).mean() < 0.01


def test_the_order_looks_like_a_shuffle():
    n = 2**16 + 3  # just past a power of four: the domain is nearly 4n, the most cycle walking
    values = Permutation(n, [11, 0])(np.arange(n)).astype(np.float64)
    positions = np.arange(n, dtype=np.float64)
    assert abs(np.corrcoef(positions, values)[0, 1]) < 0.02
    assert (values == positions).sum() < 10  # a shuffle has ~1 fixed point
    # neighbours land far apart: a uniform shuffle's mean gap is n/3
    assert np.abs(np.diff(values)).mean() == pytest.approx(n / 3, rel=0.02)
    # where position 0 goes, over many seeds, is uniform over 10 buckets (expected 400 each, sd ~19)
    first = [Permutation(10, [seed, 0])(np.array([0]))[0] for seed in range(4000)]
    assert all(300 < c < 500 for c in np.bincount(first, minlength=10))


def test_positions_outside_the_range_are_refused():
    perm = Permutation(10, [0, 0])
    with pytest.raises(IndexError):
        perm(np.array([10]))
    with pytest.raises(ValueError):
        Permutation(0, [0, 0])
