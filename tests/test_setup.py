"""train/setup.py: the global batch of a run kept at another number of processes, or refused with the batch sizes
that would keep it (the `loop` pass of `make mutate`).

    pytest -q tests/test_setup.py
"""

from __future__ import annotations

import types

import pytest

from evertrain.train.session import RunMismatch
from evertrain.train.setup import keep_global_batch


def test_the_global_batch_is_kept_at_another_number_of_processes_or_refused_with_what_would_keep_it(tmp_path):
    config = lambda b: types.SimpleNamespace(batch_size=b)  # noqa: E731
    assert keep_global_batch(config(2), 2, 8, tmp_path) == 2
    assert keep_global_batch(config(4), 2, 8, tmp_path) == 1
    assert keep_global_batch(config(1), 1, 8, tmp_path) == 8
    with pytest.raises(RunMismatch) as refused:
        keep_global_batch(config(3), 2, 8, tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} holds a run with a global batch of 8 rows per optimizer step; 2 process(es) x batch_size 3 = 6 "
        "rows per micro-batch round does not divide it, so no gradient accumulation keeps it. With 2 process(es) "
        "use a batch_size of 1, 2, 4, or another number of processes.")
    with pytest.raises(RunMismatch) as refused:
        keep_global_batch(config(1), 3, 8, tmp_path)
    assert str(refused.value).endswith("8 rows cannot be split over 3 processes; use a number of processes that "
                                       "divides 8.")
    with pytest.raises(RunMismatch) as refused:  # each choice times the processes divides the global batch
        keep_global_batch(config(4), 2, 6, tmp_path)
    assert "use a batch_size of 1, 3, or another" in str(refused.value)
    with pytest.raises(RunMismatch) as refused:  # only the last four choices are named
        keep_global_batch(config(7), 1, 48, tmp_path)
    assert "use a batch_size of 12, 16, 24, 48," in str(refused.value)
