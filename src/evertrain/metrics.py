"""Per-step metrics: WORKDIR/logs/metrics.jsonl always, TensorBoard event files when `tensorboard` is installed.

File boundaries go to TensorBoard as text events, so `tensorboard --logdir WORKDIR/logs/tensorboard` shows
where each file started and ended on the loss curve.

    evertrain train --dataset FILE --output-dir DIR && tensorboard --logdir DIR/logs/tensorboard
"""

from __future__ import annotations

import json
import threading

from evertrain import disk, faults


def _writer(session):
    if session.tensorboard is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            session.tensorboard = False
        else:
            _quiet_full_disk_in_threads()
            # None again on a full disk (said once): tried again at the next event
            session.tensorboard = session.degraded.attempt(
                "logs/tensorboard", lambda: SummaryWriter(str(session.logs_dir / "tensorboard"), max_queue=100))
    return session.tensorboard or None


def _quiet_full_disk_in_threads() -> None:
    """TensorBoard writes from a thread of its own: on a full disk that thread dies printing a traceback, and the
    writer raises the same error again in the caller, where Degraded says it in one line. Keep the one line."""
    if getattr(threading.excepthook, "evertrain", False):
        return
    previous = threading.excepthook

    def hook(args):
        if not disk.is_full(args.exc_value):
            previous(args)

    hook.evertrain = True
    threading.excepthook = hook


def _to_tensorboard(session, write) -> None:
    """`write(writer)` on a full disk: skipped (said once), and the writer dropped, since its thread died with the
    error and would raise it again forever; a new one is made at the next event."""
    tb = _writer(session) if session.is_main else None
    if tb and session.degraded.attempt("logs/tensorboard", lambda: write(tb), default=False) is False:
        session.tensorboard = None


def log_step(session, record: dict) -> None:
    """Record one optimizer step (main process only); the caller skips it on a full disk (loop.log_step)."""
    if not session.is_main:
        return
    faults.hit("metrics-write")
    with open(session.logs_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")

    def scalars(tb):
        for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
            if record.get(key) is not None:
                tb.add_scalar(f"train/{key}", record[key], record["step"])

    _to_tensorboard(session, scalars)


def file_event(session, text: str) -> None:
    """A file started or finished: the console, and a text marker on TensorBoard's step axis."""
    session.say(f"evertrain: {text}")

    def mark(tb):
        tb.add_text("files", text, session.progress.global_step)
        tb.flush()

    _to_tensorboard(session, mark)


def log_evals(session, results: list[dict]) -> None:
    _to_tensorboard(session, lambda tb: [tb.add_scalar(f"held_out/{r['file_name']}", r["loss"], r["step"])
                                         for r in results])
