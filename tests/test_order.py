"""data/order.py, under exactly-once: which examples are held out, and the order of a file's rows in each epoch.
Golden values, so that a resumed run holds out and orders exactly what the older version did; written to kill the
mutants `make mutate` found alive (see TESTING.md).

    pytest -q tests/test_order.py
"""

from __future__ import annotations

import pytest

from evertrain.data.order import held_out_lines, row_order

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
