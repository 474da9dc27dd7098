"""The daemon while it prepares data: progress in the status, controls that act during preparation, the next
file prepared in the background, and bad files still failed before any of them trains."""

from __future__ import annotations

import threading

from conftest import cli
from daemon_helpers import ThreadDaemon, by_name, drop, make_ws, rows, status, wait_for
from test_daemon import assert_exactly_once, slow_steps

from evertrain.data import prepare as prepare_module
from evertrain.data.render import Renderer


def gate_preparation(monkeypatch, batch: int = 10) -> threading.Semaphore:
    """Small batches, each waiting for the test's go: preparation advances exactly as far as the test lets it."""
    gate = threading.Semaphore(0)
    real = Renderer.tokenize

    def tokenize(self, rendered):
        gate.acquire()
        return real(self, rendered)

    monkeypatch.setattr(prepare_module, "BATCH_RECORDS", batch)
    monkeypatch.setattr(Renderer, "tokenize", tokenize)
    return gate


def test_status_shows_preparation_and_pause_and_stop_act_during_it(tmp_path, tiny_model, monkeypatch, capsys):
    gate = gate_preparation(monkeypatch)
    ws = make_ws(tmp_path, tiny_model)
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "big.jsonl", rows(100, "big"))
        wait_for(lambda: status(ws).get("state") == "preparing", what="preparation to start")
        assert status(ws)["current_file"] == "big.jsonl"
        for _ in range(4):
            gate.release()
        capsys.readouterr()
        assert cli("status", ws) == 0
        assert "preparing big.jsonl" in capsys.readouterr().out
        assert cli("pause", ws) == 0
        for _ in range(200):  # nothing may wait on the gate any more once the pause is seen
            gate.release()
        wait_for(lambda: status(ws).get("state") == "paused", what="the pause to act during preparation")
        row = by_name(ws)["big.jsonl"]
        assert row["state"] == "queued" and row["steps_trained"] == 0 and status(ws)["global_step"] == 0
        assert not [p for p in (ws / "current_model" / "tokens").glob("*") if p.is_dir()]  # nothing half-built
        assert cli("resume", ws) == 0
        wait_for(lambda: by_name(ws)["big.jsonl"]["state"] == "done", what="the file to train after resume")
        assert daemon.stop() == 0
    finally:
        for _ in range(200):
            gate.release()
        daemon.stop()
    assert_exactly_once(ws, by_name(ws)["big.jsonl"], 100)


def test_stop_during_preparation_leaves_the_file_queued(tmp_path, tiny_model, monkeypatch):
    gate = gate_preparation(monkeypatch)
    ws = make_ws(tmp_path, tiny_model)
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "big.jsonl", rows(100, "big"))
        wait_for(lambda: status(ws).get("state") == "preparing", what="preparation to start")
        assert cli("stop", ws) == 0
        for _ in range(200):
            gate.release()
        daemon.thread.join(60)
        assert daemon.rc == 0
    finally:
        for _ in range(200):
            gate.release()
        daemon.stop()
    assert by_name(ws)["big.jsonl"]["state"] == "queued"
    model = ws / "current_model"  # stopped inside preparation: no step, no checkpoint, no half-built store
    assert not list(model.glob("checkpoint-*")) and not [p for p in (model / "tokens").glob("*") if p.is_dir()]
    assert cli("run", ws, "--once") == 0
    assert_exactly_once(ws, by_name(ws)["big.jsonl"], 100)


def test_the_next_file_is_prepared_while_the_current_one_trains(tmp_path, tiny_model, monkeypatch):
    slow_steps(monkeypatch)
    builds = []
    real = prepare_module.build_store

    def build_store(path, *args, **kwargs):
        builds.append((path.name, threading.current_thread().name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "build_store", build_store)
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    drop(ws, "first.jsonl", rows(30, "first"))
    drop(ws, "second.jsonl", rows(20, "second"))
    drop(ws, "third-bad.jsonl", '{"text": "fine"}\n{"text": 7}\n')
    assert cli("run", ws, "--once") == 0
    files = by_name(ws)
    assert files["first.jsonl"]["state"] == files["second.jsonl"]["state"] == "done"
    assert files["third-bad.jsonl"]["state"] == "failed" and "line 2" in files["third-bad.jsonl"]["error"]
    assert files["third-bad.jsonl"]["first_step"] is None  # failed before any of it trained
    second = [who for name, who in builds if name.endswith("second.jsonl")]
    assert second == ["evertrain-prefetch"]  # built once, in the background; the daemon found it ready
    assert_exactly_once(ws, files["second.jsonl"], 20)
    log = (ws / "logs" / "evertrain.log").read_text()
    assert "prepared the next file" in log and "second.jsonl" in log
