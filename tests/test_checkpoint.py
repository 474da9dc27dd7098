"""train/checkpoint.py at the unit level: the atomic commit and its manifest, verify, the newest complete one,
at_step, discard_after, prune, debris, the writing thread. Folders shaped like checkpoints (the real
`checkpoint.commit`, small files) instead of trained ones: fast, and the `resume` pass of `make mutate` (TESTING.md).

    pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from evertrain.train import checkpoint


def saved(out, step, files=None, **state):
    """A checkpoint of `step` in `out`, committed the way the loop commits one."""
    tmp = checkpoint.temp_path(out, step)
    for rel, data in (files or {"model.safetensors": f"weights {step}".encode()}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return checkpoint.commit(tmp, dict(state, global_step=step))


def test_commit_seals_a_manifest_of_every_file_but_the_state_file(tmp_path):
    out = tmp_path / "run"
    final = saved(out, 3, {"model.safetensors": b"abc", "sub/tok.json": b"{}"}, evertrain={"k": 1})
    assert final == out / "checkpoint-3" and not checkpoint.temp_path(out, 3).exists()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["format"] == checkpoint.FORMAT and state["evertrain"] == {"k": 1} and state["global_step"] == 3
    assert state["manifest"] == {
        "model.safetensors": {"size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "sub/tok.json": {"size": 2, "sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}}
    assert checkpoint.read_state(final) == state and checkpoint.verify(checkpoint.candidates(out)[0]) is None


def test_committing_a_step_again_replaces_it_whole(tmp_path):
    out = tmp_path / "run"
    saved(out, 2, {"model.safetensors": b"old", "only-old.bin": b"x"})
    saved(out, 2, {"model.safetensors": b"older"})
    (out / "checkpoint-2").rename(out / ".old-checkpoint-2")  # a crash left the one before aside, the next in place:
    saved(out, 2, {"model.safetensors": b"old", "only-old.bin": b"x"})  # (as after the swap's rename)
    final = saved(out, 2, {"model.safetensors": b"new!"})
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "trainer_state.json"]
    assert (final / "model.safetensors").read_bytes() == b"new!"


def test_a_failure_inside_commit_leaves_the_old_checkpoint_or_the_new_one(tmp_path, monkeypatch):
    from evertrain import faults

    out = tmp_path / "run"
    saved(out, 4, {"model.safetensors": b"old"})
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("EVERTRAIN_FAULT", "enospc:old-swap")  # the old one moved aside, the new one not in place
    with pytest.raises(OSError, match="EVERTRAIN_FAULT at old-swap"):
        saved(out, 4, {"model.safetensors": b"new"})
    assert not (out / "checkpoint-4").exists()
    assert checkpoint.newest_complete(out) is None  # a reader renames nothing: it is a commit between its renames
    assert (out / ".old-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    checkpoint.remove_debris(out)  # the folder's lock holder, at start: the one left by the crash is put back
    found = checkpoint.newest_complete(out)
    assert found.step == 4 and (found.path / "model.safetensors").read_bytes() == b"old"
    monkeypatch.setenv("EVERTRAIN_FAULT", "enospc:after-rename")  # in place, the folder not yet fsync'd
    with pytest.raises(OSError, match="EVERTRAIN_FAULT at after-rename"):
        saved(out, 5, {"model.safetensors": b"five"})
    assert checkpoint.newest_complete(out).step == 5


def test_commit_syncs_every_file_and_folder_to_disk_before_it_counts(tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    tmp = checkpoint.temp_path(out, 1)
    (tmp / "sub").mkdir(parents=True)
    for rel in ("model.safetensors", "sub/tok.json"):
        (tmp / rel).write_bytes(b"x")
    opened, synced, real_open, real_fsync = {}, [], os.open, os.fsync

    def tracked_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        opened[fd] = os.path.relpath(path, tmp_path)
        return fd

    def tracked_fsync(fd):
        synced.append((opened.get(fd), (tmp / "trainer_state.json").exists(), (out / "checkpoint-1").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", tracked_open)
    monkeypatch.setattr(os, "fsync", tracked_fsync)
    checkpoint.commit(tmp, {"global_step": 1})
    before_rename = {path for path, _, renamed in synced if not renamed}
    assert {f"run/.tmp-checkpoint-1/{rel}" for rel in ("model.safetensors", "sub/tok.json", "trainer_state.json",
                                                         "sub")} | {"run/.tmp-checkpoint-1"} <= before_rename
    assert all(state_written for _path, state_written, renamed in synced if not renamed)  # the manifest is in
    assert synced[-1] == ("run", False, True)  # and the parent folder, after the rename


def test_read_state_refuses_what_is_not_a_sealed_state(tmp_path):
    for name, text in [("missing", None), ("torn", '{"global_step": 3, "mani'), ("a-list", "[1, 2]"),
                       ("no-step", '{"manifest": {}}'), ("str-step", '{"global_step": "3", "manifest": {}}'),
                       ("no-manifest", '{"global_step": 3}')]:
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "trainer_state.json").write_text(text)
        assert checkpoint.read_state(tmp_path / name) is None, name
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "trainer_state.json").write_text('{"global_step": 0, "manifest": {}}')
    assert checkpoint.read_state(tmp_path / "ok") == {"global_step": 0, "manifest": {}}


def test_verify_names_what_is_wrong(tmp_path):
    out = tmp_path / "run"
    path = saved(out, 1, {"a.bin": b"1234", "b.bin": b"5678"})
    ckpt = checkpoint.candidates(out)[0]
    (path / "b.bin").write_bytes(b"5679")  # same size, other bytes
    assert checkpoint.verify(ckpt) == "b.bin does not match its sha256"
    assert checkpoint.verify(ckpt, full=False) is None
    (path / "b.bin").write_bytes(b"56")
    assert checkpoint.verify(ckpt, full=False) == "b.bin has 2 bytes, expected 4"
    (path / "a.bin").unlink()
    assert checkpoint.verify(ckpt) == "a.bin is missing"
    (path / "a.bin").mkdir()  # a folder where the file should be is not the file
    assert checkpoint.verify(ckpt) == "a.bin is missing"


def test_candidates_are_checkpoint_folders_with_a_state_newest_step_first(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.candidates(out) == [] and not checkpoint.present(out)
    for step in (9, 10, 2):
        saved(out, step)
    (out / "checkpoint-10").rename(out / "checkpoint-1")  # the name says 1, the state says 10
    (out / "checkpoint-50").mkdir()                       # no state file
    (out / "checkpoint-60").write_text("a file")
    shutil.copytree(out / "checkpoint-9", out / "old-checkpoint-99")
    found = checkpoint.candidates(out)
    assert [(c.step, c.name) for c in found] == [(10, "checkpoint-1"), (9, "checkpoint-9"), (2, "checkpoint-2")]
    assert found[0].state == checkpoint.read_state(out / "checkpoint-1")
    assert checkpoint.unreadable(out) == [(out / "checkpoint-50", "trainer_state.json is missing or does not parse")]
    assert checkpoint.present(out)
    only_broken = tmp_path / "broken"
    (only_broken / "checkpoint-3").mkdir(parents=True)
    (only_broken / "notes").mkdir()
    assert checkpoint.present(only_broken) and checkpoint.candidates(only_broken) == []
    (tmp_path / "none" / "checkpoints").mkdir(parents=True)
    (tmp_path / "none" / "checkpoint-5").write_text("a file, not a checkpoint")
    assert not checkpoint.present(tmp_path / "none") and checkpoint.unreadable(tmp_path / "none") == []
    assert checkpoint.unreadable(tmp_path / "nowhere") == []


def test_at_step_finds_only_a_checkpoint_of_that_step_that_verifies(tmp_path):
    out = tmp_path / "run"
    for step in (4, 8):
        saved(out, step)
    assert checkpoint.at_step(out, 4).path == out / "checkpoint-4" and checkpoint.at_step(out, 4).step == 4
    assert checkpoint.at_step(out, 5) is None and checkpoint.at_step(tmp_path / "nowhere", 4) is None
    (out / "checkpoint-8").rename(out / "checkpoint-7")  # the name says 7, the state says 8
    assert checkpoint.at_step(out, 7) is None and checkpoint.at_step(out, 8) is None
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"weights 5")  # same size, other bytes
    assert checkpoint.at_step(out, 4, full=False) is not None and checkpoint.at_step(out, 4) is None
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"torn")
    assert checkpoint.at_step(out, 4, full=False) is None


def test_discard_after_deletes_every_checkpoint_beyond_the_step_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    for step in (2, 4, 6, 9):
        saved(out, step)
    (out / "checkpoint-6").rename(out / "checkpoint-1")  # found by its state's step, not its name
    checkpoint.temp_path(out, 9).mkdir()
    (checkpoint.temp_path(out, 9) / "model.safetensors").write_bytes(b"torn")  # a crashed write's debris
    assert checkpoint.discard_after(out, 4) == [out / "checkpoint-9", out / "checkpoint-1"]  # newest first
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint.discard_after(out, 4) == [] and checkpoint.discard_after(out, 0) != []
    assert list(out.iterdir()) == []


def test_a_discarded_checkpoint_the_disk_fails_to_delete_is_never_resumed_from(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for step in (2, 4, 6):
        saved(out, step)
    real = shutil.rmtree

    def stuck(path, ignore_errors=False, **kw):  # a disk that deletes nothing
        if not ignore_errors:
            raise OSError(f"cannot delete {path}")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", stuck)
    assert checkpoint.discard_after(out, 2) == [out / "checkpoint-6", out / "checkpoint-4"]
    assert [c.step for c in checkpoint.candidates(out)] == [2] and checkpoint.newest_complete(out).step == 2
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    checkpoint.remove_debris(out)  # what is left is debris
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


def test_newest_complete_passes_over_broken_newer_ones_and_says_so(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2, 3):
        saved(out, step)
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"torn")
    (out / "checkpoint-4").mkdir()
    said = []
    found = checkpoint.newest_complete(out, warn=said.append)
    assert found.step == 2 and found.path == out / "checkpoint-2"
    assert said == [f"evertrain: skipping {out / 'checkpoint-3'}: model.safetensors has 4 bytes, expected 9",
                    f"evertrain: skipping {out / 'checkpoint-4'}: trainer_state.json is missing or does not parse"]
    for damaged in ("skip", "refuse", "set-aside"):  # a good one found: nothing refused, nothing moved
        assert checkpoint.newest_complete(out, warn=said.append, damaged=damaged).step == 2
    assert (out / "checkpoint-3").is_dir() and not (out / "damaged").exists()
    assert checkpoint.newest_complete(tmp_path / "empty", damaged="refuse") is None
    # A flipped byte keeps the size: the full verification (the default) sees it; sizes only (full=False: serve's
    # follower, which verifies in full the one it loads) take the checkpoint.
    weights = out / "checkpoint-2" / "model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-1] ^= 1
    weights.write_bytes(bytes(flipped))
    assert checkpoint.newest_complete(out, warn=said.append).step == 1
    assert checkpoint.newest_complete(out, warn=said.append, full=False).step == 2


def test_when_no_checkpoint_verifies_newest_complete_refuses_or_sets_them_aside(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2):
        saved(out, step)
        (out / f"checkpoint-{step}" / "model.safetensors").unlink()
    (out / "checkpoint-7").mkdir()
    said = []
    assert checkpoint.newest_complete(out, warn=said.append) is None
    assert len(said) == 3 and all(s.startswith("evertrain: skipping ") for s in said)
    with pytest.raises(checkpoint.NoUsableCheckpoint) as refused:
        checkpoint.newest_complete(out, warn=said.append, damaged="refuse")
    problems = [(out / "checkpoint-2", "model.safetensors is missing"),
                (out / "checkpoint-1", "model.safetensors is missing"),
                (out / "checkpoint-7", "trainer_state.json is missing or does not parse")]
    assert refused.value.problems == problems
    assert str(refused.value) == (
        f"no checkpoint in {out} loads; nothing was trained or changed:"
        f"\n  {out}/checkpoint-2: model.safetensors is missing\n  {out}/checkpoint-1: model.safetensors is missing"
        f"\n  {out}/checkpoint-7: trainer_state.json is missing or does not parse\n"
        "Restore a checkpoint, or start the run again from the base model with --from-base "
        f"(the damaged checkpoints are then moved to {out}/damaged/)")
    assert isinstance(refused.value, checkpoint.ConfigError)
    said.clear()
    assert checkpoint.newest_complete(out, warn=said.append, damaged="set-aside") is None
    assert sorted(p.name for p in (out / "damaged").iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-7"]
    assert said[0] == (f"evertrain: moved {out / 'checkpoint-2'} to {out / 'damaged' / 'checkpoint-2'} "
                       "(model.safetensors is missing)") and len(said) == 3
    assert not checkpoint.present(out)


def test_resume_policy():
    assert checkpoint.resume_policy(from_base=False, main_process=True) == "refuse"
    assert checkpoint.resume_policy(from_base=False, main_process=False) == "refuse"
    assert checkpoint.resume_policy(from_base=True, main_process=True) == "set-aside"
    assert checkpoint.resume_policy(from_base=True, main_process=False) == "skip"


def test_set_aside_never_overwrites_what_damaged_holds(tmp_path):
    for n in range(3):
        (tmp_path / "checkpoint-4").mkdir()
        (tmp_path / "checkpoint-4" / "n").write_text(str(n))
        assert checkpoint.set_aside(tmp_path / "checkpoint-4") == tmp_path / "damaged" / ("checkpoint-4" + ".1" * 0
                                                                                          + (f".{n}" if n else ""))
    assert [(tmp_path / "damaged" / name / "n").read_text() for name in ("checkpoint-4", "checkpoint-4.1",
                                                                         "checkpoint-4.2")] == ["0", "1", "2"]


def test_a_swap_cut_by_a_crash_is_put_back_and_debris_removed(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.remove_debris(out) == [] and checkpoint.recover_swap(out) is None
    saved(out, 5)
    saved(out, 6)
    (out / "checkpoint-5").rename(out / ".old-checkpoint-5")   # moved aside, nothing in its place: the only copy
    shutil.copytree(out / "checkpoint-6", out / ".old-checkpoint-6")  # the new one is in place: stale
    (out / ".old-checkpoint-8").mkdir()                            # aside but not a checkpoint: not put back
    saved(out, 7)
    shutil.copytree(out / "checkpoint-7", checkpoint.temp_path(out, 7))
    (out / ".status.json.123.tmp").write_text("{")
    (out / ".notes.tmp").mkdir()  # a folder, not a temp file of write_text_atomic
    (out / ".keep").write_text("not a temp")
    removed = checkpoint.remove_debris(out)
    assert sorted(p.name for p in removed) == [".old-checkpoint-6", ".status.json.123.tmp", ".tmp-checkpoint-7"]
    assert all(not p.exists() for p in removed)
    assert sorted(p.name for p in out.iterdir()) == [".keep", ".notes.tmp", ".old-checkpoint-8", "checkpoint-5",
                                                     "checkpoint-6", "checkpoint-7"]
    assert checkpoint.verify(checkpoint.candidates(out)[-1]) is None
    (out / "checkpoint-6").rename(out / ".old-checkpoint-6")  # a commit of step 6 again, between its renames
    assert checkpoint.newest_complete(out).step == 7 and not (out / "checkpoint-6").exists()  # a reader renames none


def test_debris_that_cannot_be_removed_or_is_already_gone_is_no_error(tmp_path, monkeypatch):
    import pathlib

    (tmp_path / ".tmp-checkpoint-3").write_text("a file where a temporary folder should be")
    (tmp_path / ".a.json.7.tmp").write_text("{")
    real_is_file = pathlib.Path.is_file

    def is_file_then_gone(path):  # its writer renamed it into place just after the check
        found = real_is_file(path)
        if path.name == ".a.json.7.tmp":
            path.unlink()
        return found

    monkeypatch.setattr(pathlib.Path, "is_file", is_file_then_gone)
    assert sorted(p.name for p in checkpoint.remove_debris(tmp_path)) == [".a.json.7.tmp", ".tmp-checkpoint-3"]


def test_prune_keeps_the_newest_the_pinned_and_the_budget_oldest_first(tmp_path):
    out = tmp_path / "run"
    for step in range(1, 7):
        saved(out, step, {"w.bin": b"x" * 100, "sub/t.bin": b"y" * step})
    assert checkpoint.folder_size(out / "checkpoint-3") == 103 + (out / "checkpoint-3" / "trainer_state.json").stat().st_size
    checkpoint.temp_path(out, 7).mkdir()
    steps = lambda: sorted(c.step for c in checkpoint.candidates(out))  # noqa: E731
    assert checkpoint.prune(out, keep=6) == [] and steps() == [1, 2, 3, 4, 5, 6]
    assert not checkpoint.temp_path(out, 7).exists()
    assert checkpoint.prune(out, keep=5) == [out / "checkpoint-1"] and steps() == [2, 3, 4, 5, 6]
    # pinned ones count toward `keep`; the oldest unpinned goes first
    assert checkpoint.prune(out, keep=3, protected={"checkpoint-2"}) == [out / "checkpoint-3", out / "checkpoint-4"]
    assert steps() == [2, 5, 6]
    # the newest complete one is never deleted, even when a newer (broken) one is on disk
    assert checkpoint.prune(out, keep=2, newest=out / "checkpoint-5") == [out / "checkpoint-2"] and steps() == [5, 6]
    assert checkpoint.prune(out, keep=1, newest=out / "checkpoint-5") == [out / "checkpoint-6"] and steps() == [5]
    saved(out, 6, {"w.bin": b"x" * 100})
    assert checkpoint.prune(out, keep=0) == [out / "checkpoint-5"] and steps() == [6]
    for step in (7, 8, 9):
        saved(out, step, {"w.bin": b"x" * 100})
    size = checkpoint.folder_size(out / "checkpoint-7")
    # a budget of three checkpoints' bytes holds three, whatever `keep` allows
    assert checkpoint.prune(out, keep=10, budget_bytes=3 * size + 10) == [out / "checkpoint-6"] and steps() == [7, 8, 9]
    assert checkpoint.prune(out, keep=10, budget_bytes=3 * size) == [] and steps() == [7, 8, 9]
    saved(out, 10, {"w.bin": b"x" * 100})
    assert checkpoint.prune(out, keep=10, budget_bytes=2 * size + 10) == [out / "checkpoint-7", out / "checkpoint-8"]
    assert steps() == [9, 10]
    assert checkpoint.prune(out, keep=10, budget_bytes=1) == [out / "checkpoint-9"] and steps() == [10]
    assert checkpoint.prune(tmp_path / "nothing", keep=1) == []


def test_prune_beside_another_process_pruning_the_same_folder(tmp_path, monkeypatch):
    """The ranks of a launch prune the same folder: what another one just deleted is no error."""
    out = tmp_path / "run"
    for step in (1, 2, 3):
        saved(out, step)
    real = checkpoint.candidates

    def listed_then_deleted(folder):
        found = real(folder)
        shutil.rmtree(found[-1].path)
        return found

    monkeypatch.setattr(checkpoint, "candidates", listed_then_deleted)
    (out / ".tmp-checkpoint-4").write_text("a file where a temporary folder should be: passed over, no error")
    assert checkpoint.prune(out, keep=1) == [out / "checkpoint-1", out / "checkpoint-2"]
    assert sorted(p.name for p in out.iterdir()) == [".tmp-checkpoint-4", "checkpoint-3"]


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


def test_a_crash_inside_the_swap_of_a_checkpoint_saved_twice_keeps_it(tmp_path):
    """Saving the same step again moves the old folder aside first; a kill right then must not lose it."""
    out = tmp_path / "run"
    script = f"""
import json, pathlib
from evertrain.train import checkpoint
out = pathlib.Path({str(out)!r})
for version in (1, 2):
    tmp = checkpoint.temp_path(out, 5)
    tmp.mkdir(parents=True)
    (tmp / "weights.bin").write_text(f"version {{version}}")
    checkpoint.commit(tmp, {{"global_step": 5}})
"""
    env = dict(os.environ, EVERTRAIN_FAULT="old-swap")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "checkpoint-5").exists()  # killed with the old one moved aside, the new one not in place
    checkpoint.remove_debris(out)  # what `train` and the daemon do first, holding the folder's lock
    ckpt = checkpoint.newest_complete(out)
    assert ckpt is not None and ckpt.step == 5 and (ckpt.path / "weights.bin").read_text() == "version 1"
