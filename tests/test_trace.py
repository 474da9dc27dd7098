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
    seen = [{"rank": 0, "index": 0, "examples": [5, 1], "replay": [["b", 3]], "tokens": 9},
            {"rank": 0, "index": 1, "examples": [4], "replay": [["a", 2], ["a", 0]], "tokens": 4}]
    log.step(accelerator, 7, "sha", seen)
    assert trace.read(log.path) == [{
        "step": 7, "file": "sha", "examples": [1, 4, 5],
        "micro_batches": [{"rank": 0, "index": 0, "examples": [5, 1], "tokens": 9},
                          {"rank": 0, "index": 1, "examples": [4], "tokens": 4}],
        "replay": [["a", 0], ["a", 2], ["b", 3]]}]
    log.step(accelerator, 8, "sha", [dict(seen[1], replay=[])])  # no replay: no "replay" key
    assert "replay" not in trace.read(log.path)[-1]
    accelerator.is_main_process = False  # only the main process writes
    log.step(accelerator, 9, "sha", seen)
    assert len(trace.read(log.path)) == 2
