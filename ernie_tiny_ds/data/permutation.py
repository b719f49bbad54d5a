"""A seeded pseudo-random permutation of 0..n-1, evaluated at any positions in O(1) memory.

The shard reader wants a new order of all n sequences every epoch. Materialising it costs 8 bytes
per sequence on every rank (625 MB per rank for 10B tokens at 128 per sequence) and seconds of
start-up per epoch; evaluating it at the positions a batch needs costs neither.

The map is a balanced Feistel network over the smallest power of four that holds n (a bijection of
that domain for any round function), keyed per round from the seed; "cycle walking" maps a value
that lands at or past n again until it falls below n, which turns it into a bijection of [0, n).
The domain is less than 4n, so a position needs fewer than four passes on average.
"""
from __future__ import annotations

import numpy as np

ROUNDS = 6  # a 4-round Feistel network with a pseudo-random round function is already a PRP


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half of the output bits (wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """`perm(positions)` -> the sequence numbers at those positions of this (n, seed) order."""

    def __init__(self, n: int, seed: list[int] | int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self._half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 4**half_bits >= n
        self._half_mask = np.uint64((1 << self._half_bits) - 1)
        self._keys = np.random.default_rng(seed).integers(0, 2**63, size=ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self._half_bits)
        left, right = x >> shift, x & self._half_mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._half_mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        x = self._feistel(positions.astype(np.uint64))
        outside = np.flatnonzero(x >= self.n)
        while outside.size:  # cycle walking: stays on the cycle of the start, so inside values stay distinct
            x[outside] = self._feistel(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)
