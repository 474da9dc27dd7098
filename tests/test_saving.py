"""train/saving.py: which runs write their checkpoints in a thread while training goes on (overlap_checkpoints).
Such writes in a run: tests/test_checkpoint_overlap.py.

    pytest -q tests/test_saving.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evertrain.config import TrainConfig
from evertrain.train import saving


@pytest.mark.parametrize("mode, processes, device, overlapped", [
    ("auto", 1, "cuda", True), ("auto", 1, "cpu", False), ("on", 1, "cpu", True), ("on", 2, "cuda", False),
    ("off", 1, "cuda", False)])
def test_which_runs_overlap_their_checkpoints(mode, processes, device, overlapped):
    session = SimpleNamespace(config=TrainConfig(overlap_checkpoints=mode), sharded=False, accelerator=SimpleNamespace(
        num_processes=processes, device=SimpleNamespace(type=device)))
    assert saving.overlaps(session) is overlapped
