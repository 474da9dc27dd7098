"""Paths no other test walks, each through the real CLI or the real daemon: priority folders, a second daemon,
a done file whose checkpoint no longer verifies, pin --remove, periodic evaluations, log rotation, exit 4."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import cli, text_rows, write_jsonl
from daemon_helpers import assert_exactly_once, by_name, drop, make_ws, rows, status, wait_for

from evertrain import logs
from evertrain.train import checkpoint


def test_priority_folders_order_the_queue(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "low/l.jsonl", rows(4, "l"))
    drop(ws, "n.jsonl", rows(4, "n"))
    drop(ws, "high/h.jsonl", rows(4, "h"))
    drop(ws, "urgent/u.jsonl", rows(4, "u"))
    assert cli("run", ws, "--once") == 0
    files = by_name(ws)
    assert {k: v["priority"] for k, v in files.items()} == {"low/l.jsonl": "low", "n.jsonl": "normal",
                                                             "high/h.jsonl": "high", "urgent/u.jsonl": "urgent"}
    order = sorted(files, key=lambda k: files[k]["first_step"])
    assert order == ["urgent/u.jsonl", "high/h.jsonl", "n.jsonl", "low/l.jsonl"]


def test_a_second_daemon_from_another_process_is_refused(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "long.jsonl", rows(400, "long"))
    first = subprocess.Popen([sys.executable, "-m", "evertrain", "run", str(ws)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: status(ws).get("pid") == first.pid and status(ws).get("state") == "training", 120,
                 "the first daemon to train")
        second = subprocess.run([sys.executable, "-m", "evertrain", "run", str(ws)], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        assert f"another evertrain daemon (pid {first.pid}) is running" in second.stderr
        assert status(ws)["pid"] == first.pid  # the running daemon's status is untouched
    finally:
        first.terminate()
        assert first.wait(120) == 0


def test_a_done_file_whose_checkpoint_no_longer_verifies_is_trained_again(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model, "--keep-checkpoints", "3")
    drop(ws, "a.jsonl", rows(8, "a"))
    assert cli("run", ws, "--once") == 0
    drop(ws, "b.jsonl", rows(8, "b"))
    assert cli("run", ws, "--once") == 0
    newest = checkpoint.newest_complete(ws / "current_model")
    (newest.path / "model.safetensors").write_bytes(b"damaged")  # b's checkpoint, the newest, is lost
    capsys.readouterr()
    assert cli("run", ws, "--once") == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "b.jsonl" in out and "queued again" in out
    files = by_name(ws)
    assert files["a.jsonl"]["state"] == files["b.jsonl"]["state"] == "done"
    assert_exactly_once(ws, files["b.jsonl"], 8)  # the trace holds committed history: b once, not twice
    assert checkpoint.newest_complete(ws / "current_model").step == newest.step


def test_pin_and_pin_remove(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model, "--keep-checkpoints", "1")
    drop(ws, "a.jsonl", rows(8, "a"))
    assert cli("run", ws, "--once") == 0
    first = checkpoint.newest_complete(ws / "current_model").step
    assert cli("pin", first, ws) == 0
    drop(ws, "b.jsonl", rows(8, "b"))
    assert cli("run", ws, "--once") == 0
    assert checkpoint.final_path(ws / "current_model", first).is_dir()  # pinned: kept beyond keep_checkpoints
    capsys.readouterr()
    assert cli("pin", first, ws, "--remove") == 0
    assert f"unpinned checkpoint-{first}" in capsys.readouterr().out
    assert cli("pin", first, ws, "--remove") == 0 and "was not pinned" in capsys.readouterr().out
    drop(ws, "c.jsonl", rows(8, "c"))
    assert cli("run", ws, "--once") == 0
    assert not checkpoint.final_path(ws / "current_model", first).exists()  # unpinned: retention took it
    assert cli("pin", 999, ws) == 2


def test_periodic_evaluations(tmp_path, tiny_model):
    out = tmp_path / "run"
    a, b = write_jsonl(tmp_path / "a.jsonl", text_rows(40, "a")), write_jsonl(tmp_path / "b.jsonl", text_rows(40, "b"))
    for f in (a, b):
        assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--batch-size", 4,
                   "--no-packing", "--held-out-fraction", 0.1, "--eval-steps", 3) == 0
    evals = [json.loads(line) for line in (out / "logs" / "evals.jsonl").read_text().splitlines()]
    periodic = [e for e in evals if e["after_file"] is None and not e.get("before_file")]
    steps = sorted({e["step"] for e in periodic})
    assert steps and all(s % 3 == 0 for s in steps)
    # mid-file evaluations of the second file cover the first file's slice too (forgetting, as it happens)
    assert {e["file_name"] for e in periodic if e["step"] > 9} == {"a.jsonl", "b.jsonl"}


def test_log_rotation(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(logs, "LOG_BYTES", 600)
    monkeypatch.setattr(logs, "LOG_BACKUPS", 2)
    ws = make_ws(tmp_path, tiny_model)
    for i in range(4):
        drop(ws, f"f{i}.jsonl", rows(4, f"f{i}"))
    assert cli("run", ws, "--once") == 0
    names = sorted(p.name for p in (ws / "logs").glob("evertrain.log*"))
    assert names == ["evertrain.log", "evertrain.log.1", "evertrain.log.2"]
    assert all((ws / "logs" / name).stat().st_size <= 600 + 400 for name in names)


def test_exit_4_when_the_last_checkpoint_is_not_on_disk(tmp_path, tiny_model, monkeypatch, capsys):
    """The guard that home-made systems lacked: trained, but the checkpoint of the last step is not there."""
    real = checkpoint.commit

    def commit_then_lose(tmp, state):
        final = real(tmp, state)
        if state["evertrain"]["cursors"] == {}:  # the file's last checkpoint: the disk loses its state file
            (final / checkpoint.STATE_FILE).unlink()
        return final

    monkeypatch.setattr(checkpoint, "commit", commit_then_lose)
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(6)), "--output-dir", out,
               "--model", tiny_model, "--batch-size", 2, "--no-packing") == 4
    err = capsys.readouterr().err
    assert "a.jsonl NOT done: no complete checkpoint for global step 3" in err
