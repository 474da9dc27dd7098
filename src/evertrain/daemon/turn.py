"""One queued file's turn in the daemon: open it (with progress in the status), train it while `decide` answers
every optimizer step from the controls, the signals and the queue, and record how it ended (outcomes.py).

    evertrain run DIR      # then: evertrain pause DIR / evertrain skip DIR / evertrain add F --priority urgent DIR
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from evertrain import disk
from evertrain.daemon import controls, outcomes, room
from evertrain.daemon.outcomes import checkpoint_name
from evertrain.data.summary import counted
from evertrain.observe.evals import read_evals
from evertrain.train import driver
from evertrain.train.session import SKIP, STOP, StepRecord


def train_file(svc, row: dict) -> bool:
    """Validate, train (or resume) one queued file and record how it ended. False: the run cannot go on.

    Out of space anywhere on the way (a checkpoint, the trace, the ledger, a token store): the file goes back
    to the queue at its last committed cursor and the daemon waits for room (`_serve`), then starts a fresh
    session from the newest complete checkpoint: what was trained after it is trained again, exactly once."""
    try:
        return _train_file(svc, row)
    except Exception as e:
        if not disk.is_full(e):
            raise
        room.out_of_space(svc, e)
        try:
            svc.ledger.update(row["id"], state="queued")  # what `status` shows meanwhile; reconcile makes it exact
        except Exception as again:  # noqa: BLE001 - the ledger may be on the full disk too
            if not disk.is_full(again):
                raise
        svc.say(f"evertrain: {row['original_name']}: {svc.disk_full}; it goes back to the queue at its last "
                f"checkpoint ({checkpoint_name(svc) or 'none yet'}); training resumes by itself when there is room")
        return True


def _train_file(svc, row: dict) -> bool:
    ws, ledger, board = svc.ws, svc.ledger, svc.board
    path = ws.queue / row["name"]
    opened = prepare(svc, row, path)
    if opened.status == driver.INVALID:
        outcomes.fail(svc, row, str(opened.error).replace(str(path), row["original_name"]))
        return True
    if opened.status == driver.CANCELLED:  # a stop or pause during preparation: it stays queued; the loop acts
        board.set(state="idle", current_file=None, current_file_id=None, prepare_percent=None,
                  eta_prepare_seconds=None)
        return True
    if opened.status == driver.DUPLICATE:
        outcomes.duplicate(svc, row, opened)
        return True
    data, session = opened.data, svc.session
    progress = session.progress
    expected = data.total_steps(session.global_batch, session.config.epochs)
    cursor = progress.cursors.get(data.sha256)
    ledger.update(row["id"], state="training", sha256=data.sha256, format="+".join(sorted(data.formats)),
                  examples=len(data.examples), tokens=data.tokens, expected_steps=expected,
                  held_out=json.dumps(data.held_out_lines),
                  started_at=row["started_at"] or time.time(),
                  progress_index=row["progress_index"] if row["progress_index"] is not None else len(progress.files))
    board.start_file(row, progress.global_step, expected, cursor.file_step if cursor else 0)
    svc.bar.start(row["original_name"], expected, cursor.file_step if cursor else 0)
    svc.say(f"evertrain: training {row['original_name']} (id {row['id']}, {row['priority']}): "
            f"{counted(data.records, len(data.examples), data)}, {data.tokens} tokens, {expected} steps"
            + (f", resuming at step {cursor.file_step}" if cursor and cursor.file_step else ""))

    svc.prefetch.start(_next_path(svc, row))
    svc.reason = None
    try:
        outcome = driver.run(session, data, lambda record: decide(svc, row, record))
    finally:
        ledger.sync_evals(read_evals(ws.run))
    svc.session = outcome.session
    if outcome.status == driver.MISMATCH:
        msg = (f"{outcome.error}. A file interrupted part-way finishes with the batch settings it started with: "
               f"restore them in {ws.config_file} and restart.")
        ledger.update(row["id"], state="queued")
        board.set(state="error", alert=msg)
        svc.say(f"evertrain: {msg}")
        return False
    ledger.sync_checkpoints(ws.model_dir)
    board.data["last_checkpoint"] = checkpoint_name(svc)
    outcomes.record(svc, row, outcome)
    return True


def decide(svc, row: dict, record: StepRecord) -> str | None:
    """The answer to one optimizer step of `row`: None goes on, STOP or SKIP ends it (the reason in svc.reason).

    A few stat calls and one indexed SQLite read a step; pins and the next file's preparation every poll.
    """
    wrote = svc.board.last_write
    svc.board.step(record)
    svc.bar.update(record)
    if svc.board.last_write != wrote:  # the status was flushed: the ledger's step count too
        svc.ledger.update(row["id"], steps_trained=record.file_step)
        svc.board.data["last_checkpoint"] = checkpoint_name(svc)
    if time.monotonic() >= svc.next_poll or svc.wake.is_set():
        svc.wake.clear()
        svc.retention.pinned = svc.ledger.pins()
        svc.prefetch.start(_next_path(svc, row))
        svc.board.data["intake"] = intake_note(svc)
        svc.next_poll = time.monotonic() + svc.daemon.poll_seconds
    requests = controls.read(svc.ws)
    if svc.stop.is_set() or requests.stop:
        svc.reason = "stop"
    elif requests.paused:
        svc.reason = "pause"
    elif requests.skip_id == row["id"]:
        svc.reason = "skip"
    elif row["priority"] != "urgent" and svc.ledger.has_urgent():
        svc.reason = "urgent"
    return {None: None, "skip": SKIP}.get(svc.reason, STOP)


def prepare(svc, row: dict, path: Path) -> driver.Outcome:
    """The file opened (its tokens built now, or by the background thread, or found on disk), with progress in the
    status. A stop or pause asked meanwhile cancels it; the file stays queued.
    """
    board, started, shown = svc.board, time.monotonic(), {"at": 0.0}

    def should_stop() -> bool:
        if svc.stop.is_set():
            return True
        requests = controls.read(svc.ws)
        return requests.stop or requests.paused

    def progress(fraction: float) -> None:
        now = time.monotonic()
        if now - shown["at"] < 0.5 and fraction < 1.0:
            return
        shown["at"] = now
        elapsed = now - started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.01 else None
        board.set(state="preparing", current_file=row["original_name"], current_file_id=row["id"],
                  prepare_percent=round(100 * fraction, 1), eta_prepare_seconds=eta, alert=None)

    progress(0.0)
    svc.prefetch.claim(path, should_stop)
    # attempt: a file that killed the process twice while prepared is quarantined instead (Ledger.preparing)
    opened = driver.open_file(svc.session, path, name=row["original_name"],  # as dropped, not <id>-<name>
                              progress=progress, should_stop=should_stop, attempt=svc.ledger.preparing(path))
    board.data.update(prepare_percent=None, eta_prepare_seconds=None)
    for warning in opened.data.warnings if opened.data else ():
        svc.say(f"evertrain: {opened.data.name}: warning: {warning}")
    return opened


def intake_note(svc) -> str | None:
    """The status's word on inbox files that look cut short: their writers are waited for."""
    waiting = svc.intake.inbox.waiting
    return f"waiting for {', '.join(waiting)} to finish" if waiting else None


def _next_path(svc, row: dict) -> Path | None:
    """The file most likely to train after `row`: the next in the queue."""
    nxt = next((r for r in svc.ledger.queue(set(svc.session.progress.cursors)) if r["id"] != row["id"]), None)
    return svc.ws.queue / nxt["name"] if nxt else None
