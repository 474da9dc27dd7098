"""`evertrain repair DIR`: rebuild a lost or damaged ledger from the newest checkpoint's copy and the disk.

Every checkpoint the daemon writes holds a copy of the ledger (ledger.sqlite, sealed in its manifest). Repair
moves the broken ledger aside into DIR/ledger-broken-<time>/ (never deletes it), puts back the newest copy that
verifies, then adds what happened after that copy, from the disk:
  - a file in queue/, done/ or failed/ that the copy does not know gets a row under the id in its name;
  - a file the copy knew as waiting that is now in failed/ (rejected/) is failed (rejected), with its
    NAME.error.txt;
  - a file in done/ is done only if the newest complete checkpoint (the truth about what was trained) recorded
    it, else a duplicate of the earlier file with its content, else it is queued again;
  - then the ledger is reconciled with that checkpoint, as at every start of the daemon.
So the ids and the history are kept and no finished file trains twice.

    evertrain repair DIR
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from evertrain.daemon import workspace
from evertrain.daemon.ledger import COPY_NAME, ID_NAME, Ledger, LedgerError
from evertrain.files import sha256_file
from evertrain.observe.evals import read_evals
from evertrain.train import checkpoint
from evertrain.train.state import TrainingProgress


def repair(root: Path, say=print) -> int:
    """The `repair` command; returns its exit code. Raises workspace.AlreadyRunning while a daemon runs."""
    ws, _train, _daemon = workspace.load(root)
    lock_fd = workspace.lock(ws)
    try:
        try:
            Ledger.open(ws).close()
        except LedgerError as e:
            say(f"evertrain: repair: {e.path} {e.problem}")
        else:
            say(f"evertrain: {ws.ledger_path} is sound; nothing to repair")
            return 0
        aside = move_aside(ws)
        if aside:
            say(f"evertrain: repair: moved the broken ledger to {aside}/ (kept, not deleted)")
        copy = newest_copy(ws.model_dir)
        if copy is not None:
            shutil.copyfile(copy / COPY_NAME, ws.ledger_path)
        ledger = Ledger(ws.ledger_path)
        try:
            say(f"evertrain: repair: restored the ledger copy of {copy} ({len(ledger.files())} files)" if copy
                else "evertrain: repair: no checkpoint holds a copy of the ledger; rebuilding from the disk alone")
            newest = checkpoint.newest_complete(ws.model_dir, warn=say)
            progress = TrainingProgress.from_state_dict(newest.state["evertrain"]) if newest else TrainingProgress()
            if newest is None:
                say("evertrain: repair: no checkpoint loads: no file counts as trained")
            settle_from_disk(ws, ledger, progress, say)
            ledger.reconcile(ws, progress, say)
            ledger.sync_evals(read_evals(ws.run))
            counts = ", ".join(f"{n} {state}" for state, n in ledger.counts().items() if n)
            ledger.note("repair", f"rebuilt from {copy or 'the disk'} and "
                                  f"{newest.path if newest else 'no checkpoint'}; broken ledger in {aside}")
        finally:
            ledger.close()
        say(f"evertrain: repair: {ws.ledger_path} rebuilt: {counts or 'no files'}; "
            f"continue with: evertrain run {root}")
        return 0
    finally:
        os.close(lock_fd)


def move_aside(ws: workspace.Workspace) -> Path | None:
    """Move ledger.sqlite and its -wal and -shm into a new folder (a -wal left beside a new ledger would be
    replayed into it)."""
    parts = [p for p in (ws.ledger_path, *(ws.root / f"{ws.ledger_path.name}{s}" for s in ("-wal", "-shm")))
             if p.exists()]
    if not parts:
        return None
    aside = ws.root / f"ledger-broken-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        aside, n = ws.root / f"ledger-broken-{time.strftime('%Y%m%d-%H%M%S')}.{n}", n + 1
    aside.mkdir()
    for p in parts:
        p.rename(aside / p.name)
    return aside


def newest_copy(model_dir: Path) -> Path | None:
    """The newest checkpoint whose ledger copy matches its manifest (the rest of it may be damaged)."""
    for ckpt in checkpoint.candidates(model_dir):
        meta = ckpt.state["manifest"].get(COPY_NAME)
        copy = ckpt.path / COPY_NAME
        if meta and copy.is_file() and sha256_file(copy) == meta["sha256"]:
            return ckpt.path
    return None


def settle_from_disk(ws: workspace.Workspace, ledger: Ledger, progress: TrainingProgress, say) -> None:
    """Rows for the files on disk that the ledger does not know; states for those it knew as waiting."""
    known = {r["name"]: r["id"] for r in ledger.files()}
    found = []
    for folder in (ws.queue, ws.done, ws.failed, ws.rejected):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = ID_NAME.match(p.name)
            if p.name.endswith(".error.txt") or not (p.name in known or m):
                continue
            file_id = known.get(p.name)
            if file_id is None:
                file_id = int(m[1])
                if ledger.get(file_id) is not None:
                    continue  # another file holds that id; a queued one is adopted at start-up
                is_file = p.is_file() and not p.is_symlink()
                ledger.db.execute("INSERT INTO files (id, original_name, name, sha256, size, state, arrived_at) "
                                  "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                                  (file_id, m[2], p.name, sha256_file(p) if is_file else None,
                                   p.stat().st_size if is_file else None, p.lstat().st_mtime))
                say(f"evertrain: repair: {folder.name}/{p.name}: not in the copy; added as id {file_id}")
            found.append((file_id, folder.name, p))
    trained = {r.sha256 for r in progress.files if r.status != "rejected"}
    claimed: dict[str, int] = {}  # sha256 -> the first file that trained it
    for r in ledger.files():
        if r["state"] in ("done", "skipped", "training") and r["sha256"] in trained:
            claimed.setdefault(r["sha256"], r["id"])
    for file_id, folder, p in sorted(found):
        row = ledger.get(file_id)
        if row["state"] not in ("queued", "training"):
            continue
        where = f"evertrain: repair: {folder}/{p.name}"
        if folder in ("failed", "rejected"):
            error = p.with_name(p.name + ".error.txt")
            ledger.update(file_id, state=folder, finished_at=p.lstat().st_mtime,
                          error=error.read_text().strip() if error.is_file() else f"found in {folder}/ by repair")
            say(f"{where}: {folder}")
        elif folder == "done" and row["sha256"] in trained:
            first = claimed.setdefault(row["sha256"], file_id)
            if first != file_id:
                ledger.update(file_id, state="duplicate", duplicate_of=first, finished_at=p.lstat().st_mtime,
                              error=f"same content as file id {first}; not trained again")
                say(f"{where}: a duplicate of file id {first}")
            else:  # `reconcile` gives it the state and steps its checkpoint record says
                ledger.update(file_id, state="training")
        elif folder == "done":
            say(f"{where}: no loadable checkpoint records it as trained; queued again")
