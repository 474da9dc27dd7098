"""observe/trace.py: a step's trace line is built from the evidence of its micro-batches (the `loop` pass of
`make mutate`). That evidence as training writes it, and a loop that drops or repeats a micro-batch:
tests/test_evidence.py.

    pytest -q tests/test_trace.py
"""

from __future__ import annotations

import types

from evertrain.observe import trace


def test_a_steps_trace_line_is_built_from_its_micro_batches_evidence(tmp_path):
    accelerator = types.SimpleNamespace(num_processes=1, is_main_process=True)
    log = trace.Trace(tmp_path / "trace.jsonl")
    # ids in the file's order: by record, a window after its record's earlier windows ("12/0" before "12/1")
    seen = [{"rank": 0, "index": 0, "examples": [5, "12/1", 1], "replay": [["b", 3]], "tokens": 9},
            {"rank": 0, "index": 1, "examples": ["12/0", 4], "replay": [["a", "10/1"], ["a", 9], ["a", 0]],
             "tokens": 4}]
    log.step(accelerator, 7, "sha", seen)
    assert trace.read(log.path) == [{
        "step": 7, "file": "sha", "examples": [1, 4, 5, "12/0", "12/1"],
        "micro_batches": [{"rank": 0, "index": 0, "examples": [5, "12/1", 1], "tokens": 9},
                          {"rank": 0, "index": 1, "examples": ["12/0", 4], "tokens": 4}],
        "replay": [["a", 0], ["a", 9], ["a", "10/1"], ["b", 3]]}]  # by file, then in that file's order
    log.step(accelerator, 8, "sha", [dict(seen[1], replay=[])])  # no replay: no "replay" key
    assert "replay" not in trace.read(log.path)[-1]
    accelerator.is_main_process = False  # only the main process writes
    log.step(accelerator, 9, "sha", seen)
    assert len(trace.read(log.path)) == 2


def test_under_a_launch_the_line_holds_every_processs_micro_batches(tmp_path, monkeypatch):
    """Each process passes its own evidence; the main one writes the line from everyone's (accelerate's
    gather_object, which needs a real launch: tests/test_distributed.py; here it stands in for one)."""
    import accelerate.utils

    theirs = {"rank": 1, "index": 0, "examples": [2], "replay": [], "tokens": 3}
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [*mine, theirs])
    log = trace.Trace(tmp_path / "trace.jsonl")
    mine = [{"rank": 0, "index": 0, "examples": [7], "replay": [], "tokens": 5}]
    log.step(types.SimpleNamespace(num_processes=2, is_main_process=True), 3, "sha", mine)
    assert trace.read(log.path)[-1]["examples"] == [2, 7]
    assert [mb["rank"] for mb in trace.read(log.path)[-1]["micro_batches"]] == [0, 1]
