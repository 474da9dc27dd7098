"""Disk full is a state of the daemon, not a crash: entering it, waiting in it, and what keeps a file from starting.

Out of space anywhere (a checkpoint, the trace, the ledger, a token store), the file in training goes back to the
queue at its last committed cursor, the status says where and how much room is needed, and the daemon waits; when
there is room again it starts a fresh session from the newest complete checkpoint (service._start): what was
trained after it is trained again, exactly once.

    EVERTRAIN_FAULT=enospc:checkpoint-write evertrain run DIR      # waits, then resumes by itself
"""

from __future__ import annotations

import shutil

from evertrain import disk
from evertrain.daemon import controls
from evertrain.train import checkpoint
from evertrain.train.saving import checkpoint_bytes


def out_of_space(svc, error: BaseException) -> None:
    """Enter the disk-full state: no temp left behind, the status says where and how much, the session stale."""
    svc.reserve.release()
    checkpoint.remove_debris(svc.ws.model_dir)
    try:
        svc.ledger.shrink_wal()
    except Exception as e:  # noqa: BLE001 - the room it would give is a nicety; a busy or full ledger is not
        if not (disk.is_full(e) or "locked" in str(e)):
            raise
    need = (svc.daemon.disk_margin_bytes + svc.reserve.size
            + (checkpoint_bytes(svc.session) if svc.session else 0))
    svc.disk_full = disk.DiskFull(disk.DiskFull.of(error, svc.ws.model_dir).path, need)
    svc.board.set(state="waiting", current_file=None, current_file_id=None, alert=f"waiting: {svc.disk_full}")


def wait_for_room(svc) -> bool:
    """Wait for space before the session could start (polls: no event says a disk has room). True: stop instead
    (a signal, `evertrain stop`)."""
    while True:
        if svc.stop.is_set() or controls.read(svc.ws).stop:
            return True
        if disk.free_bytes(svc.disk_full.path) >= svc.disk_full.needed:
            return False
        svc.stop.wait(svc.daemon.poll_seconds)


def problem(svc) -> str | None:
    need = checkpoint_bytes(svc.session)
    margin = svc.daemon.disk_margin_bytes
    if svc.disk_full is not None:  # the write that failed may be elsewhere than the checkpoints (the ledger)
        free = min(disk.free_bytes(svc.disk_full.path), disk.free_bytes(svc.ws.model_dir))
        if free < svc.disk_full.needed:
            return f"waiting: {svc.disk_full}; training resumes by itself when there is room"
        return None
    free = shutil.disk_usage(svc.ws.model_dir).free
    if free < need + margin:
        return (f"disk low: {free} bytes free in {svc.ws.model_dir}, a checkpoint needs about {need} plus a "
                f"margin of {margin} (disk_margin_bytes); the queue waits until there is room")
    return None
