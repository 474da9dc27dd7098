"""Feedback becomes training data: the answers `evertrain serve --collect-feedback` keeps, the ratings and
corrections posted on them, and the files they become in the workspace's inbox.

    evertrain serve WS --collect-feedback --feedback-every 50 --feedback-minutes 60
    curl -s http://127.0.0.1:8000/v1/feedback -H 'Content-Type: application/json' \\
        -d '{"id": "chatcmpl-...", "rating": "bad", "correction": "Lima."}'

WS/feedback/feedback.sqlite (SQLite in WAL mode; the server is its one writer, the dashboard reads it read-only):
  answers  the answers served (messages or prompt, the answer, its version), the newest within the bounds
  records  each rating or correction not yet dropped: the JSONL line it becomes, made when it was posted
  files    every file of feedback: its name, what it holds, when it was dropped into inbox/

Collection: once `every` records wait, or the oldest has waited `minutes`, the waiting records are assigned to
their files (names fixed, in one transaction) BEFORE anything is written. Each file is then written from its
records (the same bytes every time) to a temporary name in WS/feedback/, renamed into inbox/, and marked dropped
(its records deleted). A crash in between leaves a file assigned and not marked: the next start drops it again,
with the same bytes, and the daemon trains it once (a second copy of trained content is a duplicate in its
ledger).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from evertrain import faults, locks
from evertrain.daemon.ledger import read_only
from evertrain.files import fsync_dir
from evertrain.runs import Workspace
from evertrain.serve.api import BadRequest
from evertrain.serve.verdicts import correction_line, file_bytes, parse_feedback, rating_line

log = logging.getLogger("evertrain.serve")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY,             -- arrival order: the oldest go first
    id TEXT NOT NULL UNIQUE,             -- the response's id (chatcmpl-..., cmpl-...)
    messages TEXT,                       -- the served messages as JSON (a chat answer), else NULL
    prompt TEXT,                         -- the prompt of a /v1/completions answer, else NULL
    answer TEXT NOT NULL,
    version TEXT,
    step INTEGER,
    served_at REAL NOT NULL,
    rating TEXT,                         -- good | bad, the latest given
    rating_file TEXT,                    -- the file its rating went into (NULL: not collected yet)
    correction_file TEXT
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    answer_id TEXT NOT NULL,
    kind TEXT NOT NULL,                  -- rating | correction
    good INTEGER,                        -- a rating: 1 good, 0 bad
    line TEXT NOT NULL,                  -- the JSONL line it becomes
    received_at REAL NOT NULL,
    file TEXT,                           -- the file it is assigned to (NULL: waiting)
    UNIQUE (answer_id, kind)
);
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    batch INTEGER NOT NULL,
    kind TEXT NOT NULL,                  -- ratings | corrections
    records INTEGER NOT NULL,
    good INTEGER NOT NULL,
    bad INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    dropped_at REAL                      -- NULL: assigned, not yet in inbox/
);
"""
FILE_KIND = {"rating": "ratings", "correction": "corrections"}
PRUNE_SHARE = 64          # over the size cap, this share of the answers goes at a time, oldest first
RETRY_SECONDS = 30.0      # a drop that failed (a full disk) is tried again this often


class FeedbackRefused(ValueError):
    """Feedback cannot be collected here: no workspace (its files go into the inbox the daemon trains), or a log
    that cannot be opened."""


class Log:
    """The feedback log of the workspace `root`; starts its collection thread. `every`: records that make a
    file; `minutes`: the longest a record waits; `max_bytes`, `max_answers`: the bounds of what is kept."""

    def __init__(self, root: Path, *, every: int = 50, minutes: float = 60.0, max_bytes: int = 100 << 20,
                 max_answers: int = 100_000):
        self.ws = Workspace(root)
        if not self.ws.config_file.is_file():
            raise FeedbackRefused(f"{self.ws.root} is not a workspace (no {self.ws.config_file.name}): feedback "
                                  "becomes files in a workspace's inbox/ for `evertrain run` to train; serve a "
                                  "workspace, or leave out --collect-feedback")
        self.every, self.minutes, self.max_bytes, self.max_answers = every, minutes, max_bytes, max_answers
        self.lock = threading.RLock()
        try:
            self.ws.feedback.mkdir(exist_ok=True)
            self.lock_fd = locks.hold(self.ws.feedback / locks.LOCK_NAME, "server collecting feedback",
                                      "one server collects the feedback of a workspace")
        except OSError as e:
            raise FeedbackRefused(f"{self.ws.feedback}: cannot be written ({e.strerror or e})") from None
        try:
            self.db = self._open()
        except (OSError, sqlite3.Error) as e:
            os.close(self.lock_fd)
            raise FeedbackRefused(f"{self.ws.feedback_log}: the feedback log cannot be opened ({e}); move it "
                                  "aside to start a new one") from None
        for tmp in self.ws.feedback.glob(".drop-*.tmp"):  # a crashed drop's half-written copy
            tmp.unlink(missing_ok=True)
        self.kept = self.db.execute("SELECT count(*) FROM answers").fetchone()[0]
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.collect(force=False)  # first what a crash left assigned and not dropped
        self.thread = threading.Thread(target=self._run, name="evertrain-serve-feedback", daemon=True)
        self.thread.start()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.ws.feedback_log, isolation_level=None, check_same_thread=False, timeout=30)
        db.row_factory = sqlite3.Row
        # The write-ahead log stays a small share of the cap: it is emptied into the database every few pages.
        pages = max(4, self.max_bytes // 4096 // 8)
        try:
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"wal_autocheckpoint={pages}",
                           f"journal_size_limit={pages * 4096}"):
                db.execute(f"PRAGMA {pragma}")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    # ------------------------------------------------------------------------------------------- answers

    def served(self, response_id: str, *, messages, prompt, answer: str, version: str, step) -> None:
        """Keep one answer (api.py calls this as each answer ends); the oldest go past the bounds. A log that
        cannot be written (a full disk) costs the answer nothing: it only cannot be rated."""
        try:
            with self.lock, self._transaction():
                self.kept += self.db.execute(
                    "INSERT OR IGNORE INTO answers (id, messages, prompt, answer, version, step, served_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (response_id, json.dumps(messages, ensure_ascii=False) if messages is not None else None,
                     prompt, answer, version, step, time.time())).rowcount
                self._prune()
        except (sqlite3.Error, OSError) as e:
            log.warning("serve: answer %s not kept in the feedback log: %s", response_id, e)

    def _prune(self) -> None:
        """Delete the oldest answers that no waiting record needs until the log is within both bounds."""
        while self.kept > self.max_answers or self._used_bytes() > self.max_bytes:
            n = max(self.kept // PRUNE_SHARE, self.kept - self.max_answers, 1)
            gone = self.db.execute("DELETE FROM answers WHERE seq IN (SELECT seq FROM answers a WHERE NOT EXISTS "
                                   "(SELECT 1 FROM records r WHERE r.answer_id = a.id) ORDER BY seq LIMIT ?)",
                                   (n,)).rowcount
            self.kept -= gone
            if gone == 0:  # what is left waits to be collected: the next collection frees it
                return

    def _used_bytes(self) -> int:
        page_size, pages, free = (self.db.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_size", "page_count", "freelist_count"))
        return (pages - free) * page_size

    # ------------------------------------------------------------------------------------------- feedback

    def rate(self, body: dict) -> dict:
        """POST /v1/feedback: {"id", "rating": "good" | "bad", "correction": "..."} -> what became of it."""
        response_id, rating, correction = parse_feedback(body)
        with self.lock:
            row = self.db.execute("SELECT * FROM answers WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                raise BadRequest(f"no answer {response_id!r} is kept: this server never gave it, or it has expired "
                                 f"from the feedback log (the newest {self.max_answers} answers within "
                                 f"{self.max_bytes / 2**20:g} MiB are kept)", "id", "answer_not_found", status=404,
                                 kind="not_found_error")
            new = []
            if rating is not None:
                new.append(("rating", rating == "good", rating_line(row, rating == "good")))
            if correction is not None:
                new.append(("correction", None, correction_line(row, correction)))
            for kind, _good, _line in new:
                if row[f"{kind}_file"]:
                    raise BadRequest(f"the {kind} of {response_id!r} was already collected into "
                                     f"{row[f'{kind}_file']}: an answer's {kind} is trained once; only one still "
                                     "waiting can be replaced", kind, "already_collected", status=409)
            with self._transaction(durable=True):
                replaced = [kind for kind, _g, _l in new if self.db.execute(
                    "DELETE FROM records WHERE answer_id = ? AND kind = ?", (response_id, kind)).rowcount]
                for kind, good, line in new:
                    self.db.execute("INSERT INTO records (answer_id, kind, good, line, received_at) "
                                    "VALUES (?, ?, ?, ?, ?)", (response_id, kind, good, line, time.time()))
                if rating is not None:
                    self.db.execute("UPDATE answers SET rating = ? WHERE id = ?", (rating, response_id))
            dropped = self.collect(force=False)
            waiting = self.db.execute("SELECT count(*) FROM records WHERE file IS NULL").fetchone()[0]
        self.wake.set()
        return {"object": "feedback", "id": response_id, "rating": rating, "correction": correction is not None,
                "replaced": replaced, "waiting": waiting, "dropped": dropped}

    # ------------------------------------------------------------------------------------------- collection

    def collect(self, force: bool = True) -> list[str]:
        """Drop what is due (everything waiting when `force`) into inbox/, and every file assigned before and
        not yet dropped; the names of the files dropped now. A drop that fails is tried again later."""
        with self.lock:
            if force or self._due() <= 0:
                self._assign()
            # A batch's ratings before its corrections (the order they were assigned in, FILE_KIND's): the daemon
            # trains files in the order they arrive, and a correction is the last word on an answer.
            names = [r[0] for r in self.db.execute(
                "SELECT name FROM files WHERE dropped_at IS NULL ORDER BY batch, kind = 'corrections', name")]
            dropped = []
            for name in names:
                try:
                    self._drop(name)
                except OSError as e:
                    log.warning("serve: could not drop %s into %s (tried again in %gs): %s", name, self.ws.inbox,
                                RETRY_SECONDS, e)
                    break
                dropped.append(name)
            return dropped

    def _due(self) -> float:
        """Seconds until the waiting records are due to be collected (<= 0: now; inf: nothing waits)."""
        waiting, oldest = self.db.execute("SELECT count(*), min(received_at) FROM records WHERE file IS NULL"
                                          ).fetchone()
        if not waiting:
            return float("inf")
        if waiting >= self.every:
            return 0.0
        return oldest + self.minutes * 60 - time.time()

    def _assign(self) -> None:
        """Every waiting record into this batch's files, one per kind; their names fixed before any is written."""
        with self._transaction(durable=True):
            waiting = self.db.execute("SELECT * FROM records WHERE file IS NULL ORDER BY id").fetchall()
            if not waiting:
                return
            batch = self.db.execute("SELECT coalesce(max(batch), 0) + 1 FROM files").fetchone()[0]
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for kind, plural in FILE_KIND.items():
                records = [r for r in waiting if r["kind"] == kind]
                if not records:
                    continue
                name = f"feedback-{stamp}-{batch:04d}-{plural}.jsonl"
                body = file_bytes(records)
                good = sum(r["good"] == 1 for r in records)
                self.db.execute("INSERT INTO files (name, batch, kind, records, good, bad, bytes, sha256, assigned_at)"
                                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (name, batch, plural, len(records), good, len(records) - good if kind == "rating"
                                 else 0, len(body), hashlib.sha256(body).hexdigest(), time.time()))
                ids = [r["id"] for r in records]
                marks = ",".join("?" * len(ids))
                self.db.execute(f"UPDATE records SET file = ? WHERE id IN ({marks})", (name, *ids))
                self.db.execute(f"UPDATE answers SET {kind}_file = ? WHERE id IN "
                                f"(SELECT answer_id FROM records WHERE id IN ({marks}))", (name, *ids))
        faults.hit("feedback-assigned")

    def _drop(self, name: str) -> None:
        """Write the file `name` from its records, rename it into inbox/, and mark it dropped."""
        expected = self.db.execute("SELECT sha256 FROM files WHERE name = ?", (name,)).fetchone()[0]
        body = file_bytes(self.db.execute("SELECT line FROM records WHERE file = ? ORDER BY id", (name,)).fetchall())
        if hashlib.sha256(body).hexdigest() != expected:  # its records are fixed once assigned
            raise RuntimeError(f"feedback: {name} would not have the bytes it was assigned (its records changed)")
        tmp = self.ws.feedback / f".drop-{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        self.ws.inbox.mkdir(exist_ok=True)
        os.replace(tmp, self.ws.inbox / name)  # the same bytes again after a crash: the daemon's duplicate
        fsync_dir(self.ws.inbox)
        faults.hit("feedback-dropped")
        with self._transaction(durable=True):
            self.db.execute("UPDATE files SET dropped_at = ? WHERE name = ?", (time.time(), name))
            self.db.execute("DELETE FROM records WHERE file = ?", (name,))
            self._prune()
        log.info("serve: feedback into %s", self.ws.inbox / name)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                due = self._due()
                late = self.db.execute("SELECT 1 FROM files WHERE dropped_at IS NULL").fetchone() is not None
            self.wake.wait(min(max(due, 0.01), RETRY_SECONDS if late else 3600.0))
            self.wake.clear()
            if self.stop.is_set():
                return
            try:
                self.collect(force=False)
            except Exception as e:  # noqa: BLE001 - answering goes on; the records wait for the next try
                log.warning("serve: feedback collection failed (tried again later): %s", e)

    @contextmanager
    def _transaction(self, durable: bool = False):
        """One write transaction; `durable`: on disk at its end (what was acknowledged, what names a file)."""
        if durable:
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        """Stop collecting; what waits is dropped now (a stopped server takes no more feedback to add to it)."""
        self.stop.set()
        self.wake.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(10)
        with self.lock:
            try:
                self.collect(force=True)
            except Exception as e:  # noqa: BLE001 - kept in the log: the next start drops it
                log.warning("serve: the feedback still waiting stays in %s for the next start: %s",
                            self.ws.feedback_log, e)
            self.db.close()
        os.close(self.lock_fd)


# ------------------------------------------------------------------------------------------------- readers

def summary(root: Path, shown: int = 100) -> dict | None:
    """What the feedback log of the workspace `root` holds, read-only (the dashboard), with its newest `shown`
    files; None when it has none."""
    path = Workspace(root).feedback_log
    if not path.is_file():
        return None
    try:
        with read_only(path) as db:
            answers, oldest = db.execute("SELECT count(*), min(served_at) FROM answers").fetchone()
            waiting = {(r["kind"], r["good"]): r["n"] for r in db.execute(
                "SELECT kind, good, count(*) AS n FROM records WHERE file IS NULL GROUP BY kind, good")}
            total = db.execute("SELECT count(*), coalesce(sum(good), 0), coalesce(sum(bad), 0), coalesce(sum("
                               "CASE WHEN kind = 'corrections' THEN records ELSE 0 END), 0) FROM files").fetchone()
            files = [dict(r) for r in db.execute("SELECT * FROM files ORDER BY batch DESC, name DESC LIMIT ?",
                                                 (shown,))][::-1]
    except sqlite3.Error as e:
        return {"problem": f"{path}: {e}", "files": []}
    rated = {good: waiting.get(("rating", good), 0) for good in (1, 0)}
    return {"answers": answers, "oldest_answer_at": oldest, "bytes": _size(path),
            "ratings": {"good": total[1] + rated[1], "bad": total[2] + rated[0]},
            "corrections": total[3] + waiting.get(("correction", None), 0),
            "waiting": {"ratings": rated[1] + rated[0], "corrections": waiting.get(("correction", None), 0)},
            "files_total": total[0], "files": files}


def _size(path: Path) -> int:
    """The log's bytes on disk, its write-ahead log included."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
