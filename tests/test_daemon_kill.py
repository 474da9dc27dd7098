"""kill -9 of `evertrain run DIR` at random moments, then a restart: every file done exactly once."""

from __future__ import annotations

import random
import signal
import subprocess
import time

from conftest import evertrain, trained_steps
from daemon_helpers import drop, ledger_rows, make_ws, rows

from evertrain.observe import trace
from evertrain.train import checkpoint


def test_kill_9_at_random_moments_then_restart(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "2", "--save-steps", "3")
    sizes = {"f1.jsonl": 23, "f2.jsonl": 17, "f3.jsonl": 30, "f4.jsonl": 9}   # 12, 9, 15 and 5 steps
    for name, n in sizes.items():
        drop(ws, name, rows(n, name))
    rng = random.Random(20241123)
    kills = []
    for round_ in range(4):
        proc = evertrain("run", ws, wait=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = trained_steps(ws / "current_model")
        if round_ == 0:
            time.sleep(rng.uniform(0.5, 3.0))  # during start-up: imports, loading, reconciling
        else:
            target = start + rng.randint(1, 12)
            end = time.monotonic() + 120
            while trained_steps(ws / "current_model") < target and proc.poll() is None:
                assert time.monotonic() < end, "the daemon never reached the step to kill it at"
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))  # anywhere inside a step or a checkpoint write
        assert proc.poll() is None, "the daemon exited by itself"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(trained_steps(ws / "current_model"))
        if round_ == 1:
            drop(ws, "f5.jsonl", rows(11, "f5.jsonl"))   # arrives between two lives of the daemon
    sizes["f5.jsonl"] = 11

    done = evertrain("run", ws, "--once")
    assert done.returncode == 0, done.stdout + done.stderr

    files = ledger_rows(ws)
    assert sorted(r["original_name"] for r in files) == sorted(sizes)
    assert all(r["state"] == "done" and r["steps_trained"] == r["expected_steps"] for r in files), files
    # the global steps of the files tile 1..N with no gap and no overlap
    spans = sorted((r["first_step"], r["last_step"]) for r in files)
    assert spans[0][0] == 1 and all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))
    last = spans[-1][1]
    assert sum(r["expected_steps"] for r in files) == last

    newest = checkpoint.newest_complete(ws / "current_model")
    assert newest.step == last
    recorded = newest.state["evertrain"]["files"]
    assert [(f["sha256"], f["steps"], f["first_step"], f["last_step"]) for f in recorded] == \
        [(r["sha256"], r["steps_trained"], r["first_step"], r["last_step"])
         for r in sorted(files, key=lambda r: r["first_step"])]

    tr = ws / "current_model" / "trace.jsonl"
    assert [r["step"] for r in trace.read(tr)] == list(range(1, last + 1))
    coverage = trace.coverage(tr)
    for r in files:
        counts = coverage[r["sha256"]]
        assert sorted(counts) == list(range(sizes[r["original_name"]])) and set(counts.values()) == {1}
    assert sorted(p.name for p in (ws / "done").iterdir()) == sorted(r["name"] for r in files)
    assert not list((ws / "queue").iterdir()) and not list((ws / "inbox").iterdir())
