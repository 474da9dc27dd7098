"""Intake: take complete files from inbox/ (or `evertrain add`) into queue/, each under a unique name.

A file is taken once its size and mtime have not changed for `stable_seconds`, and, if it looks cut short (a
line-based file whose last byte is not a newline, a .json array without its closing `]`, a Parquet file without
its footer), once it ends cleanly or has not changed for `incomplete_timeout` (a slow writer pausing mid-line is
waited for; a file that stays cut is then validated as it is). A whole last line that does not parse is bad data,
not a writer still at work: it fails validation once the file is stable. Hidden names, `*.tmp` and `*.part` are
never taken (the safe way to drop a file: write it elsewhere, then `mv` it into inbox/).
Sub-folders are walked; a top folder named low, normal, high or urgent gives its files that priority.
Symbolic links, fifos and other non-regular entries are moved (not followed) to failed/ with the reason.
Watchdog events only wake the intake thread up; the scan decides. The daemon's `Intake` scans in its own thread
with its own ledger connection, so hashing a big file never delays an optimizer step.

    evertrain add FILE --priority urgent DIR     # copy a file in (it is queued at once)
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from evertrain import disk, faults
from evertrain.daemon.ledger import Ledger
from evertrain.daemon.workspace import PRIORITIES, printable, safe_name
from evertrain.files import sha256_file, write_text_atomic
from evertrain.runs import Workspace
from evertrain.data.containers import accepted_text, kind_of

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
MAX_DEPTH = 8
TOO_DEEP = "too deep"  # a folder at MAX_DEPTH: rejected whole, with its files named, never silently passed over


@dataclass
class Seen:
    size: int
    mtime_ns: int
    since: float


class Inbox:
    def __init__(self, ws: Workspace, ledger: Ledger, stable_seconds: float, *, watch: bool = True, say=print,
                 incomplete_timeout: float = 0.0):
        self.ws, self.ledger, self.stable, self.say = ws, ledger, stable_seconds, say
        self.incomplete_timeout = incomplete_timeout
        self.seen: dict[str, Seen] = {}
        self.waiting: list[str] = []  # stable files that look cut short, being waited for: 'NAME (N bytes so far)'
        self.wake = threading.Event()  # set by file events (and by signals) to cut a wait short
        self.observer = None
        if watch:
            self.observer = _start_watching(ws.inbox, self.wake, say)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)

    def scan(self) -> tuple[list[int], float | None]:
        """Take every stable file; return the new ledger ids and when the next waiting file may be stable."""
        self.wake.clear()
        taken, ready, now, present, next_due, waiting = [], [], time.monotonic(), set(), None, []
        for path, priority, kind in walk(self.ws.inbox):
            rel = path.relative_to(self.ws.inbox).as_posix()
            if kind == TOO_DEEP:
                taken.append(self.reject(path, rel, f"{printable(rel)}: a folder more than {MAX_DEPTH} folders "
                                                    f"deep in inbox/; its files were not taken ({_some_files(path)}); "
                                                    "move them higher up in inbox/"))
                continue
            if kind != "file":
                taken.append(self.reject(path, rel, f"{printable(rel)}: {kind}; evertrain takes only regular "
                                                    "files and never follows links (copy the file in instead)"))
                continue
            if kind_of(path.name) is None:
                taken.append(self.reject(path, rel, f"{printable(rel)}: not a dataset file; evertrain takes "
                                                    f"{accepted_text()}"))
                continue
            try:
                st = path.stat(follow_symlinks=False)
            except OSError:
                continue  # gone between listing and stat
            present.add(rel)
            seen = self.seen.get(rel)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self.seen[rel] = seen = Seen(st.st_size, st.st_mtime_ns, now)
            due = seen.since + self.stable
            if now >= due and now - seen.since < self.incomplete_timeout:
                complete = looks_complete(path)
                try:
                    again = path.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone while its end was read
                if (again.st_size, again.st_mtime_ns) != (seen.size, seen.mtime_ns):
                    # Written while its end was read: that end says nothing; it must be stable again first.
                    self.seen[rel] = seen = Seen(again.st_size, again.st_mtime_ns, now)
                    due = seen.since + self.stable
                elif not complete:  # its size in the note: the status changes as the writer goes on
                    waiting.append(f"{printable(rel)} ({seen.size} bytes so far)")
                    due = seen.since + self.incomplete_timeout  # or sooner: the writer's next change wakes the scan
            if now >= due:
                self.seen.pop(rel)
                ready.append((st.st_mtime_ns, rel, path, priority))
            else:
                next_due = due if next_due is None else min(next_due, due)
        # Files that became stable in the same scan are queued in the order they arrived (last written).
        for _mtime, rel, path, priority in sorted(ready):
            file_id = self.take(path, rel, priority)
            if file_id is not None:
                taken.append(file_id)
        for rel in set(self.seen) - present:
            del self.seen[rel]
        self.waiting = waiting
        return taken, next_due

    def take(self, path: Path, rel: str, priority: str) -> int | None:
        try:
            sha, size = sha256_file(path), path.stat().st_size
        except OSError as e:
            return self.reject(path, rel, f"{printable(rel)}: cannot be read: {e.strerror or e}")
        file_id = enqueue(self.ws, self.ledger, path, printable(rel), sha=sha, size=size, priority=priority,
                          move=True)
        self.say(f"evertrain: took {printable(rel)} ({size} bytes, {priority}) as queue/{self.ledger.get(file_id)['name']}")
        return file_id

    def reject(self, path: Path, rel: str, reason: str) -> int:
        file_id = self.ledger.add_file(printable(rel), sha256=None, size=None, state="failed", error=reason)
        name = f"{file_id:06d}-{safe_name(path.name)}"
        target = self.ws.failed / name
        try:
            os.rename(path, target)
        except OSError as e:
            reason += f" (and it could not be moved out of the inbox: {e.strerror or e}; remove it by hand)"
        self.ledger.update(file_id, name=name, error=reason, finished_at=time.time())
        write_error(target, reason)
        self.say(f"evertrain: rejected {reason}")
        return file_id


class Intake:
    """The inbox, scanned on every file event and every poll by a thread of its own (and by the daemon between
    files, through `scan`); scans never overlap. `arrived` is set whenever files were taken."""

    def __init__(self, ws: Workspace, daemon, arrived: threading.Event, say=print):
        self.ledger = Ledger(ws.ledger_path)  # its own connection: its transactions never mix with the daemon's
        self.inbox = Inbox(ws, self.ledger, daemon.stable_seconds, watch=daemon.watch, say=say,
                           incomplete_timeout=daemon.incomplete_timeout)
        self.poll, self.arrived, self.say = daemon.poll_seconds, arrived, say
        self.lock, self.closed = threading.Lock(), threading.Event()
        self.degraded = disk.Degraded(say)  # a full disk: files wait in inbox/ (nothing is half-taken)
        self.thread = threading.Thread(target=self._watch, daemon=True, name="evertrain-intake")
        self.thread.start()

    def scan(self) -> tuple[list[int], float | None]:
        """Inbox.scan, once at a time: the new ledger ids and when the next waiting file may be stable."""
        with self.lock:
            taken, due = self.degraded.attempt("intake (taking files from inbox/)", self.inbox.scan, ([], None))
        if taken:
            self.arrived.set()
        return taken, due

    def _watch(self) -> None:
        while not self.closed.is_set():
            self.inbox.wake.wait(self.poll)
            if self.closed.is_set():
                break
            try:
                self.scan()
            except Exception as e:  # noqa: BLE001 - the daemon's own scan between files reports it again
                self.say(f"evertrain: intake: {type(e).__name__}: {e}")
                self.closed.wait(self.poll)

    def close(self) -> None:
        self.closed.set()
        self.inbox.wake.set()
        self.thread.join(timeout=30)
        self.inbox.close()
        self.ledger.close()


def looks_complete(path: Path) -> bool:
    """Whether a file's end says its writer finished: cheap, from its last bytes only. A line-based file is whole
    once it ends with a newline (a writer never leaves one after half a record, so a whole line that does not
    parse is bad data, failed by validation with its number, not waited for); a .json array once it ends with its
    `]`; a Parquet file once it has its footer. Compressed files have no cheap check (their stream is checked in
    full at validation), nor have plain text files (.txt, .md: editors often leave no final newline); stability
    alone decides for them."""
    kind = kind_of(path.name)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return True  # nothing written at all: validation says "empty file"
            if kind == "parquet":
                f.seek(max(0, size - 4))
                return f.read(4) == b"PAR1"
            if kind == "json":
                return _last_solid_byte(f, size) == b"]"
            if kind in ("jsonl", "csv", "tsv"):
                f.seek(size - 1)
                return f.read(1) == b"\n"
            return True
    except OSError:
        return True  # let validation say what is wrong with it


def _last_solid_byte(f, size: int) -> bytes:
    """The last byte of a file that is not white space (b"" when there is none), read backwards."""
    pos = size
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        body = f.read(step).rstrip(b"\r\n\t ")
        if body:
            return body[-1:]
    return b""


def walk(root: Path, depth: int = 0, priority: str = "normal"):
    """(path, priority, kind) for every entry worth a look below `root`, links never followed."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
            continue
        path = Path(entry.path)
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            if depth < MAX_DEPTH:
                sub_priority = name if depth == 0 and name in PRIORITIES else priority
                yield from walk(path, depth + 1, sub_priority)
            else:
                yield path, priority, TOO_DEEP
        elif stat.S_ISREG(mode):
            yield path, priority, "file"
        elif stat.S_ISLNK(mode):
            yield path, priority, "a symbolic link"
        else:
            yield path, priority, "not a regular file (a fifo, socket or device)"


def enqueue(ws: Workspace, ledger: Ledger, src: Path, original_name: str, *, sha: str, size: int,
            priority: str, move: bool) -> int:
    """Put `src` into queue/ under a unique name and record it queued; never overwrites anything.

    A copy goes to a hidden temporary name first (debris of a crashed copy is removed at start-up); the
    final rename and the ledger row are one transaction, and a file found in queue/ without a row is adopted.
    """
    staged = src
    if not move:
        staged = ws.queue / f".copying-{os.getpid()}-{time.monotonic_ns()}"
        shutil.copyfile(src, staged)
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())
    db = ledger.db
    db.execute("BEGIN IMMEDIATE")
    try:
        file_id = ledger.add_file(original_name, sha256=sha, size=size, priority=priority)
        name = f"{file_id:06d}-{safe_name(Path(original_name).name)}"
        ledger.update(file_id, name=name)
        faults.hit("enqueue")
        os.rename(staged, ws.queue / name)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        if not move:
            staged.unlink(missing_ok=True)
        raise
    return file_id


def adopt_orphans(ws: Workspace, ledger: Ledger, say=print) -> None:
    """Files in queue/ the ledger does not know (a crash between rename and commit): queue them; and
    remove half-copied debris."""
    known = ledger.known_names()
    for p in sorted(ws.queue.iterdir()):
        if p.name.startswith(".copying-"):
            p.unlink(missing_ok=True)
        elif not p.name.startswith(".") and p.name not in known and p.is_file() and not p.is_symlink():
            original = p.name.split("-", 1)[-1]
            enqueue(ws, ledger, p, original, sha=sha256_file(p), size=p.stat().st_size, priority="normal",
                    move=True)
            say(f"evertrain: queue/{p.name} was not in the ledger; queued it again")


def _some_files(folder: Path, show: int = 3) -> str:
    names = sorted(str(Path(d, f).relative_to(folder.parent)) for d, _dirs, files in os.walk(folder) for f in files)
    if not names:
        return "it holds no file"
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(printable(n) for n in names[:show]) + more


def write_error(target: Path, reason: str) -> None:
    write_text_atomic(target.with_name(target.name + ".error.txt"), reason.rstrip() + "\n")


def _start_watching(folder: Path, wake: threading.Event, say):
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        # Stopping the observer while an event is in flight logs this harmless error at every exit.
        emitter_log = logging.getLogger("watchdog.observers.inotify")
        if not any(isinstance(f, _QuietStop) for f in emitter_log.filters):
            emitter_log.addFilter(_QuietStop())
        observer = Observer()
        observer.daemon = True
        observer.schedule(Wake(), str(folder), recursive=True)
        observer.start()
        return observer
    except Exception as e:  # e.g. the inotify watch limit: polling still works
        say(f"evertrain: file events unavailable ({e}); polling the inbox instead")
        return None


class _QuietStop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in str(record.msg)
