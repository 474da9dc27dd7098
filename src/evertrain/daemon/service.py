"""The daemon: take files, train them one after another in ONE session, record everything; it steers the loop.

The model, optimizer and schedule stay in memory from one file to the next. Each queued file has its turn (turn.py):
train/loop.py `fit` yields after every optimizer step and `turn.decide` answers it from the controls (stop, pause,
skip), the signals and the queue (an urgent file pre-empts), and keeps the status current. Intake (scanning and hashing inbox files) runs in its own thread,
never inside a step. Under `accelerate launch` or `torchrun` the main process alone does intake, the ledger, the
status and the controls; every other process follows the orders it broadcasts (`follow`), and a stop any
process sees stops them all at the same step.

    evertrain run DIR            # until SIGINT/SIGTERM or `evertrain stop DIR`
    evertrain run DIR --once     # everything waiting, then exit (cron, tests)
    accelerate launch --num_processes 2 -m evertrain run DIR
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from evertrain import collective, disk, exits, locks, logs
from evertrain.config import TrainConfig
from evertrain.daemon import controls, outcomes, room, turn, workspace
from evertrain.daemon.inbox import Intake, adopt_orphans
from evertrain.daemon.ledger import COPY_NAME, Ledger
from evertrain.daemon.notify import Notifier
from evertrain.daemon.outcomes import checkpoint_name, tell
from evertrain.daemon.prefetch import Prefetch
from evertrain.daemon.status import Board
from evertrain.daemon.workspace import DaemonConfig
from evertrain.logs import Bar
from evertrain.runs import Workspace
from evertrain.train import checkpoint, driver
from evertrain.train.session import STOP, Retention, RunMismatch, Session
from evertrain.train.setup import setup

RESERVE_BYTES = 1 << 20  # status/.reserve: given up on a full disk, so the status and ledger can say so


@dataclass
class Service:
    ws: Workspace
    config: TrainConfig            # as evertrain.toml asks; the session's own is what the run resolved it to
    daemon: DaemonConfig
    ledger: Ledger | None          # the main process alone holds these three
    board: Board | None
    bar: Bar | None
    notify: Notifier | None
    stop: threading.Event = field(default_factory=threading.Event)   # SIGINT/SIGTERM
    wake: threading.Event = field(default_factory=threading.Event)   # a signal, or intake took a file
    retention: Retention = field(default_factory=Retention)  # pins, the disk budget, the ledger's copy
    session: Session | None = None
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
    svc.retention.budget_bytes = daemon.checkpoint_budget_bytes or None
    if main:
        svc.retention.pinned = ledger.pins()
        # Sealed into every checkpoint: `evertrain repair` rebuilds a lost ledger from it.
        svc.retention.extra_files = lambda tmp: ledger.backup(tmp / COPY_NAME)
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
            svc.session.observers.finish()
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
            if once or room.wait_for_room(svc):
                return exits.DISK_FULL if once else exits.OK
    except checkpoint.NoUsableCheckpoint as e:
        board.set(state="error", alert=str(e))
        svc.say(f"evertrain: {e}")
        return exits.BAD_INPUT
    except RunMismatch as e:
        msg = (f"{e}\nTo train with the new settings, start a new run: `evertrain init NEWDIR` with them, or move "
               f"{ws.model_dir} away (the old run stays there); to continue this run, restore the settings in "
               f"{ws.config_file}.")
        board.set(state="error", alert=msg)
        svc.say(f"evertrain: {msg}")
        return exits.BAD_INPUT
    svc.intake = Intake(ws, svc.daemon, svc.wake, svc.say)
    svc.prefetch = Prefetch(svc.session.tokenizer, svc.session.config, svc.session.run.tokens, svc.say,
                            svc.ledger.preparing)
    board.set(state="idle", global_step=svc.session.progress.global_step, last_checkpoint=checkpoint_name(svc),
              precision=svc.session.identity["precision"], global_batch=svc.session.global_batch)

    code = exits.OK
    while True:
        _, next_due = svc.intake.scan()
        if board.data["intake"] != turn.intake_note(svc):
            board.set(intake=turn.intake_note(svc))
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
        problem = room.problem(svc)
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
        if not turn.train_file(svc, row):
            code = exits.BAD_INPUT
            break

    collective.from_main(svc.session.accelerator, {"do": "stop"})
    if code == exits.OK:
        why = "signal" if svc.stop.is_set() else "stop request" if controls.read(ws).stop else "nothing left to do"
        tell(svc, "daemon_stopped", f"{why}: stopped at global step {svc.session.progress.global_step}, last "
                                    f"checkpoint {checkpoint_name(svc)}", global_step=svc.session.progress.global_step)
        controls.clear(ws, "stop")
        board.set(state="stopped", current_file=None, current_file_id=None)
    if once:
        failed = outcomes.summary(svc, started)
        if failed and code == exits.OK:
            code = exits.FILES_FAILED
    return code


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
        opened = driver.open_file(svc.session, Path(order["path"]), name=order["name"])
        if opened.status == driver.READY:
            # a mismatch is the main process's to report: it orders the stop
            svc.session = driver.run(svc.session, opened.data,
                                     lambda _r: STOP if svc.stop.is_set() else None).session


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
        room.out_of_space(svc, e)
        return False
    if svc.disk_full is not None:
        svc.say(f"evertrain: there is room again in {svc.disk_full.path}; resuming from "
                f"{checkpoint_name(svc) or 'the base model'} (global step {svc.session.progress.global_step})")
        svc.disk_full = None
    svc.reserve.hold()
    svc.board.set(state="idle", alert=None, global_step=svc.session.progress.global_step,
                  last_checkpoint=checkpoint_name(svc), current_file=None, current_file_id=None)
    return True


def new_session(svc: Service) -> None:
    """Load the newest complete checkpoint of the workspace's run (or start the run)."""
    starting_over = svc.from_base and checkpoint.present(svc.ws.model_dir)
    svc.session = setup(svc.config, svc.ws.run, from_base=svc.from_base, retention=svc.retention)
    if svc.ledger is not None and starting_over and svc.session.last_checkpoint is None:
        text = f"no checkpoint loads; started again from the base model {svc.config.model} (--from-base)"
        svc.ledger.note("from-base", text)
        svc.say(f"evertrain: {text}")


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
