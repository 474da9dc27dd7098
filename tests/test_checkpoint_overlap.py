"""Checkpoints written by a thread while training goes on (overlap_checkpoints): training does not wait for the
write, a checkpoint is the newest only once complete, it holds the same bytes as one written while training
waits, and a write that fails costs nothing trained. The kill -9 at each point of such a write is in
tests/test_faults.py.

    pytest -q tests/test_checkpoint_overlap.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch
from conftest import cli, text_rows, write_jsonl
from daemon_helpers import assert_trained_once, drop, make_ws, rows
from safetensors.torch import load_file as load_tensors

from evertrain import exits
from evertrain.observe import trace
from evertrain.runs import Run
from evertrain.train import checkpoint, loop, saving
from evertrain.train.setup import setup
from evertrain.config import TrainConfig
from evertrain.daemon.ledger import COPY_NAME

FAST = ("--batch-size", "1", "--no-packing", "--held-out-fraction", "0", "--learning-rate", "1e-3",
        "--warmup-steps", "0", "--save-steps", "3", "--keep-checkpoints", "10", "--trace")


def test_training_goes_on_while_a_thread_writes_the_checkpoint_and_it_is_newest_only_once_complete(
        tmp_path, tiny_model, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", text_rows(8))
    config = TrainConfig(model=str(tiny_model), batch_size=1, packing=False, held_out_fraction=0, save_steps=2,
                         keep_checkpoints=10, overlap_checkpoints="on")
    session = setup(config, Run.at(tmp_path / "run"), cpu=True)
    file = loop.prepare(session, data)
    released, real_write = threading.Event(), saving.write_files

    def held_write(*args):
        assert released.wait(120), "the test never released the write"
        real_write(*args)

    monkeypatch.setattr(saving, "write_files", held_write)
    steps = loop.fit(session, file)
    assert [next(steps).step for _ in range(2)] == [1, 2]  # step 2's checkpoint went to the thread...
    write = session.writing.thread
    assert write is not None and write.step == 2 and not write.done()
    at_2 = {k: v.clone() for k, v in session.model.state_dict().items()}
    moments_at_2 = [s["exp_avg"].clone() for s in session.optimizer.state.values()]
    assert next(steps).step == 3  # ...and step 3 trained while it was still being written
    assert checkpoint.newest_complete(tmp_path / "run") is None and session.last_checkpoint is None
    assert checkpoint.temp_path(tmp_path / "run", 2).is_dir()  # the write's folder, not yet a checkpoint

    copies_at_2 = {k: v.data_ptr() for k, v in session.writing.host_copies.items()}
    assert copies_at_2 and not any(v.is_pinned() for v in session.writing.host_copies.values())  # pinned: GPU

    released.set()
    write.thread.join(120)
    assert next(steps).step == 4  # the step boundary takes the finished write: the newest now
    # step 4's checkpoint, copied into the memory step 2's was written from (each save at one write at a time)
    assert {k: v.data_ptr() for k, v in session.writing.host_copies.items()} == copies_at_2
    assert session.last_checkpoint == checkpoint.final_path(tmp_path / "run", 2)
    # what it holds is step 2's, though step 3 changed the weights and moments before it was written
    saved = load_tensors(session.last_checkpoint / "model.safetensors")
    assert saved and all(torch.equal(saved[k], at_2[k]) for k in saved)
    assert not all(torch.equal(v, at_2[k]) for k, v in session.model.state_dict().items())
    moments = [s["exp_avg"] for s in torch.load(session.last_checkpoint / "optimizer.pt")["state"].values()]
    assert len(moments) == len(moments_at_2) and all(map(torch.equal, moments, moments_at_2))
    result = loop.drive(steps, lambda _record: None)
    assert result.status == "done" and session.writing.thread is None
    ckpts = checkpoint.candidates(tmp_path / "run")
    assert sorted(c.step for c in ckpts) == [2, 4, 6, 8] and all(checkpoint.verify(c) is None for c in ckpts)


def test_an_overlapped_checkpoint_holds_the_same_bytes_as_one_written_while_training_waits(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "a.jsonl", text_rows(10))
    for mode in ("off", "on"):
        assert cli("train", "--dataset", data, "--output-dir", tmp_path / mode, "--model", tiny_model, *FAST,
                   "--overlap-checkpoints", mode) == exits.OK
    steps = [c.step for c in checkpoint.candidates(tmp_path / "off")]
    assert sorted(steps) == [3, 6, 9, 10] and sorted(c.step for c in checkpoint.candidates(tmp_path / "on")) == \
        sorted(steps)
    for step in steps:
        for name in ("model.safetensors", "optimizer.pt", "scheduler.json", "tokenizer.json"):
            a, b = (checkpoint.final_path(tmp_path / mode, step) / name for mode in ("off", "on"))
            assert a.read_bytes() == b.read_bytes(), f"checkpoint-{step}/{name} differs"
        a, b = (checkpoint.read_state(checkpoint.final_path(tmp_path / mode, step)) for mode in ("off", "on"))
        assert a["global_step"] == b["global_step"] == step and a["files"] == b["files"]
        assert a["evertrain"]["examples_seen"] == b["evertrain"]["examples_seen"]


def test_an_overlapped_write_that_finds_no_room_stops_at_the_next_step_and_costs_nothing_trained(tmp_path,
                                                                                                 tiny_model):
    data = write_jsonl(tmp_path / "a.jsonl", text_rows(10))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "evertrain", "train", "--dataset", str(data), "--output-dir", str(out), "--model",
           str(tiny_model), *FAST, "--overlap-checkpoints", "on"]
    env = {**os.environ, "EVERTRAIN_FAULT": "enospc:checkpoint-write:2"}  # checkpoint-6's write, in the thread
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == exits.DISK_FULL, full.stdout + full.stderr
    assert "disk full in" in full.stderr and "Traceback" not in full.stderr, full.stderr
    assert checkpoint.newest_complete(out).step == 3 and not list(out.glob(".tmp-*"))  # the partial one removed
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == exits.OK, again.stderr
    assert sorted(trace.coverage(out / "trace.jsonl").popitem()[1].values()) == [1] * 10  # each line once


def test_the_daemon_overlaps_its_checkpoints_with_the_ledger_copy_sealed_in_each(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--overlap-checkpoints", "on", "--save-steps", "2", "--keep-checkpoints",
                 "20", "--batch-size", "1")
    drop(ws, "a.jsonl", rows(7, "a"))
    drop(ws, "b.jsonl", rows(5, "b"))
    assert cli("run", ws, "--once") == exits.OK
    assert_trained_once(ws, {"a.jsonl": 7, "b.jsonl": 5})
    ckpts = checkpoint.candidates(ws / "current_model")
    # every second step, then each file's end; sealed with the ledger as it was (repair's starting point)
    assert sorted(c.step for c in ckpts) == [2, 4, 6, 7, 8, 10, 12]
    assert all(COPY_NAME in c.state["manifest"] and checkpoint.verify(c) is None for c in ckpts)
