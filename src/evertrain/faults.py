"""Named fault points: where a test can make evertrain die as a power cut would, at a moment it chooses.

EVERTRAIN_FAULT=NAME[:N] makes the process SIGKILL itself the N-th time (default 1st) it reaches point NAME;
EVERTRAIN_FAULT=enospc:NAME[:N] makes that write raise OSError(ENOSPC) instead, as a full disk would (the
process lives on). Nothing happens when the variable is unset: `hit` is then a dictionary lookup. The points:

    mid-step            after a micro-batch's backward pass, before the optimizer step
    checkpoint-write    inside a checkpoint save: weights written to the temporary folder, not committed
    after-rename        the checkpoint renamed into place, the parent folder not yet fsync'd
    old-swap            the same step saved again: the old folder moved aside, the new one not yet in place
    before-ledger-done  the daemon: a file's last checkpoint committed, the ledger not yet told "done"
    enqueue             intake: a file copied into queue/, its ledger row not yet committed
    status-write        the daemon's status file, about to be replaced
    metrics-write       a step's line of logs/metrics.jsonl, about to be appended
    trace-write         a step's line of trace.jsonl, about to be appended
    ledger-write        a ledger row about to be updated
    prepare             a file's token store being built (its records opened, none read yet)
    feedback-assigned   `serve --collect-feedback`: records assigned to a file, the file not yet written
    feedback-dropped    `serve --collect-feedback`: the file renamed into inbox/, not yet marked dropped

    EVERTRAIN_FAULT=mid-step:7 evertrain train --dataset F --output-dir D     # dies inside the 7th step
    EVERTRAIN_FAULT=enospc:checkpoint-write evertrain train ...                # the first save finds no space
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = ("mid-step", "checkpoint-write", "after-rename", "old-swap", "before-ledger-done", "enqueue", "prepare",
          "status-write", "metrics-write", "trace-write", "ledger-write", "feedback-assigned", "feedback-dropped")
ENOSPC = "enospc:"
_hits: dict[str, int] = {}


def _armed() -> tuple[str, int, bool] | None:
    spec = os.environ.get("EVERTRAIN_FAULT")
    if not spec:
        return None
    full = spec.startswith(ENOSPC)
    name, _, count = spec.removeprefix(ENOSPC).partition(":")
    if name not in POINTS:
        raise ValueError(f"EVERTRAIN_FAULT: unknown fault point {name!r} (known: {', '.join(POINTS)})")
    return name, int(count or 1), full


def hit(name: str) -> None:
    """Called at a fault point; kills this process (or raises ENOSPC) when EVERTRAIN_FAULT names it and its
    count is reached."""
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == armed[1]:
        if armed[2]:
            raise OSError(errno.ENOSPC, f"No space left on device (EVERTRAIN_FAULT at {name})")
        os.kill(os.getpid(), signal.SIGKILL)
