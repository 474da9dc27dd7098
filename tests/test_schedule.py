"""train/schedule.py: the learning-rate multiplier of each schedule (the run across files: tests/test_train.py).

    pytest -q tests/test_schedule.py
"""

from __future__ import annotations

import math

import pytest

from evertrain.train.schedule import lr_factor


def test_learning_rate_schedules_have_their_documented_shape():
    """The multiplier for the step after `step` completed ones: linear warmup, then each schedule's shape."""
    assert [lr_factor("constant", s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("constant", 0, 0) == 1.0
    assert [lr_factor("inverse_sqrt", s, 4) for s in (0, 3, 4, 15, 63)] == [0.25, 1.0, math.sqrt(4 / 5), 0.5, 0.25]
    assert [lr_factor("inverse_sqrt", s, 0) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert lr_factor("wsd", 10 ** 6, 2) == 1.0  # no decay asked for: stable for ever
    assert [lr_factor("wsd", s, 2, 10, 4) for s in (1, 2, 9, 10, 11, 12, 13, 20)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25,
                                                                                      0.0, 0.0]
    assert lr_factor("wsd", 5, 8, 4, 4) == 6 / 8  # a decay asked for during warmup waits for its end
    assert [lr_factor("wsd", s, 0, 3, 0) for s in (2, 3, 4)] == [1.0, 0.0, 0.0]  # no decay steps: straight to 0
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        lr_factor("cosine", 5, 2)
