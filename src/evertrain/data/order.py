"""The order rows are trained in, and which examples are held out: pure functions of content and seed.

    python -c "from evertrain.data.order import row_order; print(row_order('ab' * 32, 42, 0, 10))"
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=8)  # asked every optimizer step; a pure function, so computed once per epoch
def row_order(sha256: str, seed: int, epoch: int, n: int) -> np.ndarray:
    """The order rows are trained in during one epoch: depends only on (file content, seed, epoch)."""
    key = int(sha256[:16], 16) ^ (seed * 0x9E3779B97F4A7C15 & (2**64 - 1))
    order = np.random.default_rng([key, epoch]).permutation(n)
    order.flags.writeable = False  # shared by every caller through the cache
    return order


def held_out_lines(sha256: str, seed: int, n: int, fraction: float, cap: int, min_file: int = 0) -> set[int]:
    """Which example indices of a file are held out: a fixed slice chosen by content and seed.

    A file too small for `fraction` to give one example, but of at least `min_file` examples, holds out one:
    its forgetting can be measured while most of it trains. Files the fraction gives a slice are unchanged."""
    count = min(cap, int(n * fraction))
    if count <= 0 < fraction and cap > 0 and min_file and n >= min_file:
        count = 1
    if count <= 0 or n < 2:
        return set()
    count = min(count, n - 1)  # always leave something to train
    order = np.random.default_rng([int(sha256[16:32], 16), seed, 7]).permutation(n)
    return set(order[:count].tolist())
