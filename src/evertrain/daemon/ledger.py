"""The ledger: one SQLite database (WAL) recording every file, checkpoint, evaluation and pin of a workspace.

What was TRAINED is decided by the newest complete checkpoint (its TrainingProgress), never by the ledger: at
start-up `reconcile` makes the ledger agree with it, so a kill -9 at any moment loses no file, marks no
unfinished file done, and trains none twice.

File states:
    queued      waiting in queue/ (steps_trained > 0: interrupted part-way, it resumes at its cursor)
    training    the daemon is training it now
    done        every step trained and checkpointed; the file is in done/
    duplicate   its content (sha256) was already trained in this run; not trained again; in done/
    skipped     `evertrain skip` ended it early; steps_trained says what it got; in done/
    failed      rejected (bad content, NaN loss, failed guard, unreadable, or quarantined: the process died
                twice while preparing it); in failed/ with NAME.error.txt
    rejected    trained, then undone by the forgetting gate (gate.py: forgetting_action rollback or retry): the
                run went back to the checkpoint before it; in rejected/ with NAME.error.txt saying which
                held-out losses rose; `forgetting` holds the verdict. A person decides: drop it again with
                forgetting_action alert to train it anyway

Durability: WAL with synchronous=FULL, a quick integrity check at every open, and a copy of the ledger inside
every checkpoint (`backup`). A damaged ledger, or a missing one in a workspace that has a history, is refused
(LedgerError, exit 2) with the command that rebuilds it; only a workspace without any history gets a new one.

    evertrain status DIR --json       # every row of the files table, and the status
    evertrain repair DIR              # rebuild a lost or damaged ledger (daemon/repair.py)
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from evertrain import faults
from evertrain.config import ConfigError
from evertrain.daemon.workspace import PRIORITIES, place
from evertrain.runs import Workspace
from evertrain.train import checkpoint

STATES = ("queued", "training", "done", "duplicate", "skipped", "failed", "rejected")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order
    original_name TEXT NOT NULL,            -- as dropped (path below inbox/, or the path given to `add`)
    name TEXT,                              -- unique name in queue/, done/ or failed/: <id>-<safe name>
    sha256 TEXT,
    size INTEGER,
    priority TEXT NOT NULL DEFAULT 'normal',
    state TEXT NOT NULL,
    format TEXT, examples INTEGER, tokens INTEGER,
    expected_steps INTEGER,
    steps_trained INTEGER NOT NULL DEFAULT 0,
    first_step INTEGER, last_step INTEGER,  -- global steps of its first and last optimizer step
    held_out TEXT,                          -- JSON list of 0-based line numbers never trained (evaluated)
    replayed INTEGER NOT NULL DEFAULT 0,    -- examples of earlier files replayed into its steps
    progress_index INTEGER,                 -- len(progress.files) when it started: finds its record again
    duplicate_of INTEGER,
    arrived_at REAL, started_at REAL, finished_at REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,    -- preparations begun and not lived through (a crash leaves it counted)
    forgetting TEXT                         -- JSON: the forgetting gate's verdict on it (gate.judge), if any
);
CREATE TABLE IF NOT EXISTS checkpoints (
    step INTEGER PRIMARY KEY, name TEXT NOT NULL, created_at REAL, deleted_at REAL
);
CREATE TABLE IF NOT EXISTS evals (           -- a copy of logs/evals.jsonl, one row per evaluated file
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER,
    file_id INTEGER, sha256 TEXT,            -- the evaluated file
    kind TEXT,                               -- before (its own training) | after (a file finished) | periodic
    after_sha256 TEXT,                       -- the file that had just finished, for kind = after
    examples INTEGER, tokens INTEGER, loss REAL, created_at REAL
);
CREATE TABLE IF NOT EXISTS pins (name TEXT PRIMARY KEY, step INTEGER, pinned_at REAL);
CREATE TABLE IF NOT EXISTS events (          -- what changed the run's course: a repair, a start from the base
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, kind TEXT NOT NULL, text TEXT
);
"""
COPY_NAME = "ledger.sqlite"  # the ledger's copy inside every checkpoint the daemon writes
ID_NAME = re.compile(r"^(\d{6,})-(.+)$")  # <id>-<safe name>: the names of queue/, done/, failed/


class LedgerError(ConfigError):
    """The ledger is damaged, or missing where a history exists: refused with the command that repairs it."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}; nothing was changed; repair it with: evertrain repair {path.parent}")


@contextmanager
def _damage_as_ledger_error(path: Path):
    try:
        yield
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise  # busy beyond the timeout, not damaged
        raise LedgerError(path, f"is damaged ({e})") from None


def history(ws: Workspace) -> str:
    """What on disk shows that the workspace has run before ('' for a new one): a ledger must exist then."""
    found = []
    ckpts = [p for p in ws.model_dir.glob("checkpoint-*") if p.is_dir()] if ws.model_dir.is_dir() else []
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s) in {ws.model_dir.name}/")
    for folder in (ws.queue, ws.done, ws.failed):
        n = sum(not p.name.startswith(".") for p in folder.iterdir()) if folder.is_dir() else 0
        if n:
            found.append(f"{n} file(s) in {folder.name}/")
    return ", ".join(found)


class Ledger:
    def __init__(self, path: Path):
        path = Path(path)
        if path.exists():
            # Checked read-only first: closing a writable connection checkpoints the WAL into a damaged file.
            with _damage_as_ledger_error(path):
                check = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
                try:
                    problems = [r[0] for r in check.execute("PRAGMA quick_check")]
                finally:
                    check.close()
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("; ".join(problems[:3]))
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            with _damage_as_ledger_error(path):
                self._open()
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def open(cls, ws: Workspace) -> "Ledger":
        """The workspace's ledger; a new one only where nothing shows a history that it would forget."""
        path = ws.ledger_path
        # SQLite takes an empty file for a new database: for a truncated ledger that is a silent new history.
        if not path.exists() or path.stat().st_size == 0:
            found = history(ws)
            if found:
                raise LedgerError(path, f"is {'missing' if not path.exists() else 'empty'}, but the workspace has "
                                        f"a history ({found}): a new ledger would restart ids and forget what "
                                        "was trained")
        ledger = cls(path)
        unknown = ledger.unknown_on_disk(ws)
        if unknown:
            ledger.close()
            # An old copy put back, or lost transactions: going on would reuse those ids for other files.
            raise LedgerError(path, f"is behind the disk: it has no row for {unknown[0]}"
                                    + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
        return ledger

    def unknown_on_disk(self, ws: Workspace) -> list[str]:
        """Files in done/, failed/ or rejected/ with an id above every row's. (queue/ may legitimately hold one: a crash
        between `enqueue`'s rename and its commit, adopted at start-up.)"""
        top = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()[0]
        return [f"{folder.name}/{p.name}" for folder in (ws.done, ws.failed, ws.rejected) if folder.is_dir()
                for p in sorted(folder.iterdir())
                if (m := ID_NAME.match(p.name)) and int(m[1]) > top and not p.name.endswith(".error.txt")]

    def _open(self) -> None:
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a row the CLI has reported ("queued as id 7") survives a power cut too. The cost, one fsync per
        # commit, is negligible at the ledger's rate (a few writes per file, one per status flush).
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        # Columns added after a workspace's ledger was created: add them, empty, instead of failing on old ledgers.
        have = {r[1] for r in self.db.execute("PRAGMA table_info(files)")}
        for column, kind in (("held_out", "TEXT"), ("replayed", "INTEGER NOT NULL DEFAULT 0"),
                             ("attempts", "INTEGER NOT NULL DEFAULT 0"), ("forgetting", "TEXT")):
            if column not in have:
                self.db.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    def backup(self, dest: Path) -> None:
        """A consistent copy of the ledger at `dest`, by SQLite's online backup (safe while it is in use)."""
        target = sqlite3.connect(dest)
        try:
            self.db.backup(target)
            # One self-contained file: opening the copy later never writes -wal/-shm files beside it.
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()

    def shrink_wal(self) -> None:
        """Fold the write-ahead log into the database and truncate it: on a full disk, the room it held (a few
        pages per commit until SQLite's next checkpoint) is what the status file needs to say so."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def note(self, kind: str, text: str) -> None:
        self.db.execute("INSERT INTO events (at, kind, text) VALUES (?, ?, ?)", (time.time(), kind, text))

    def events(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM events ORDER BY id")]

    # -------------------------------------------------------------------------------------- files

    def add_file(self, original_name: str, *, sha256: str | None, size: int | None, priority: str = "normal",
                 state: str = "queued", error: str | None = None) -> int:
        assert priority in PRIORITIES and state in STATES
        cur = self.db.execute(
            "INSERT INTO files (original_name, sha256, size, priority, state, arrived_at, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (original_name, sha256, size, priority, state, time.time(), error))
        return cur.lastrowid

    def update(self, file_id: int, **values) -> None:
        assert values.get("state", "queued") in STATES
        faults.hit("ledger-write")
        cols = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE files SET {cols} WHERE id = ?", (*values.values(), file_id))

    def get(self, file_id: int) -> dict | None:
        row = self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row else None

    def files(self, states: tuple[str, ...] = STATES) -> list[dict]:
        marks = ",".join("?" * len(states))
        return [dict(r) for r in self.db.execute(f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY id",
                                                 states)]

    def queue(self, resuming: set[str] = frozenset()) -> list[dict]:
        """Queued files in the order they will train: urgent first; then files already part-way
        (`resuming`: sha256s with a cursor), so that an interrupted file finishes before new ones start;
        then by priority; then first come, first served."""
        rank = {p: i for i, p in enumerate(PRIORITIES)}
        rows = self.files(("queued",))
        return sorted(rows, key=lambda r: (r["priority"] != "urgent", r["sha256"] not in resuming,
                                           -rank[r["priority"]], r["id"]))

    def set_priority(self, file_id: int, priority: str) -> bool:
        """A queued file's new priority (the queue's order follows at once); False: no such file waits."""
        assert priority in PRIORITIES
        return self.db.execute("UPDATE files SET priority = ? WHERE id = ? AND state = 'queued'",
                               (priority, file_id)).rowcount > 0

    def has_urgent(self) -> bool:
        return self.db.execute("SELECT 1 FROM files WHERE state = 'queued' AND priority = 'urgent' LIMIT 1") \
            .fetchone() is not None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in self.db.execute("SELECT state, COUNT(*) FROM files GROUP BY state")})
        return out

    def queued_bytes(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE state = 'queued'").fetchone()[0]

    def known_names(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM files WHERE name IS NOT NULL")}

    @contextmanager
    def preparing(self, path: Path, *, background: bool = False):
        """Around preparing the queued file `path`: the attempt is committed before it starts and forgotten
        when the process lives through it, so what is left counts the deaths (a native crash, an OOM kill) while
        preparing it. Two of them with no step trained: the file is quarantined (a DataError), not tried a third
        time. In the background (prefetch) one is enough: the daemon then prepares it itself, in plain sight."""
        row = self.db.execute("SELECT id, attempts, steps_trained FROM files WHERE name = ?", (path.name,)).fetchone()
        if row is not None and row["steps_trained"] == 0 and row["attempts"] >= (1 if background else 2):
            from evertrain.data import DataError

            raise DataError(path, [f"quarantined: the process died twice while preparing it (attempts "
                                   f"{row['attempts']}); to try it again, `evertrain add` it"])
        if row is not None:
            self.db.execute("UPDATE files SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
        try:
            yield
        finally:
            if row is not None:
                self.db.execute("UPDATE files SET attempts = 0 WHERE id = ?", (row["id"],))

    # -------------------------------------------------------------------------------------- checkpoints, evals, pins

    def sync_checkpoints(self, model_dir: Path) -> None:
        """Record checkpoints that appeared on disk, and when old ones were pruned."""
        on_disk = {c.step: c.name for c in checkpoint.candidates(model_dir)}
        known = {r[0]: r[1] for r in self.db.execute("SELECT step, deleted_at FROM checkpoints")}
        now = time.time()
        for step, name in on_disk.items():
            if step not in known:
                self.db.execute("INSERT INTO checkpoints (step, name, created_at) VALUES (?, ?, ?)", (step, name, now))
            elif known[step] is not None:
                self.db.execute("UPDATE checkpoints SET deleted_at = NULL WHERE step = ?", (step,))
        for step, deleted in known.items():
            if step not in on_disk and deleted is None:
                self.db.execute("UPDATE checkpoints SET deleted_at = ? WHERE step = ?", (now, step))

    def checkpoints(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM checkpoints ORDER BY step")]

    def sync_evals(self, evals: list[dict]) -> None:
        """Copy the evaluations the core appended to logs/evals.jsonl since the last call (it only appends)."""
        have = self.db.execute("SELECT COUNT(*) FROM evals").fetchone()[0]
        for e in evals[have:]:
            kind = "before" if e.get("before_file") else "after" if e.get("after_file") else "periodic"
            row = self.db.execute("SELECT id FROM files WHERE sha256 = ? ORDER BY id LIMIT 1", (e["file"],)).fetchone()
            self.db.execute("INSERT INTO evals (step, file_id, sha256, kind, after_sha256, examples, tokens, loss, "
                            "created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                            (e["step"], row and row[0], e["file"], kind, e.get("after_file"), e["examples"],
                             e["tokens"], e["loss"], e["time"]))

    def evals(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM evals ORDER BY id")]

    def pin(self, step: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO pins (name, step, pinned_at) VALUES (?, ?, ?)",
                        (checkpoint.final_path(Path("."), step).name, step, time.time()))

    def unpin(self, step: int) -> bool:
        return self.db.execute("DELETE FROM pins WHERE step = ?", (step,)).rowcount > 0

    def pins(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM pins")}

    # -------------------------------------------------------------------------------------- reconciliation

    def reconcile(self, ws: Workspace, progress, say=print) -> None:
        """Make every file's state agree with `progress` (from the newest complete checkpoint), and every
        file sit in the folder of its state."""
        for row in self.files(("training", "queued", "done")):
            mine = [r for r in progress.files[row["progress_index"] or 0:] if r.sha256 == row["sha256"]]
            cursor = progress.cursors.get(row["sha256"])
            if row["state"] == "training" and mine:
                rec = mine[-1]
                self.update(row["id"], state=rec.status, steps_trained=rec.steps, first_step=rec.first_step,
                            last_step=rec.last_step, replayed=rec.replayed, finished_at=time.time())
                say(f"evertrain: ledger: {row['name']} finished as {rec.status} before the restart")
            elif row["state"] in ("training", "queued") and cursor is not None:
                self.update(row["id"], state="queued", steps_trained=cursor.file_step,
                            first_step=cursor.first_step if cursor.file_step else None)
            elif row["state"] == "training":
                self.update(row["id"], state="queued", steps_trained=0, first_step=None)
            elif row["state"] == "done" and not any(r.status == "done" for r in mine):
                # The checkpoint that recorded it is gone (e.g. the newest one was damaged): train it again.
                self.update(row["id"], state="queued", steps_trained=0, first_step=None, last_step=None,
                            finished_at=None)
                say(f"evertrain: ledger: {row['name']} was done after a checkpoint that no longer verifies; "
                    "queued again")
            place(ws, self.get(row["id"]))
        self.sync_checkpoints(ws.model_dir)


# ------------------------------------------------------------------------------------------------- readers

@functools.cache
def columns() -> tuple[str, ...]:
    """The files table's columns, as SCHEMA makes them (a ledger of an older version may lack some)."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return tuple(r[1] for r in db.execute("PRAGMA table_info(files)"))
    finally:
        db.close()


@contextmanager
def read_only(path: Path):
    """The ledger opened read-only: a reader (the dashboard) never takes a lock the daemon would wait for."""
    db = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=2)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def read_files(path: Path) -> list[dict]:
    """Every row of the files table, read-only; columns an older ledger lacks come back as None, and the
    forgetting gate's verdict (JSON text in the ledger) as an object."""
    with read_only(path) as db:
        have = {r[1] for r in db.execute("PRAGMA table_info(files)")}
        cols = ", ".join(c if c in have else f"NULL AS {c}" for c in columns())
        rows = [dict(r) for r in db.execute(f"SELECT {cols} FROM files ORDER BY id")]
    for r in rows:
        try:
            r["forgetting"] = json.loads(r["forgetting"]) if r["forgetting"] else None
        except ValueError:
            r["forgetting"] = None
    return rows


def read_pins(path: Path) -> set[str]:
    """Checkpoint names a person pinned (`evertrain pin`), read-only."""
    with read_only(path) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pins'").fetchone():
            return set()
        return {r[0] for r in db.execute("SELECT name FROM pins")}
