"""Kill -9 in the middle of a file, run the same command again: same weights as a run never interrupted."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import run_and_kill_after, text_rows, trained_steps, write_jsonl
from safetensors.torch import load_file as load_tensors

from evertrain.observe import trace
from evertrain.train import checkpoint
from evertrain.config import TrainConfig
from evertrain.train.state import FileCursor, FileRecord, TrainingProgress


def command(data, out, model):
    return [sys.executable, "-m", "evertrain", "train", "--dataset", str(data), "--output-dir", str(out),
            "--model", str(model), "--batch-size", "2", "--no-packing", "--save-steps", "5", "--trace",
            "--keep-checkpoints", "2", "--learning-rate", "1e-3", "--held-out-fraction", "0"]


def test_kill_9_mid_file_then_resume_gives_identical_weights(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(61))  # 31 steps of 2 rows
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(command(data, whole, tiny_model), check=True, env=env, capture_output=True)

    run_and_kill_after(command(data, broken, tiny_model), broken, 8)
    assert checkpoint.newest_complete(broken).step < 31  # really killed mid-file
    run_and_kill_after(command(data, broken, tiny_model), broken, 22)
    done = subprocess.run(command(data, broken, tiny_model), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumes at its step" in done.stdout

    a = load_tensors(checkpoint.final_path(whole, 31) / "model.safetensors")
    b = load_tensors(checkpoint.final_path(broken, 31) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trace holds only committed history: every step once, every line once
    steps = [r["step"] for r in trace.read(broken / "trace.jsonl")]
    assert steps == list(range(1, 32))
    assert trace.coverage(broken / "trace.jsonl") == trace.coverage(whole / "trace.jsonl")
    assert set(next(iter(trace.coverage(broken / "trace.jsonl").values())).values()) == {1}


def test_sigterm_checkpoints_at_the_step_boundary_and_is_not_reported_done(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(61))
    out = tmp_path / "run"
    proc = subprocess.Popen(command(data, out, tiny_model), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while trained_steps(out) < 3:
        assert proc.poll() is None and time.monotonic() < end
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted" in stdout and " done: " not in stdout
    stopped_at = checkpoint.newest_complete(out).step
    assert stopped_at == trained_steps(out) < 31  # the checkpoint holds every step the trace shows
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert state["files"] == [] and list(state["cursors"].values())[0]["file_step"] == stopped_at


def test_a_checkpoint_written_by_a_thread_is_newest_once_committed_and_a_failed_one_leaves_nothing(tmp_path,
                                                                                                monkeypatch):
    """checkpoint.Write, what overlap_checkpoints runs (its training side: tests/test_checkpoint_overlap.py)."""
    tmp, go = checkpoint.temp_path(tmp_path, 3), threading.Event()
    tmp.mkdir()

    def work():
        assert go.wait(60)
        (tmp / "weights.bin").write_text("step 3")
        return checkpoint.commit(tmp, {"global_step": 3})

    write = checkpoint.Write(3, tmp, work)
    assert write.step == 3 and not write.done() and checkpoint.newest_complete(tmp_path) is None
    go.set()
    assert write.wait() == checkpoint.final_path(tmp_path, 3) and write.done()
    assert checkpoint.newest_complete(tmp_path).step == 3 and not tmp.exists()

    tmp = checkpoint.temp_path(tmp_path, 4)
    tmp.mkdir()

    def fails():
        (tmp / "weights.bin").write_text("half of step 4")
        raise OSError(errno.ENOSPC, "No space left on device")

    write = checkpoint.Write(4, tmp, fails)
    with pytest.raises(OSError) as e:
        write.wait()
    assert e.value.errno == errno.ENOSPC and write.done() and write.path is None
    assert not tmp.exists() and checkpoint.newest_complete(tmp_path).step == 3  # the partial one is gone

    def fails_first():  # before its folder was made (a disk that refused even that): nothing to remove
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    write = checkpoint.Write(5, checkpoint.temp_path(tmp_path, 5), fails_first)
    with pytest.raises(OSError, match="quota"):
        write.wait()
    assert not escaped  # the thread itself ended cleanly: the error is the caller's, raised once, by wait()


def record(sha, status="done", steps=3):
    return FileRecord(sha256=sha, name=f"{sha}.jsonl", examples=6, tokens=60, steps=steps, expected_steps=3,
                      first_step=1, last_step=3, status=status, replayed=1, held_out=[2])


def test_progress_round_trips_through_the_checkpoint_state_and_finds_finished_files():
    progress = TrainingProgress(global_step=7, tokens_seen=70, current="c",
                                cursors={"c": FileCursor("c", "c.jsonl", 2, 5, 6, {"global_batch": 2}, 1)},
                                files=[record("a", "failed", 1), record("a"), record("b", "skipped", 0)],
                                decay_start=5, decay_steps=2)
    saved = json.loads(json.dumps(progress.state_dict()))  # what trainer_state.json holds
    assert saved["cursors"]["c"]["file_step"] == 2 and saved["files"][1]["status"] == "done"
    back = TrainingProgress.from_state_dict(saved)
    assert back == progress and isinstance(back.cursors["c"], FileCursor) and isinstance(back.files[0], FileRecord)
    assert saved["files"][0] == {**record("a", "failed", 1).__dict__}  # the caller's dict is left as it was
    assert back.finished("a") is back.files[1]
    assert back.finished("b") is None and back.finished("c") is None
    back.files.append(record("a", steps=2))
    assert back.finished("a").steps == 2  # the last done record of it
    assert TrainingProgress.from_state_dict({"global_step": 3}) == TrainingProgress(global_step=3)


def test_a_cursor_and_record_saved_before_the_forgetting_gate_load_as_a_first_attempt_at_the_plain_dose():
    """A checkpoint written before the gate existed has none of its keys: its open file is a first attempt (a retry
    is still allowed), replayed at the plain dose, with no baseline (the gate then has no verdict), and its
    finished files have no verdict (so weighted replay has nothing to lean on)."""
    from evertrain.observe import gate
    from evertrain.train import replay

    old_cursor = {"sha256": "c", "name": "c.jsonl", "file_step": 2, "total_steps": 5, "first_step": 6,
                  "settings": {}, "replayed": 0}
    old_record = {k: v for k, v in record("a").__dict__.items() if k != "forgetting"}
    back = TrainingProgress.from_state_dict({"global_step": 7, "cursors": {"c": old_cursor}, "files": [old_record]})
    cursor = back.cursors["c"]
    assert (cursor.attempt, cursor.replay_boost, cursor.gate_before, cursor.forgot) == (1, 1.0, None, None)
    assert back.files[0].forgetting is None and gate.last_rises(back, cursor) == {}
    cfg = TrainConfig(replay_fraction=0.1)
    assert replay.dose(cfg, cursor.replay_boost) == 0.1
    assert replay.dose(cfg, 4.0) == 0.4 and replay.dose(TrainConfig(replay_fraction=0.0), 4.0) == 0.2
