"""Disk full is a state, not a crash: `train` stops with exit 6, the daemon waits and resumes by itself.

For real where the machine lets a test mount a small tmpfs (root): the workspace lives on it and a filler file
takes the space away and gives it back. Everywhere: EVERTRAIN_FAULT=enospc:POINT makes one write at each write
site fail with ENOSPC, through the real CLI and the real daemon.

    pytest tests/test_disk_full.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import evertrain, text_rows, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import soak  # noqa: E402
from daemon_helpers import assert_trained_once, by_name, debris, drop, make_ws, rows, status, wait_for

from evertrain import exits
from evertrain.observe import trace
from evertrain.train import checkpoint

TRAIN = ("--batch-size", "4", "--no-packing", "--held-out-fraction", "0", "--trace", "--save-steps", "0")


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs, or a skip where mounting is not permitted (the fault-point tests below still run)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def no_traceback(out: str) -> None:
    assert "Traceback" not in out and "Logging error" not in out, out


# ------------------------------------------------------------------------------------------------- train

def test_train_on_a_full_disk_exits_5_keeps_the_checkpoint_and_resumes(small_disk, tmp_path, tiny_model):
    out = small_disk / "run"
    first, second = write_jsonl(tmp_path / "a.jsonl", text_rows(12, "a")), write_jsonl(tmp_path / "b.jsonl",
                                                                                        text_rows(16, "b"))
    assert evertrain("train", "--dataset", first, "--output-dir", out, "--model", tiny_model, *TRAIN).returncode == 0
    size = checkpoint.folder_size(out / "checkpoint-3")
    filler = soak.fill(small_disk, size // 3)   # room for the steps' logs, not for the checkpoint

    done = evertrain("train", "--dataset", second, "--output-dir", out, "--model", tiny_model, *TRAIN)
    assert done.returncode == exits.DISK_FULL, done.stdout + done.stderr
    no_traceback(done.stdout + done.stderr)
    assert done.stderr.count("\n") == 1 and f"disk full in {out}" in done.stderr and "bytes needed" in done.stderr
    assert f"{out / 'checkpoint-3'}" in done.stderr
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert checkpoint.newest_complete(out).step == 3

    filler.unlink()
    done = evertrain("train", "--dataset", second, "--output-dir", out, "--model", tiny_model, *TRAIN)
    assert done.returncode == 0, done.stdout + done.stderr
    coverage = trace.coverage(out / "trace.jsonl")
    assert [sorted(c.values()) for c in coverage.values()] == [[1] * 12, [1] * 16]


def test_debris_of_a_dead_process_is_removed_before_the_disk_check(small_disk, tiny_model):
    """A save that died on a full disk left its temp folder taking the room: the next start removes it first."""
    ws = make_ws(small_disk, tiny_model)
    drop(ws, "a.jsonl", rows(6, "a"))
    assert evertrain("run", ws, "--once").returncode == 0
    tmp = ws / "current_model" / ".tmp-checkpoint-7"
    tmp.mkdir()
    soak.fill(small_disk, 1 << 16, name=str(tmp.relative_to(small_disk) / "model.safetensors"))  # its partial weights
    (ws / "status" / ".training_status.json.999999.tmp").write_text("{")
    drop(ws, "b.jsonl", rows(6, "b"))

    done = evertrain("run", ws, "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert by_name(ws)["b.jsonl"]["state"] == "done" and not debris(ws)


def test_enospc_in_a_train_checkpoint_save_removes_the_partial_one(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "a.jsonl", text_rows(12, "a"))
    out = tmp_path / "run"
    done = evertrain("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN,
                     fault="enospc:checkpoint-write")
    assert done.returncode == exits.DISK_FULL and "disk full in" in done.stderr, done.stdout + done.stderr
    no_traceback(done.stderr)
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]
    assert evertrain("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN).returncode == 0
    assert sorted(trace.coverage(out / "trace.jsonl").popitem()[1].values()) == [1] * 12


# ------------------------------------------------------------------------------------------------- the daemon

class Daemon:
    """`evertrain run WS` as a real process, its output in a file off the small disk."""

    def __init__(self, ws: Path, log: Path, fault: str | None = None):
        self.log = log
        self.proc = evertrain("run", ws, fault=fault, wait=False, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: status(ws).get("pid") == self.proc.pid or self.proc.poll() is not None,
                 what="the daemon to start")

    def wait(self, condition, what: str, timeout: float = 120):
        try:
            return wait_for(condition, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; the daemon said:\n{self.log.read_text()[-3000:]}") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, ws: Path) -> str:
        assert evertrain("stop", ws).returncode == 0
        assert self.proc.wait(120) == 0
        return self.log.read_text()


def test_the_daemon_waits_on_a_full_disk_and_resumes_by_itself(small_disk, tmp_path, tiny_model):
    ws = make_ws(small_disk, tiny_model, "--keep-checkpoints", "1")
    daemon = Daemon(ws, tmp_path / "daemon.log")
    drop(ws, "a.jsonl", rows(10, "a"))
    daemon.wait(lambda: by_name(ws).get("a.jsonl", {}).get("state") == "done", what="a.jsonl done")
    # the ledger says done only after the file's checkpoint is on disk; the status file may lag behind it
    size = checkpoint.folder_size(checkpoint.newest_complete(ws / "current_model").path)

    # 1. mid-file: the room goes while the file trains; none is left for its checkpoint
    drop(ws, "b.jsonl", rows(300, "b"))
    daemon.wait(lambda: status(ws).get("state") == "training", what="b.jsonl in training")
    filler = soak.fill(small_disk, size // 3)
    daemon.wait(lambda: status(ws).get("state") == "waiting", what="the waiting state")
    alert = status(ws)["alert"]
    assert alert.startswith(f"waiting: disk full in {ws / 'current_model'} (") and "bytes needed" in alert, alert
    assert daemon.alive() and not debris(ws) and by_name(ws)["b.jsonl"]["state"] == "queued"

    # 2. to the last byte: the idle daemon cannot take a file (the ledger is full) nor write its status; it stays up
    staged = ws / ".staging-c"
    write_jsonl(staged, rows(9, "c"))
    more = soak.fill(small_disk, 0, name="filler-2")
    os.rename(staged, ws / "inbox" / "c.jsonl")  # a rename takes no room
    daemon.wait(lambda: "disk full: intake" in daemon.log.read_text(), what="the intake to say the disk is full")
    assert daemon.alive() and "c.jsonl" not in by_name(ws)

    # 3. room again: everything trains, exactly once
    filler.unlink()
    more.unlink()
    daemon.wait(lambda: all(r["state"] == "done" for r in by_name(ws).values()) and len(by_name(ws)) == 3,
                what="every file done after the space came back")
    log = daemon.stop(ws)
    no_traceback(log)
    assert "there is room again" in log and log.count("disk full") >= 1
    assert_trained_once(ws, {"a.jsonl": 10, "b.jsonl": 300, "c.jsonl": 9})
    assert not debris(ws)


@pytest.mark.parametrize("point", ["checkpoint-write", "trace-write", "ledger-write", "status-write",
                                   "metrics-write"])
def test_enospc_at_each_daemon_write_site(tmp_path, tiny_model, point):
    """One write of each site fails: essential ones send the file back to its last checkpoint, optional ones
    are skipped with a line; either way every line is trained exactly once and the daemon goes on."""
    ws = make_ws(tmp_path, tiny_model, "--save-steps", "2")
    drop(ws, "a.jsonl", rows(13, "a"))
    drop(ws, "b.jsonl", rows(7, "b"))
    daemon = Daemon(ws, tmp_path / "daemon.log", fault=f"enospc:{point}:3")
    daemon.wait(lambda: [r["state"] for r in by_name(ws).values()] == ["done", "done"], what="both files done")
    log = daemon.stop(ws)
    no_traceback(log)
    assert "disk full" in log, log
    assert_trained_once(ws, {"a.jsonl": 13, "b.jsonl": 7})
    assert not debris(ws)
