"""The daemon: take files, train them one after another in ONE session, record everything; it steers the loop.

The model, optimizer and schedule stay in memory from one file to the next. `loop.fit` yields after every
optimizer step; `decide` answers it from the controls (stop, pause, skip), the signals and the queue (an urgent
file pre-empts), and keeps the status current. Intake (scanning and hashing inbox files) runs in its own thread,
never inside a step. Under `accelerate launch` or `torchrun` the main process alone does intake, the ledger, the
status and the controls; every other process follows the orders it broadcasts (`follow`), and a stop any
process sees stops them all at the same step.

    evertrain run DIR            # until SIGINT/SIGTERM or `evertrain stop DIR`
    evertrain run DIR --once     # everything waiting, then exit (cron, tests)
    accelerate launch --num_processes 2 -m evertrain run DIR
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from evertrain import checkpoint, collective, disk, exits, faults, locks, logs, loop, metrics
from evertrain.config import TrainConfig
from evertrain.daemon import controls, workspace
from evertrain.daemon.inbox import Intake, adopt_orphans, write_error
from evertrain.daemon.ledger import COPY_NAME, Ledger, place
from evertrain.daemon.notify import Notifier
from evertrain.daemon.prefetch import Prefetch
from evertrain.daemon.status import Bar, Board
from evertrain.daemon.workspace import DaemonConfig, Workspace
from evertrain.data import Cancelled, DataError, FileData
from evertrain.data.summary import counted
from evertrain.evals import read_evals

RESERVE_BYTES = 1 << 20  # status/.reserve: given up on a full disk, so the status and ledger can say so


@dataclass
class Service:
    ws: Workspace
    config: TrainConfig
    daemon: DaemonConfig
    ledger: Ledger | None          # the main process alone holds these three
    board: Board | None
    bar: Bar | None
    notify: Notifier | None
    stop: threading.Event = field(default_factory=threading.Event)   # SIGINT/SIGTERM
    wake: threading.Event = field(default_factory=threading.Event)   # a signal, or intake took a file
    session: loop.Session | None = None
    intake: Intake | None = None
    prefetch: Prefetch | None = None
    next_poll: float = 0.0
    reason: str | None = None      # why `decide` stopped the file in training: stop | pause | skip | urgent
    from_base: bool = False   # --from-base: when no checkpoint loads, start again from the base model
    disk_full: disk.DiskFull | None = None  # set while out of space: the session is stale, the queue waits
    reserve: disk.Reserve | None = None

    def say(self, text: str) -> None:
        if self.ledger is not None:
            logs.say(text)


def run(root: Path, *, once: bool = False, from_base: bool = False) -> int:
    """The daemon, on every process of a launch. Returns the process exit code."""
    ws, config, daemon = workspace.load(root)
    main = locks.is_main_launch_process()
    lock_fd = workspace.lock(ws)  # raises AlreadyRunning; released by the kernel however this process ends
    if main:  # the lock is ours: whatever temps are there, a dead process left them
        for folder in (ws.model_dir, ws.status_dir):
            checkpoint.remove_debris(folder)
    try:
        ledger = Ledger.open(ws) if main else None  # raises LedgerError: damaged, or lost where a history exists
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)  # the same process may run again (tests, notebooks): an open lock would refuse it
        raise
    svc = Service(ws, config, daemon, ledger, None, Bar(sys.stdout.isatty()) if main else None,
                  Notifier(daemon.notify_command, daemon.notify_timeout, logs.say) if main else None,
                  from_base=from_base)
    if main:
        svc.board = Board(ws, ledger, daemon.status_interval, say=svc.say)
        svc.reserve = disk.Reserve(ws.status_dir / ".reserve", RESERVE_BYTES)
    restore_signals = _catch_signals(svc)
    try:
        if not main:
            return follow(svc)
        with logs.to_file(ws.logs):
            try:
                return _serve(svc, once)
            except Exception as e:
                svc.board.set(state="error", alert=f"{type(e).__name__}: {e}")
                logs.exception("evertrain: the daemon stopped on an error")
                svc.notify.send("daemon_stopped", f"the daemon stopped on an error: {type(e).__name__}: {e}",
                                workspace=str(ws.root))
                raise
            finally:
                svc.notify.close()  # the last events' outcome still goes to the log
    finally:
        restore_signals()
        if svc.intake is not None:
            svc.intake.close()
        if svc.prefetch is not None:
            svc.prefetch.stop()
        if svc.session is not None:
            metrics.finish(svc.session)
        if main:
            svc.bar.close()
            ledger.close()
            os.close(lock_fd)


def _serve(svc: Service, once: bool) -> int:
    ws, ledger, board = svc.ws, svc.ledger, svc.board
    started = time.time()
    svc.say(f"evertrain: daemon starting on {ws.root} (pid {os.getpid()})")
    try:
        while not _start(svc):  # out of space before anything could start: wait for room
            if once or _wait_for_room(svc):
                return exits.DISK_FULL if once else exits.OK
    except checkpoint.NoUsableCheckpoint as e:
        board.set(state="error", alert=str(e))
        svc.say(f"evertrain: {e}")
        return exits.BAD_INPUT
    except loop.RunMismatch as e:
        msg = (f"{e}\nTo train with the new settings, start a new run: `evertrain init NEWDIR` with them, or move "
               f"{ws.model_dir} away (the old run stays there); to continue this run, restore the settings in "
               f"{ws.config_file}.")
        board.set(state="error", alert=msg)
        svc.say(f"evertrain: {msg}")
        return exits.BAD_INPUT
    svc.intake = Intake(ws, svc.daemon, svc.wake, svc.say)
    svc.prefetch = Prefetch(svc.session.tokenizer, svc.config, svc.session.store_dir, svc.say, svc.ledger.preparing)
    board.set(state="idle", global_step=svc.session.progress.global_step, last_checkpoint=_ckpt_name(svc),
              precision=svc.session.identity["precision"], global_batch=svc.session.global_batch)

    code = exits.OK
    while True:
        _, next_due = svc.intake.scan()
        if board.data["intake"] != intake_note(svc):
            board.set(intake=intake_note(svc))
        requests = controls.read(ws)
        if svc.stop.is_set() or requests.stop:
            break
        if requests.paused:
            if board.data["state"] != "paused":
                svc.say("evertrain: paused (evertrain resume to continue)")
                board.set(state="paused")
            if once:
                svc.say(f"evertrain: paused: {board.data['queue_length']} file(s) left queued")
                break
            _wait(svc, None)
            continue
        queue = ledger.queue(set(svc.session.progress.cursors))
        if requests.skip_id is not None and requests.skip_id not in {r["id"] for r in queue}:
            controls.clear(ws, "skip")  # aimed at a file that is no longer waiting
        if not queue and svc.disk_full is None:
            if board.data["state"] != "idle" or board.data["current_file"]:
                board.set(state="idle", current_file=None, current_file_id=None, file_step=None,
                          file_total_steps=None)
            if once and next_due is None:
                break
            _wait(svc, next_due)
            continue
        problem = _disk_problem(svc)
        if problem:
            if board.data["alert"] != problem:
                tell(svc, "disk_low", problem)
                board.set(state="waiting" if svc.disk_full else "idle", alert=problem)
            if once:
                code = exits.DISK_FULL
                break
            _wait(svc, None)
            continue
        if svc.disk_full is not None:
            _start(svc)
            continue  # the queue again, as the fresh session and the reconciled ledger see it
        row = queue[0]
        collective.from_main(svc.session.accelerator, {"do": "train", "path": str(ws.queue / row["name"]),
                                                         "name": row["original_name"]})
        if not train_file(svc, row):
            code = exits.BAD_INPUT
            break

    collective.from_main(svc.session.accelerator, {"do": "stop"})
    if code == exits.OK:
        why = "signal" if svc.stop.is_set() else "stop request" if controls.read(ws).stop else "nothing left to do"
        tell(svc, "daemon_stopped", f"{why}: stopped at global step {svc.session.progress.global_step}, last "
                                    f"checkpoint {_ckpt_name(svc)}", global_step=svc.session.progress.global_step)
        controls.clear(ws, "stop")
        board.set(state="stopped", current_file=None, current_file_id=None)
    if once:
        failed = summary(svc, started)
        if failed and code == exits.OK:
            code = exits.FILES_FAILED
    return code


def summary(svc: Service, since: float) -> int:
    """What happened to each file this call took or left waiting (`run --once`); the number that failed."""
    rows = [r for r in svc.ledger.files()
            if r["state"] in ("queued", "training") or (r["finished_at"] or 0) >= since]
    svc.say(f"evertrain: summary: {len(rows)} file(s)" + (":" if rows else ""))
    for r in rows:
        steps = f"{r['steps_trained']}/{r['expected_steps'] or '?'} steps"
        note = {"done": f"{steps}, global steps {r['first_step']}-{r['last_step']}",
                "queued": f"still queued, {steps}"}.get(r["state"]) or " · ".join(
            line.strip() for line in (r["error"] or "").splitlines() if line.strip())[:300]
        svc.say(f"  {r['original_name']} (id {r['id']}): {r['state']}" + (f": {note}" if note else ""))
    return sum(r["state"] == "failed" for r in rows)


def follow(svc: Service) -> int:
    """A process of a launch other than the main one: train what the main process orders, decide nothing.

    Every collective step here (preparing, the steps, a rollback) is the one the main process takes in
    `train_file`, in the same order; a signal seen here still stops every process at the same step.
    """
    new_session(svc)
    while True:
        order = collective.from_main(svc.session.accelerator)
        if order["do"] == "stop":
            return exits.OK
        if order["do"] != "train":
            continue  # "wait": the main process is idle or paused, and says so every poll
        try:
            data = loop.prepare(svc.session, Path(order["path"]))
        except (DataError, Cancelled):
            continue
        data.name = order["name"]
        if svc.session.progress.finished(data.sha256) is not None:
            continue
        try:
            svc.session, _result = loop.run_file(svc.session, data,
                                                 lambda _r: loop.STOP if svc.stop.is_set() else None)
        except loop.NonFiniteLoss:
            svc.session = loop.roll_back(svc.session, data)
        except loop.RunMismatch:
            pass  # the main process reports it and orders the stop


def train_file(svc: Service, row: dict) -> bool:
    """Validate, train (or resume) one queued file and record how it ended. False: the run cannot go on.

    Out of space anywhere on the way (a checkpoint, the trace, the ledger, a token store): the file goes back
    to the queue at its last committed cursor and the daemon waits for room (`_serve`), then starts a fresh
    session from the newest complete checkpoint: what was trained after it is trained again, exactly once."""
    try:
        return _train_file(svc, row)
    except Exception as e:
        if not disk.is_full(e):
            raise
        _out_of_space(svc, e)
        try:
            svc.ledger.update(row["id"], state="queued")  # what `status` shows meanwhile; reconcile makes it exact
        except Exception as again:  # noqa: BLE001 - the ledger may be on the full disk too
            if not disk.is_full(again):
                raise
        svc.say(f"evertrain: {row['original_name']}: {svc.disk_full}; it goes back to the queue at its last "
                f"checkpoint ({_ckpt_name(svc) or 'none yet'}); training resumes by itself when there is room")
        return True


def _train_file(svc: Service, row: dict) -> bool:
    ws, ledger, board, session = svc.ws, svc.ledger, svc.board, svc.session
    path = ws.queue / row["name"]
    try:
        data = prepare(svc, row, path)
    except DataError as e:
        if disk.is_full(e):  # the token store found no room: the file is not at fault
            raise
        fail(svc, row, str(e).replace(str(path), row["original_name"]))
        return True
    except Cancelled:
        board.set(state="idle", current_file=None, current_file_id=None, prepare_percent=None,
                  eta_prepare_seconds=None)
        return True  # a stop or pause during preparation: the file stays queued; the main loop acts
    progress = session.progress
    earlier = progress.finished(data.sha256)
    if earlier is not None:
        first = next((r for r in ledger.files(("done",)) if r["sha256"] == data.sha256), None)
        note = (f"same content (sha256 {data.sha256[:12]}) as {earlier.name}, trained at global steps "
                f"{earlier.first_step}-{earlier.last_step}; not trained again")
        ledger.update(row["id"], state="duplicate", duplicate_of=first and first["id"], error=note,
                      finished_at=time.time())
        place(ws, ledger.get(row["id"]))
        svc.say(f"evertrain: {row['original_name']}: duplicate: {note}")
        board.write()
        return True

    G = session.global_batch
    expected = data.total_steps(G, svc.config.epochs)
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
        svc.session, result = loop.run_file(session, data, lambda record: decide(svc, row, record))
    except loop.NonFiniteLoss as e:
        roll_back(svc, row, data, e)
        return True
    except loop.RunMismatch as e:
        msg = (f"{e}. A file interrupted part-way finishes with the batch settings it started with: restore them "
               f"in {ws.config_file} and restart.")
        ledger.update(row["id"], state="queued")
        board.set(state="error", alert=msg)
        svc.say(f"evertrain: {msg}")
        return False
    finally:
        ledger.sync_evals(read_evals(ws.root))
    ledger.sync_checkpoints(ws.model_dir)
    board.data["last_checkpoint"] = _ckpt_name(svc)
    return ended(svc, row, result)


def decide(svc: Service, row: dict, record: loop.StepRecord) -> str | None:
    """The answer to one optimizer step of `row`: None goes on, STOP or SKIP ends it (the reason in svc.reason).

    A few stat calls and one indexed SQLite read a step; pins and the next file's preparation every poll.
    """
    wrote = svc.board.last_write
    svc.board.step(record)
    svc.bar.update(record)
    if svc.board.last_write != wrote:  # the status was flushed: the ledger's step count too
        svc.ledger.update(row["id"], steps_trained=record.file_step)
        svc.board.data["last_checkpoint"] = _ckpt_name(svc)
    if time.monotonic() >= svc.next_poll or svc.wake.is_set():
        svc.wake.clear()
        svc.session.protected = svc.ledger.pins()
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
    return {None: None, "skip": loop.SKIP}.get(svc.reason, loop.STOP)


def ended(svc: Service, row: dict, result: loop.FileResult) -> bool:
    """Record how a file's call of `fit` ended: done (after the guards), skipped, or interrupted to resume."""
    ws, ledger, progress = svc.ws, svc.ledger, svc.session.progress
    name, expected = row["original_name"], result.expected_steps
    if result.status == "skipped":
        rec = progress.files[-1]
        controls.clear(ws, "skip")
        ledger.update(row["id"], state="skipped", steps_trained=rec.steps, first_step=rec.first_step if rec.steps
                      else None, last_step=rec.last_step if rec.steps else None, finished_at=time.time(),
                      error=f"skipped by request after {rec.steps}/{rec.expected_steps} steps")
        place(ws, ledger.get(row["id"]))
        tell(svc, "file_skipped", f"skipped {name} after {rec.steps}/{rec.expected_steps} steps (global step "
                                  f"{progress.global_step})", file=name, file_id=row["id"])
        return True
    if result.status == "interrupted":
        if svc.reason is None:  # another process of the launch was told to stop (a signal reached it alone)
            svc.reason = "stop"
            svc.stop.set()
        ledger.update(row["id"], state="queued", steps_trained=result.file_step)
        words = {"stop": "stopping", "pause": "paused", "urgent": "pre-empted by an urgent file"}[svc.reason]
        svc.say(f"evertrain: {name} {words} at its step {result.file_step}/{expected} "
                f"(global step {result.step_after}); it resumes there")
        svc.board.set(state="stopping" if svc.reason == "stop" else svc.board.data["state"])
        return True
    if result.status == "rejected":
        reject(svc, row, result)
        return True
    problems = loop.guard_problems(svc.session, result)
    if problems:
        fail(svc, row, f"{name}: trained but NOT done: " + "; ".join(problems))
        return True
    rec = progress.files[-1]
    faults.hit("before-ledger-done")
    ledger.update(row["id"], state="done", steps_trained=rec.steps, first_step=rec.first_step,
                  last_step=rec.last_step, replayed=rec.replayed, finished_at=time.time(), error=None,
                  forgetting=json.dumps(rec.forgetting) if rec.forgetting else None)
    place(ws, ledger.get(row["id"]))
    if rec.forgetting and rec.forgetting["tripped"]:
        alert = f"{name}: {rec.forgetting['reason']} (forgetting_action {rec.forgetting['action']}: kept)"
        svc.board.set(alert=alert)
        tell(svc, "forgetting", f"ALERT {alert}", file=name, file_id=row["id"], verdict=rec.forgetting)
    elif rec.forgetting and rec.forgetting["attempt"] > 1:
        tell(svc, "forgetting", f"{name}: passed the forgetting gate when trained again with a stronger replay "
                                f"dose ({rec.forgetting['reason']})", file=name, file_id=row["id"],
             verdict=rec.forgetting)
    tell(svc, "file_done", f"done {name}: {rec.steps}/{expected} steps, global steps {rec.first_step}-"
                           f"{rec.last_step}, mean loss {result.loss:.4f}, checkpoint {_ckpt_name(svc)}",
         file=name, file_id=row["id"], global_step=progress.global_step, loss=result.loss)
    svc.board.set(global_step=progress.global_step, loss=result.loss)
    return True


def prepare(svc: Service, row: dict, path: Path) -> FileData:
    """The file's tokens (built now, or by the background thread, or found on disk), with progress in the status.

    A stop or pause asked meanwhile raises Cancelled; the file stays queued.
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
    data = loop.prepare(svc.session, path, progress=progress, should_stop=should_stop,
                        attempt=svc.ledger.preparing(path))
    board.data.update(prepare_percent=None, eta_prepare_seconds=None)
    data.name = row["original_name"]  # the name the person dropped, not the queue's <id>-<name>
    for warning in data.warnings:
        svc.say(f"evertrain: {data.name}: warning: {warning}")
    return data


def tell(svc: Service, event: str, text: str, **fields) -> None:
    """Say it, and tell notify_command (in a thread of its own: training never waits for it)."""
    svc.say(f"evertrain: {text}")
    svc.notify.send(event, text, workspace=str(svc.ws.root), **fields)


def intake_note(svc: Service) -> str | None:
    """The status's word on inbox files that look cut short: their writers are waited for."""
    waiting = svc.intake.inbox.waiting
    return f"waiting for {', '.join(waiting)} to finish" if waiting else None


def _next_path(svc: Service, row: dict) -> Path | None:
    """The file most likely to train after `row`: the next in the queue."""
    nxt = next((r for r in svc.ledger.queue(set(svc.session.progress.cursors)) if r["id"] != row["id"]), None)
    return svc.ws.queue / nxt["name"] if nxt else None


def roll_back(svc: Service, row: dict, data: FileData, error: loop.NonFiniteLoss) -> None:
    """A NaN/inf loss: reload the newest complete checkpoint, fail the file, carry on with the next."""
    tell(svc, "rollback", f"{row['original_name']}: {error}; rolling back to the last good checkpoint",
         file=row["original_name"], file_id=row["id"], global_step=error.step)
    cursor = svc.session.progress.cursors.get(data.sha256)
    svc.session = loop.roll_back(svc.session, data)
    svc.ledger.sync_checkpoints(svc.ws.model_dir)
    fail(svc, row, f"{row['original_name']}: loss became {error.loss} at global step {error.step} "
                   f"(file step {error.step - (cursor.first_step if cursor else error.step)}); rolled back to "
                   f"{_ckpt_name(svc) or 'the initial model'} (global step {svc.session.progress.global_step}); "
                   f"the file is not trained further")


def reject(svc: Service, row: dict, result: loop.FileResult) -> None:
    """The forgetting gate undid the file: it lies in rejected/ with the verdict, for a person to decide."""
    name, verdict = row["original_name"], result.gate
    reason = (f"{name}: REJECTED by the forgetting gate after {verdict['attempt']} attempt(s): {verdict['reason']}; "
              f"the run went back to global step {result.step_after}. To train it anyway, set forgetting_action = "
              f"\"alert\" in evertrain.toml (or raise forgetting_tolerance) and drop it into the inbox again")
    svc.ledger.sync_checkpoints(svc.ws.model_dir)
    svc.ledger.update(row["id"], state="rejected", steps_trained=0, first_step=None, last_step=None,
                      error=reason, forgetting=json.dumps(verdict), finished_at=time.time())
    write_error(place(svc.ws, svc.ledger.get(row["id"])) or svc.ws.rejected / row["name"], reason)
    svc.board.set(state="idle", current_file=None, current_file_id=None, global_step=result.step_after,
                  alert=reason)
    tell(svc, "file_rejected", reason, file=name, file_id=row["id"], verdict=verdict)


def fail(svc: Service, row: dict, reason: str) -> None:
    svc.ledger.update(row["id"], state="failed", error=reason, finished_at=time.time())
    target = place(svc.ws, svc.ledger.get(row["id"])) or svc.ws.failed / row["name"]
    write_error(target, reason)
    svc.board.set(state="idle", current_file=None, current_file_id=None)
    tell(svc, "file_failed", f"FAILED {reason}", file=row["original_name"], file_id=row["id"])


def _start(svc: Service) -> bool:
    """Load the newest complete checkpoint and make the ledger and queue/ agree with it: at start-up, and when
    room returns after a full disk. False (the daemon waiting, svc.disk_full set) if that too found no room."""
    try:
        new_session(svc)
        adopt_orphans(svc.ws, svc.ledger, svc.say)
        svc.ledger.reconcile(svc.ws, svc.session.progress, svc.say)
    except Exception as e:
        if not disk.is_full(e):
            raise
        _out_of_space(svc, e)
        return False
    if svc.disk_full is not None:
        svc.say(f"evertrain: there is room again in {svc.disk_full.path}; resuming from "
                f"{_ckpt_name(svc) or 'the base model'} (global step {svc.session.progress.global_step})")
        svc.disk_full = None
    svc.reserve.hold()
    svc.board.set(state="idle", alert=None, global_step=svc.session.progress.global_step,
                  last_checkpoint=_ckpt_name(svc), current_file=None, current_file_id=None)
    return True


def _out_of_space(svc: Service, error: BaseException) -> None:
    """Enter the disk-full state: no temp left behind, the status says where and how much, the session stale."""
    svc.reserve.release()
    checkpoint.remove_debris(svc.ws.model_dir)
    try:
        svc.ledger.shrink_wal()
    except Exception as e:  # noqa: BLE001 - the room it would give is a nicety; a busy or full ledger is not
        if not (disk.is_full(e) or "locked" in str(e)):
            raise
    need = (svc.daemon.disk_margin_bytes + svc.reserve.size
            + (loop.checkpoint_bytes(svc.session) if svc.session else 0))
    svc.disk_full = disk.DiskFull(disk.DiskFull.of(error, svc.ws.model_dir).path, need)
    svc.board.set(state="waiting", current_file=None, current_file_id=None, alert=f"waiting: {svc.disk_full}")


def _wait_for_room(svc: Service) -> bool:
    """Wait for space before the session could start (polls: no event says a disk has room). True: stop instead
    (a signal, `evertrain stop`)."""
    while True:
        if svc.stop.is_set() or controls.read(svc.ws).stop:
            return True
        if disk.free_bytes(svc.disk_full.path) >= svc.disk_full.needed:
            return False
        svc.stop.wait(svc.daemon.poll_seconds)


def new_session(svc: Service) -> None:
    """Load the newest complete checkpoint of the workspace's run (or start the run)."""
    # Checkpoints in current_model/; logs/ and snapshots/ (metrics, evaluations, evolution) at the workspace root.
    starting_over = svc.from_base and checkpoint.present(svc.ws.model_dir)
    session = loop.setup(svc.config, svc.ws.model_dir, workdir=svc.ws.root, from_base=svc.from_base)
    session.budget_bytes = svc.daemon.checkpoint_budget_bytes or None
    if svc.ledger is not None:
        session.protected = svc.ledger.pins()
        session.extra_files = lambda tmp: svc.ledger.backup(tmp / COPY_NAME)  # `evertrain repair` rebuilds from it
        if starting_over and session.last_checkpoint is None:
            text = f"no checkpoint loads; started again from the base model {svc.config.model} (--from-base)"
            svc.ledger.note("from-base", text)
            svc.say(f"evertrain: {text}")
    svc.session = session
    svc.config = session.config  # as the run resolved it (an older run keeps its held-out rule): prefetch too


def _disk_problem(svc: Service) -> str | None:
    need = loop.checkpoint_bytes(svc.session)
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


def _ckpt_name(svc: Service) -> str | None:
    ckpt = svc.session.last_checkpoint if svc.session else None
    return ckpt.name if ckpt else None


def _wait(svc: Service, due: float | None) -> None:
    """Sleep until a signal, a file taken, the next poll, or the moment a waiting file becomes stable.

    The other processes of a launch are told to wait too, once a poll: a collective that waited for hours would
    time out.
    """
    collective.from_main(svc.session.accelerator, {"do": "wait"})
    timeout = svc.daemon.poll_seconds
    if due is not None:
        timeout = max(0.01, min(timeout, due - time.monotonic()))
    svc.wake.wait(timeout)
    svc.wake.clear()


def _catch_signals(svc: Service):
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, _frame):
        # Only flags here: printing from a signal handler can re-enter a write in progress.
        svc.stop.set()
        svc.wake.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]
