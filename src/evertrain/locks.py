"""One evertrain process per folder: a lock the kernel drops when its holder dies, however it dies.

`train` holds OUTPUT_DIR/.evertrain.lock and the daemon WORKSPACE/.evertrain.lock for their whole life (under a
launcher, the main process alone). A second process is refused with the pid of the holder; a lock left by a
process that was killed holds nothing, so there is never a stale lock to clean up.

    evertrain train --dataset F --output-dir D & evertrain train --dataset F --output-dir D   # the second: exit 2
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".evertrain.lock"


class AlreadyRunning(RuntimeError):
    """Another live process holds the folder's lock."""


def hold(path: Path, what: str, advice: str) -> int:
    """Take the lock at `path` for the life of this process (the returned fd); AlreadyRunning if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another evertrain {what} (pid {pid}) is running on {path.parent}; {advice}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def holder(path: Path) -> int | None:
    """The pid of the live process holding the lock at `path` (-1 if unreadable), or None when none holds it."""
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_main_launch_process() -> bool:
    """True unless this is a non-main process of `accelerate launch` / `torchrun` (they set RANK)."""
    return os.environ.get("RANK", "0") == "0"
