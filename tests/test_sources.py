"""dashboard/sources.py, the dashboard's reader of a run's files, on files written here: metrics that a resumed run
appends to and a writer leaves torn, long histories thinned, the forgetting matrix, a ledger read while the daemon
writes. The dashboard serving a real run: tests/test_dashboard.py.

    pytest -q tests/test_sources.py
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from conftest import write_jsonl

from evertrain.dashboard import sources


def step(n, loss=1.0, file="a" * 64, name="a.jsonl"):
    return {"step": n, "file": file, "file_name": name, "file_step": n, "file_total_steps": 99, "loss": loss,
            "lr": 1e-3, "time": 0}


def test_metrics_follow_appends_resumes_and_torn_lines(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    write_jsonl(path, [step(1), step(2), step(3)])
    run = sources.open_view(tmp_path)
    first = sources.metrics(run)
    assert first["columns"]["step"] == [1, 2, 3]
    # The run resumed from the checkpoint of step 1 and trained steps 2.. again: the new lines count.
    with open(path, "a") as f:
        f.write(json.dumps(step(2, loss=0.5)) + "\nnot json\n" + '{"step": 3, "lo')  # a line still being written
    m = sources.metrics(run)
    assert m["columns"]["step"] == [1, 2] and m["columns"]["loss"] == [1.0, 0.5]
    assert m["history"] != first["history"]  # tells the page to drop the points it holds
    with open(path, "a") as f:
        f.write('ss": 0.25, "file": "b", "file_name": "b.jsonl"}\n')
    m = sources.metrics(run)
    assert m["columns"]["step"] == [1, 2, 3] and m["columns"]["loss"] == [1.0, 0.5, 0.25]
    assert [(s["file_name"], s["first_step"], s["last_step"]) for s in m["files"]] == [
        ("a.jsonl", 1, 2), ("b.jsonl", 3, 3)]


def test_long_history_is_thinned_but_keeps_the_last_step(tmp_path):
    write_jsonl(tmp_path / "logs" / "metrics.jsonl", [step(n) for n in range(1, 10_001)])
    m = sources.metrics(sources.open_view(tmp_path), max_points=1000)
    steps = m["columns"]["step"]
    assert len(steps) <= 1001 and steps[0] == 1 and steps[-1] == 10_000 and m["stride"] == 10
    assert m["last_step"] == 10_000 and sources.metrics(sources.open_view(tmp_path), since=9_990)["stride"] == 1


def test_forgetting_matrix_rows_columns_and_before(tmp_path):
    a, b = "a" * 64, "b" * 64
    write_jsonl(tmp_path / "logs" / "evals.jsonl", [
        {"step": 0, "after_file": None, "before_file": a, "file": a, "file_name": "a.jsonl", "loss": 5.0},
        {"step": 4, "after_file": a, "after_file_name": "a.jsonl", "file": a, "file_name": "a.jsonl", "loss": 2.0},
        {"step": 4, "after_file": None, "before_file": b, "file": b, "file_name": "b.jsonl", "loss": 4.5},
        {"step": 9, "after_file": b, "after_file_name": "b.jsonl", "file": a, "file_name": "a.jsonl", "loss": 2.5},
        {"step": 9, "after_file": b, "after_file_name": "b.jsonl", "file": b, "file_name": "b.jsonl", "loss": 1.5},
        "{torn",
    ])
    fm = sources.forgetting(sources.open_view(tmp_path))
    assert [f["file_name"] for f in fm["files"]] == ["a.jsonl", "b.jsonl"]
    assert fm["before"] == [5.0, 4.5]
    assert [(r["after_file_name"], r["step"], r["cells"]) for r in fm["rows"]] == [
        ("a.jsonl", 4, [2.0, None]), ("b.jsonl", 9, [2.5, 1.5])]


def test_ledger_is_read_while_the_daemon_holds_a_write_transaction(tmp_path):
    (tmp_path / "evertrain.toml").write_text("")
    db = sqlite3.connect(tmp_path / "ledger.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    # An older ledger: fewer columns than the dashboard shows; the missing ones come back as None.
    db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, original_name TEXT, sha256 TEXT, state TEXT, "
               "steps_trained INTEGER, expected_steps INTEGER)")
    db.execute("INSERT INTO files VALUES (1, 'one.jsonl', 'x', 'done', 3, 3)")
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO files VALUES (2, 'two.jsonl', 'y', 'training', 1, 5)")
    t0 = time.monotonic()
    rows = sources.files(sources.open_view(tmp_path))
    assert time.monotonic() - t0 < 1.5  # not waiting for the writer
    assert [(r["original_name"], r["state"], r["priority"]) for r in rows] == [("one.jsonl", "done", None)]
    db.execute("COMMIT")
    assert [r["state"] for r in sources.files(sources.open_view(tmp_path))] == ["done", "training"]
    with pytest.raises(sqlite3.OperationalError):  # read-only: the dashboard cannot change the ledger
        ro = sqlite3.connect(f"{(tmp_path / 'ledger.sqlite').as_uri()}?mode=ro", uri=True)
        ro.execute("DELETE FROM files")
    db.close()
