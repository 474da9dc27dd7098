"""The pure functions under exactly-once: which examples are held out, and how examples are packed into rows.

Written to kill the mutants `make mutate` found alive (see TESTING.md).
"""

from __future__ import annotations

import bisect
import random

import numpy as np
import pytest
import torch

from evertrain.data import Example
from evertrain.data.order import held_out_lines, row_order
from evertrain.data.packing import IGNORE, Rows, collate, pack

SHA_A, SHA_B = "a" * 64, "0123456789abcdef" * 4


@pytest.mark.parametrize("n,fraction,cap,expected", [
    (2, 0.5, 64, 1),     # the smallest file that can lend one example
    (3, 0.34, 64, 1),
    (1, 0.5, 64, 0),     # a single example always trains
    (10, 0.1, 64, 1),    # one example exactly
    (10, 0.09, 64, 0),   # less than one: none
    (10, 0.99, 64, 9),   # never all of them: one is left to train
    (10, 1.0, 64, 9),
    (100, 0.5, 7, 7),    # the cap
])
def test_held_out_counts(n, fraction, cap, expected):
    held = held_out_lines(SHA_A, 42, n, fraction, cap)
    assert len(held) == expected and held <= set(range(n))


def test_held_out_choice_depends_on_content_and_seed_only():
    a = held_out_lines(SHA_A, 42, 1000, 0.05, 64)
    assert a == held_out_lines(SHA_A, 42, 1000, 0.05, 64)
    assert a != held_out_lines(SHA_B, 42, 1000, 0.05, 64)  # another file holds out other examples
    assert a != held_out_lines(SHA_A, 43, 1000, 0.05, 64)


def test_the_choices_never_change_between_versions():
    """A run resumed by a newer evertrain must hold out and order exactly what the older one did."""
    assert sorted(held_out_lines(SHA_B, 42, 20, 0.25, 64)) == [0, 2, 14, 18, 19]
    assert sorted(held_out_lines(SHA_A, 42, 20, 0.25, 64)) == [6, 10, 14, 15, 17]
    assert row_order(SHA_B, 42, 0, 10).tolist() == [1, 9, 3, 7, 4, 5, 2, 0, 6, 8]


def test_tiny_files_get_one_held_out_example_and_larger_ones_keep_their_slice():
    assert sorted(held_out_lines(SHA_A, 42, 20, 0.02, 64, min_file=10)) == [17]  # golden, like the others
    assert sorted(held_out_lines(SHA_B, 42, 12, 0.02, 64, min_file=10)) == [11]
    assert held_out_lines(SHA_A, 42, 9, 0.02, 64, min_file=10) == set()      # below min_file: none, as before
    assert held_out_lines(SHA_A, 42, 20, 0.0, 64, min_file=10) == set()      # a fraction of 0 is a choice
    assert held_out_lines(SHA_A, 42, 20, 0.02, 0, min_file=10) == set()      # and so is a cap of 0
    assert len(held_out_lines(SHA_A, 42, 20, 0.02, 1, min_file=10)) == 1     # a cap of 1 allows the one
    assert len(held_out_lines(SHA_A, 42, 10, 0.02, 64, min_file=10)) == 1    # a file of exactly min_file too
    for n in (50, 51, 99, 100, 333, 1000, 5000):  # wherever the fraction gives a slice, nothing changes
        assert held_out_lines(SHA_A, 42, n, 0.02, 64, min_file=10) == held_out_lines(SHA_A, 42, n, 0.02, 64)


def test_row_order_is_a_permutation_fixed_by_content_seed_and_epoch():
    order = row_order(SHA_A, 42, 0, 50)
    assert sorted(order.tolist()) == list(range(50))
    assert order.tolist() == row_order(SHA_A, 42, 0, 50).tolist()
    assert order.tolist() != row_order(SHA_A, 42, 1, 50).tolist()
    assert order.tolist() != row_order(SHA_B, 42, 0, 50).tolist()


def reference_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm on plain lists: longest first, into the open row with the least room that fits it
    (the lowest-numbered on a tie), else a new row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []  # free: sorted (room left, row)
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], r))
    return [sorted(r) for r in rows]


@pytest.mark.parametrize("seed", range(6))
def test_packing_is_best_fit_decreasing(seed):
    rng = random.Random(seed)
    capacity = rng.choice([8, 32, 64])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    lengths += [1, 1, capacity - 1]  # a row left with room for exactly one token must take a 1-token example
    rows = pack(lengths, capacity)
    assert list(rows) == reference_best_fit_decreasing(lengths, capacity)
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)


def test_rows_index_like_a_list():
    rows = Rows(np.array([3, 0, 1, 2], dtype=np.int64), np.array([0, 1, 4], dtype=np.int64))
    assert len(rows) == 2 and rows[0] == [3] and rows[1] == [0, 1, 2]
    assert rows[-1] == rows[1] and rows[-2] == rows[0]
    with pytest.raises(IndexError, match="2"):
        rows[2]
    with pytest.raises(IndexError, match="-3"):
        rows[-3]
    assert list(Rows.one_per_example(3)) == [[0], [1], [2]]


# ---------------------------------------------------------------- collate: rows of examples -> the model's tensors

def _ex(ids: list[int], trained_from: int) -> Example:
    return Example(line=0, format="", input_ids=ids, labels=[IGNORE] * trained_from + ids[trained_from:])


def test_collate_puts_each_row_end_to_end_and_pads_to_the_longest():
    a, b, c = _ex([5, 6, 7], 1), _ex([8, 9], 0), _ex([4], 0)
    batch = collate([[a, b], [c]], pad_id=0, device="cpu")
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(("input_ids", "labels", "position_ids"),
                                                                  torch.long)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, 8, 9], [4, IGNORE, IGNORE, IGNORE, IGNORE]]
    # Positions restart at every example (transformers' block-diagonal mask) and count on through the padding.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: it would undo the blocks


def test_collate_puts_the_tensors_on_the_device_asked():
    # "meta" stands for any device but CUDA's (mps, xpu): the tensors must be made there, as int64.
    batch = collate([[_ex([5, 6], 0)]], pad_id=0, device="meta")
    assert all(v.device.type == "meta" and v.dtype == torch.long and v.shape == (1, 2) for v in batch.values())


def test_collate_of_nothing_is_one_padding_token():
    for rows in ([], [[]], [[], []]):
        batch = collate(rows, pad_id=3, device="cpu")
        n = max(1, len(rows))
        assert batch["input_ids"].tolist() == [[3]] * n and batch["labels"].tolist() == [[IGNORE]] * n
        assert batch["position_ids"].tolist() == [[0]] * n
