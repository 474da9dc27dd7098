"""The daemon through its real CLI, in-process: intake, queue, ledger, guards, controls, pre-emption, pins."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

from conftest import break_weights_at, cli
from daemon_helpers import (ThreadDaemon, assert_exactly_once, by_name, coverage_by_sha, drop, ledger_rows, make_ws,
                            rows, slow_steps, status, wait_for)

from evertrain.observe import trace
from evertrain.train import checkpoint
from evertrain.files import sha256_file


def test_files_dropped_while_running_train_once_in_order(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model)
    daemon = ThreadDaemon(ws)
    try:
        # a second daemon on the same workspace refuses to start
        assert cli("run", ws, "--once") == 2
        assert "another evertrain daemon" in capsys.readouterr().err

        sizes = {"a.jsonl": 10, "b.jsonl": 7, "c.jsonl": 13}   # batch 4: 3, 2 and 4 steps
        for name, n in sizes.items():
            drop(ws, name, rows(n, name))
        wait_for(lambda: sum(r["state"] == "done" for r in ledger_rows(ws)) == 3, what="three files done")
        # the same name again (other content) and the same content again (other name)
        drop(ws, "a.jsonl", rows(5, "second a"))
        drop(ws, "b-again.jsonl", rows(7, "b.jsonl"))
        wait_for(lambda: len(ledger_rows(ws)) == 5 and all(r["state"] in ("done", "duplicate")
                                                             for r in ledger_rows(ws)), what="all five settled")
        st = wait_for(lambda: status(ws)["files_duplicate"] == 1 and status(ws), what="the status to catch up")
        assert daemon.stop() == 0
    finally:
        daemon.stop()

    files = ledger_rows(ws)
    assert [(r["original_name"], r["state"]) for r in files] == [
        ("a.jsonl", "done"), ("b.jsonl", "done"), ("c.jsonl", "done"), ("a.jsonl", "done"),
        ("b-again.jsonl", "duplicate")]
    done = [r for r in files if r["state"] == "done"]
    assert [r["expected_steps"] for r in done] == [3, 2, 4, 2]
    assert all(r["steps_trained"] == r["expected_steps"] for r in done)
    # in arrival order, back to back, the global steps summing up
    spans = [(r["first_step"], r["last_step"]) for r in done]
    assert spans == [(1, 3), (4, 5), (6, 9), (10, 11)]
    for r, n in zip(done, [10, 7, 13, 5]):
        assert_exactly_once(ws, r, n)
    assert files[4]["duplicate_of"] == files[1]["id"] and "not trained again" in files[4]["error"]
    # nothing overwritten: every file is in done/ under its own name
    assert sorted(p.name for p in (ws / "done").iterdir()) == sorted(r["name"] for r in files)
    assert not list((ws / "queue").iterdir()) and not [p for p in (ws / "inbox").iterdir()]
    newest = checkpoint.newest_complete(ws / "current_model")
    assert newest.step == 11
    # the newest checkpoint holds the ledger as it was when sealed: the second a.jsonl still in training
    copy = sqlite3.connect(f"{(newest.path / 'ledger.sqlite').as_uri()}?mode=ro", uri=True)
    assert copy.execute("SELECT id, state FROM files WHERE id <= 4").fetchall() == [
        (1, "done"), (2, "done"), (3, "done"), (4, "training")]
    copy.close()
    for key in ("state", "global_step", "current_file", "file_step", "file_total_steps", "loss", "learning_rate",
                "tokens_per_second", "eta_file_seconds", "eta_queue_seconds", "queue_length", "files_done",
                "files_failed", "total_evals", "last_checkpoint", "updated_at"):
        assert key in st, key
    assert st["files_done"] == 4 and st["files_duplicate"] == 1 and st["global_step"] == 11
    assert status(ws)["state"] == "stopped"

    capsys.readouterr()
    assert cli("status", ws, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["state"] for f in out["files"]] == ["done", "done", "done", "done", "duplicate"]
    assert cli("status", ws) == 0
    table = capsys.readouterr().out
    assert "b-again.jsonl" in table and "duplicate" in table and "not running" in table
    assert (ws / "logs" / "evertrain.log").read_text().count("evertrain: done") == 4


def test_a_file_written_slowly_in_place_is_taken_only_when_complete(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--stable-seconds", "0.6", "--held-out-fraction", "0.25")
    path = ws / "inbox" / "slow.jsonl"
    lines = [json.dumps(r) + "\n" for r in rows(12, "slow")]
    started = threading.Event()

    def writer():
        with open(path, "w") as f:
            for i, line in enumerate(lines):
                f.write(line)
                f.flush()
                os.utime(path)  # mtime moves on every write, as a real slow copy's does
                if i == 0:
                    started.set()
                time.sleep(0.15)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(10)
    assert cli("run", ws, "--once") == 0
    t.join()
    (row,) = ledger_rows(ws)
    assert row["state"] == "done" and row["size"] == sum(len(x) for x in lines)
    assert row["examples"] == 9  # all 12 lines were read: 3 held out for evaluation, 9 trained
    held_out = {rec["file"]: rec["held_out"] for rec in trace.read(ws / "current_model" / "trace.jsonl")
                if "held_out" in rec}[row["sha256"]]
    counts = coverage_by_sha(ws)[row["sha256"]]
    assert len(held_out) == 3 and sorted(set(counts) | set(held_out)) == list(range(12))
    assert json.loads(row["held_out"]) == sorted(held_out)  # the ledger records the held-out lines too
    assert set(counts.values()) == {1} and not set(counts) & set(held_out)
    import sqlite3

    evals = sqlite3.connect(ws / "ledger.sqlite").execute("SELECT kind, file_id, examples, loss FROM evals").fetchall()
    assert [e[:3] for e in evals] == [("before", row["id"], 3), ("after", row["id"], 3)]
    assert all(0 < e[3] < 100 for e in evals)
    assert status(ws)["total_evals"] == 2


def test_every_bad_input_lands_in_failed_with_its_reason(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model)
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"text": "never trained"}) + "\n")
    drop(ws, "01-badjson.jsonl", '{"text": "ok"}\n{"text": "broken\n')
    drop(ws, "02-keys.jsonl", '{"text": "ok"}\n{"question": "q", "answer": "a"}\n')
    drop(ws, "03-empty.jsonl", "\n\n")
    (ws / "inbox" / "04-latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    drop(ws, "05-noassistant.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (ws / "inbox" / "06-link.jsonl").symlink_to(outside)
    os.mkfifo(ws / "inbox" / "07-fifo.jsonl")
    drop(ws, "nested/deeper/08-good.jsonl", rows(6, "nested"))
    drop(ws, "09 odd \u00e9 name\n.jsonl", rows(5, "odd"))
    (ws / "inbox" / os.fsdecode(b"10-bytes-\xff.jsonl")).write_text(json.dumps({"text": "bytes name"}) + "\n")
    (ws / "inbox" / ".hidden.jsonl").write_text("{}\n")
    (ws / "inbox" / "11-upload.jsonl.part").write_text("{}\n")
    (ws / "inbox" / "12-upload.tmp").write_text("{}\n")
    (ws / "inbox" / "13-notes.docx").write_text("not data\n")

    assert cli("run", ws, "--once") == 5  # files failed
    rows_ = {r["original_name"]: r for r in ledger_rows(ws)}
    reasons = {
        "01-badjson.jsonl": "line 2: invalid JSON",
        "02-keys.jsonl": "line 2: fits no format (keys: ['answer', 'question'])",
        "03-empty.jsonl": "no examples",
        "04-latin1.jsonl": "line 1: not UTF-8",
        "05-noassistant.jsonl": "line 1: no assistant turn",
        "06-link.jsonl": "symbolic link",
        "07-fifo.jsonl": "not a regular file",
        "13-notes.docx": "not a dataset file; evertrain takes .jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet",
    }
    for name, why in reasons.items():
        r = rows_[name]
        assert r["state"] == "failed" and why in r["error"], (name, r["error"])
        assert why in (ws / "failed" / (r["name"] + ".error.txt")).read_text()
        assert os.path.lexists(ws / "failed" / r["name"])
    assert rows_["01-badjson.jsonl"]["error"].startswith("01-badjson.jsonl")  # names the file as dropped
    assert outside.read_text() == json.dumps({"text": "never trained"}) + "\n"  # a link is never followed
    good = [r for r in ledger_rows(ws) if r["state"] == "done"]
    assert {r["original_name"] for r in good} == {"nested/deeper/08-good.jsonl", "09 odd \u00e9 name\\n.jsonl",
                                                   "10-bytes-\\xff.jsonl"}
    assert all((ws / "done" / r["name"]).is_file() and r["name"].isascii() for r in good)
    left = sorted(p.name for p in (ws / "inbox").iterdir())
    assert left == [".hidden.jsonl", "11-upload.jsonl.part", "12-upload.tmp", "nested"]


def test_pause_resume_skip_stop_at_the_next_step(tmp_path, tiny_model, monkeypatch):
    slow_steps(monkeypatch)
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "long.jsonl", rows(150, "long"))
        wait_for(lambda: (status(ws).get("file_step") or 0) >= 3, what="training to start")
        assert cli("pause", ws) == 0
        wait_for(lambda: status(ws).get("state") == "paused", what="paused")
        held = status(ws)["global_step"]
        row = by_name(ws)["long.jsonl"]
        assert row["state"] == "queued" and 0 < row["steps_trained"] < 150  # paused is not done
        assert checkpoint.newest_complete(ws / "current_model").step == held  # checkpointed at the boundary
        time.sleep(0.5)
        assert status(ws)["global_step"] == held
        assert cli("resume", ws) == 0
        wait_for(lambda: status(ws).get("global_step", 0) >= held + 3, what="training to go on")
        assert cli("skip", ws) == 0
        wait_for(lambda: by_name(ws)["long.jsonl"]["state"] == "skipped", what="skipped")
        row = by_name(ws)["long.jsonl"]
        assert held + 3 <= row["steps_trained"] < 150 and row["last_step"] == row["steps_trained"]
        record = checkpoint.newest_complete(ws / "current_model").state["evertrain"]["files"][-1]
        assert record["status"] == "skipped" and record["steps"] == row["steps_trained"]

        drop(ws, "next.jsonl", rows(100, "next"))
        wait_for(lambda: (status(ws).get("file_step") or 0) >= 2 and status(ws).get("current_file") == "next.jsonl",
                 what="the next file to train")
        assert daemon.stop() == 0
        row = by_name(ws)["next.jsonl"]
        assert row["state"] == "queued" and 0 < row["steps_trained"] < 100  # stopped is not done
    finally:
        daemon.stop()
    assert cli("run", ws, "--once") == 0  # resumes it at its cursor
    row = by_name(ws)["next.jsonl"]
    assert row["state"] == "done" and row["steps_trained"] == 100
    assert_exactly_once(ws, row, 100)


def test_urgent_file_preempts_and_the_interrupted_file_resumes_exactly(tmp_path, tiny_model, monkeypatch):
    slow_steps(monkeypatch)
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "normal.jsonl", rows(80, "normal"))
        wait_for(lambda: (status(ws).get("file_step") or 0) >= 3, what="the normal file to train")
        drop(ws, "later.jsonl", rows(3, "later"))  # arrives after normal.jsonl started
        wait_for(lambda: "later.jsonl" in by_name(ws) and (status(ws).get("file_step") or 0) >= 5,
                 what="later.jsonl to be queued")
        urgent = tmp_path / "urgent.jsonl"
        urgent.write_text("".join(json.dumps(r) + "\n" for r in rows(4, "urgent")))
        assert cli("add", urgent, ws, "--priority", "urgent") == 0
        wait_for(lambda: all(r["state"] == "done" for r in ledger_rows(ws)), what="all done")
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    files = by_name(ws)
    n, u, later = files["normal.jsonl"], files[str(urgent)], files["later.jsonl"]
    assert u["priority"] == "urgent" and u["sha256"] == sha256_file(urgent)
    # urgent trained inside the normal file's span; the normal file finished before the later one
    assert n["first_step"] < u["first_step"] <= u["last_step"] < n["last_step"] < later["first_step"]
    assert u["last_step"] - u["first_step"] + 1 == u["expected_steps"] == 4
    assert n["steps_trained"] == n["expected_steps"] == 80
    assert n["last_step"] - n["first_step"] + 1 == 80 + 4
    assert_exactly_once(ws, n, 80)
    assert_exactly_once(ws, u, 4)


def test_nan_loss_rolls_back_and_the_next_file_trains(tmp_path, tiny_model, monkeypatch):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "1-good.jsonl", rows(8, "good"))
    drop(ws, "2-poison.jsonl", rows(40, "poison"))
    drop(ws, "3-after.jsonl", rows(8, "after"))
    # The poison file's fifth step finds the weights broken.
    sessions = break_weights_at(monkeypatch, 4, sha256_file(ws / "inbox" / "2-poison.jsonl"))
    with open(ws / "evertrain.toml") as f:
        text = f.read()
    (ws / "evertrain.toml").write_text(text.replace("save_steps = 0", "save_steps = 2"))
    assert cli("run", ws, "--once") == 5  # the poisoned file failed

    files = by_name(ws)
    poison, after = files["2-poison.jsonl"], files["3-after.jsonl"]
    assert poison["state"] == "failed" and "loss became nan at global step 7" in poison["error"]
    assert "rolled back to checkpoint-6" in poison["error"]
    assert (ws / "failed" / (poison["name"] + ".error.txt")).is_file()
    assert len(sessions) == 2  # the rollback reloaded the newest good checkpoint
    # the good file after it trains with finite losses: the broken weights were thrown away
    assert after["state"] == "done" and (after["first_step"], after["last_step"]) == (7, 8)
    metrics = [json.loads(x) for x in (ws / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] for m in metrics if m["file_name"] == "3-after.jsonl")
    state = checkpoint.newest_complete(ws / "current_model").state["evertrain"]
    assert [(f["name"], f["status"], f["steps"]) for f in state["files"]] == [
        ("1-good.jsonl", "done", 2), ("2-poison.jsonl", "failed", 4), ("3-after.jsonl", "done", 2)]
    assert not state["cursors"]


def test_config_is_validated_and_identity_is_fixed(tmp_path, tiny_model, capsys):
    assert cli("init", tmp_path / "bad", "--batch-size", "0") == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    ws = make_ws(tmp_path, tiny_model)
    assert cli("init", ws) == 2 and "already exists" in capsys.readouterr().err
    toml = (ws / "evertrain.toml").read_text()
    (ws / "evertrain.toml").write_text(toml + "\nbatch_sise = 3\n")
    assert cli("run", ws, "--once") == 2 and "unknown setting(s) batch_sise" in capsys.readouterr().err
    (ws / "evertrain.toml").write_text(toml.replace("stable_seconds = 0.0", "stable_seconds = -1"))
    assert cli("run", ws, "--once") == 2
    assert "[daemon]: stable_seconds must be >= 0.0" in capsys.readouterr().err

    # disk guard: the file waits, queued, with an alert
    (ws / "evertrain.toml").write_text(toml.replace("disk_margin_bytes = 0", f"disk_margin_bytes = {1 << 60}"))
    drop(ws, "a.jsonl", rows(8, "a"))
    assert cli("run", ws, "--once") == 6   # exits.DISK_FULL
    assert by_name(ws)["a.jsonl"]["state"] == "queued" and "disk low" in status(ws)["alert"]

    (ws / "evertrain.toml").write_text(toml.replace("keep_checkpoints = 3", "keep_checkpoints = 1"))
    assert cli("run", ws, "--once") == 0
    assert by_name(ws)["a.jsonl"]["state"] == "done"
    assert cli("pin", 1, ws) == 2   # not there
    assert cli("pin", 2, ws) == 0
    drop(ws, "b.jsonl", rows(8, "b"))
    (ws / "evertrain.toml").write_text(toml.replace("keep_checkpoints = 3", "keep_checkpoints = 1")
                                       .replace("checkpoint_budget_bytes = 0", "checkpoint_budget_bytes = 1"))
    assert cli("run", ws, "--once") == 0
    assert sorted(c.step for c in checkpoint.candidates(ws / "current_model")) == [2, 4]  # pinned + newest

    # a run-identity setting changed after the first step: refused, with the way out
    capsys.readouterr()
    (ws / "evertrain.toml").write_text(toml.replace("lora = false", "lora = true"))
    drop(ws, "c.jsonl", rows(8, "c"))
    assert cli("run", ws, "--once") == 2
    out = capsys.readouterr().out
    assert "lora: run has" in out and "start a new run" in out
    assert status(ws)["state"] == "error"
    assert (ws / "inbox" / "c.jsonl").is_file() and "c.jsonl" not in by_name(ws)  # waiting, not lost
