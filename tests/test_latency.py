"""Requests act at the next optimizer step: stop, pause, skip, SIGTERM and SIGINT, each bounded.

The bound: the checkpoint the process leaves is at most one step past the last step the trace showed when the
request had been made (the control written, the signal sent): a step in flight finishes, no further one starts.
Real daemons and trainers in their own processes, real signals; controls through the real CLI in this process.
"""

from __future__ import annotations

import json
import signal

from conftest import cli, evertrain, text_rows, trained_steps, write_jsonl
from daemon_helpers import by_name, drop, make_ws, status, wait_for

from evertrain.train import checkpoint

FILE_ROWS = 300  # with --batch-size 1: 300 steps, far more than any test lets run


def test_train_sigint_and_sigterm_stop_within_one_step_and_exit_130(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(FILE_ROWS))
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        proc = evertrain("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, "--batch-size", 1,
                         "--no-packing", "--trace", "--held-out-fraction", 0, "--save-steps", 0, wait=False)
        wait_for(lambda: trained_steps(out) >= 5 or proc.poll() is not None, 120, "steps")
        seen = trained_steps(out)
        proc.send_signal(sig)
        assert proc.wait(120) == 130, proc.stderr.read()[-2000:]
        stopped = checkpoint.newest_complete(out).step
        assert seen <= stopped <= seen + 1, (sig.name, seen, stopped)
        assert trained_steps(out) == stopped


def test_daemon_sigterm_checkpoints_within_one_step_and_exits_0(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    drop(ws, "long.jsonl", text_rows(FILE_ROWS))
    proc = evertrain("run", ws, wait=False)
    model_dir = ws / "current_model"
    wait_for(lambda: trained_steps(model_dir) >= 5 or proc.poll() is not None, 120, "steps")
    seen = trained_steps(model_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
    stopped = checkpoint.newest_complete(ws / "current_model").step
    assert seen <= stopped <= seen + 1, (seen, stopped)
    assert by_name(ws)["long.jsonl"]["state"] == "queued"  # interrupted, not done


def test_stop_pause_and_skip_act_within_one_step_and_a_pause_survives_a_restart(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    model_dir = ws / "current_model"
    drop(ws, "long.jsonl", text_rows(FILE_ROWS))
    daemon = evertrain("run", ws, wait=False)
    try:
        wait_for(lambda: trained_steps(model_dir) >= 3, 120, "training to start")
        # pause
        assert cli("pause", ws) == 0
        seen = trained_steps(model_dir)  # the request is on disk now
        wait_for(lambda: status(ws).get("state") == "paused", 60, "paused")
        held = checkpoint.newest_complete(ws / "current_model").step
        assert seen <= held <= seen + 1 and trained_steps(model_dir) == held
        # ... and survives a restart: stop the daemon, start it again, it stays paused
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(120) == 0
        daemon = evertrain("run", ws, wait=False)
        wait_for(lambda: status(ws).get("state") == "paused" and status(ws).get("pid") == daemon.pid, 60,
                 "the restarted daemon to come up paused")
        assert trained_steps(model_dir) == held
        assert cli("resume", ws) == 0
        wait_for(lambda: trained_steps(model_dir) >= held + 3, 120, "training to go on")
        # skip
        assert cli("skip", ws) == 0
        seen = trained_steps(model_dir)  # the request is on disk now
        wait_for(lambda: by_name(ws)["long.jsonl"]["state"] == "skipped", 60, "skipped")
        row = by_name(ws)["long.jsonl"]
        assert seen <= row["last_step"] <= seen + 1, (seen, row["last_step"])
        # stop
        drop(ws, "next.jsonl", text_rows(FILE_ROWS, "n"))
        wait_for(lambda: trained_steps(model_dir) >= row["last_step"] + 3, 120, "the next file to train")
        assert cli("stop", ws) == 0
        seen = trained_steps(model_dir)  # the request is on disk now
        assert daemon.wait(120) == 0
        stopped = checkpoint.newest_complete(ws / "current_model").step
        assert seen <= stopped <= seen + 1, (seen, stopped)
        assert json.loads((ws / "status" / "training_status.json").read_text())["state"] == "stopped"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
