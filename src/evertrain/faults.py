"""Named fault points: where a test can make evertrain die as a power cut would, at a moment it chooses.

EVERTRAIN_FAULT=NAME[:N] makes the process SIGKILL itself the N-th time (default 1st) it reaches point NAME.
Nothing happens when the variable is unset: `hit` is then a dictionary lookup. The points:

    mid-step            after a micro-batch's backward pass, before the optimizer step
    checkpoint-write    inside a checkpoint save: weights written to the temporary folder, not committed
    after-rename        the checkpoint renamed into place, the parent folder not yet fsync'd
    old-swap            the same step saved again: the old folder moved aside, the new one not yet in place
    before-ledger-done  the daemon: a file's last checkpoint committed, the ledger not yet told "done"
    enqueue             intake: a file copied into queue/, its ledger row not yet committed
    prepare             a file's token store being built (its records opened, none read yet)

    EVERTRAIN_FAULT=mid-step:7 evertrain train --dataset F --output-dir D     # dies inside the 7th step
"""

from __future__ import annotations

import os
import signal

POINTS = ("mid-step", "checkpoint-write", "after-rename", "old-swap", "before-ledger-done", "enqueue", "prepare")
_hits: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("EVERTRAIN_FAULT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"EVERTRAIN_FAULT: unknown fault point {name!r} (known: {', '.join(POINTS)})")
    return name, int(count or 1)


def hit(name: str) -> None:
    """Called at a fault point; kills this process when EVERTRAIN_FAULT names it and its count is reached."""
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
