"""observe/anchor.py: the anchor set measured against the model that answered it drifts by nothing. The anchor in
a run (built once, deterministic, tripping the gate alone): tests/test_forgetting.py.

    pytest -q tests/test_anchor.py
"""

from __future__ import annotations

import pytest
from conftest import OLD, write_jsonl

from evertrain.runs import Run


def test_anchor_kl_is_zero_for_the_base_model_itself(tmp_path, tiny_model):
    from evertrain.config import TrainConfig
    from evertrain.data import load_file
    from evertrain.train.setup import setup

    cfg = TrainConfig(model=str(tiny_model), held_out_fraction=0.0, report_to="none", snapshot_budget=0.0)
    session = setup(cfg, Run.at(tmp_path / "run"), cpu=True)
    data = load_file(write_jsonl(tmp_path / "old.jsonl", OLD), session.tokenizer, cfg)
    observer = session.observers.anchor
    assert observer.build(session.model, data, 0, list)  # no probes: the file's prompts alone
    drift = observer.measure(session.model)
    assert drift["tokens"] > 0 and drift["kl"] == pytest.approx(0.0, abs=1e-5)
    # The loss of the model's own greedy answers: each answer token was its most likely one.
    assert 0 < drift["loss"] < 10
