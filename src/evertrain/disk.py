"""Disk full is a state, not a crash: what counts as "out of space", and the DiskFull error essential writes raise.

Essential writes (a checkpoint, the trace, the ledger) that run out of space raise DiskFull: the caller keeps the
newest complete checkpoint as the truth and waits (the daemon) or stops with exits.DISK_FULL (`train`).
Optional writes (the status file, metrics, snapshots, logs) go through `Degraded`: skipped, said once, retried.

    EVERTRAIN_FAULT=enospc:checkpoint-write evertrain train --dataset F --output-dir D; echo $?   # 5
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Libraries that lose the errno on the way up (torch.save, safetensors) still say it in words.
FULL_WORDS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


class DiskFull(OSError):
    """An essential write ran out of space in `path`; about `needed` bytes free would let it succeed."""

    def __init__(self, path: Path, needed: int | None = None):
        self.path, self.needed = Path(path), needed
        super().__init__(errno.ENOSPC, f"disk full in {self.path}"
                         + (f" ({needed} bytes needed)" if needed is not None else ""))

    @classmethod
    def of(cls, error: BaseException, where: Path, needed: int | None = None) -> "DiskFull":
        """`error` as a DiskFull: its own, or in the folder of the file it names, else in `where`."""
        if isinstance(error, DiskFull):
            return error
        path = Path(getattr(error, "filename", None) or where)
        return cls(path if path.is_dir() or not path.parent.exists() else path.parent, needed)

    def __str__(self) -> str:
        return self.strerror


def is_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was raised from) says the filesystem is out of space or quota."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if any(w in str(exc) for w in FULL_WORDS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


class Degraded:
    """Optional writes that may be skipped while the disk is full: each is said once, and again once it works."""

    def __init__(self, say):
        self.say, self.down = say, set()

    def attempt(self, what: str, write, default=None):
        """`write()`'s result; `default` (and a line the first time) if it ran out of space. Other errors
        propagate."""
        try:
            result = write()
        except Exception as e:
            if not is_full(e):
                raise
            if what not in self.down:
                self.down.add(what)
                self.say(f"evertrain: disk full: {what} not written ({e}); skipped until there is room")
            return default
        if what in self.down:
            self.down.discard(what)
            self.say(f"evertrain: {what} written again")
        return result


class Reserve:
    """A file of `size` bytes kept while there is room and given up the moment the disk is full, so that the
    daemon can still say so: write its status, fold its ledger's log, put a file back in the queue."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = Path(path), size

    @property
    def held(self) -> bool:
        return self.path.exists() and self.path.stat().st_size == self.size

    def hold(self) -> None:
        if self.held:
            return
        try:
            with open(self.path, "wb") as f:
                f.write(b"\0" * self.size)  # written, not a sparse truncate: the blocks must really be taken
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.path.unlink(missing_ok=True)
            if not is_full(e):
                raise

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
