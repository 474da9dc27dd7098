"""Kill -9 in the middle of a file, run the same command again: same weights as a run never interrupted."""

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import run_and_kill_after, text_rows, trained_steps, write_jsonl
from safetensors.torch import load_file as load_tensors

from evertrain.observe import trace
from evertrain.train import checkpoint


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
