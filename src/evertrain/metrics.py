"""Per-step metrics: WORKDIR/logs/metrics.jsonl always, TensorBoard event files when `tensorboard` is installed.

File boundaries go to TensorBoard as text events, so `tensorboard --logdir WORKDIR/logs/tensorboard` shows
where each file started and ended on the loss curve.

    evertrain train --dataset FILE --output-dir DIR && tensorboard --logdir DIR/logs/tensorboard
"""

from __future__ import annotations

import json

from evertrain import faults


def _writer(session):
    if session.tensorboard is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            session.tensorboard = False
        else:
            session.tensorboard = SummaryWriter(str(session.logs_dir / "tensorboard"), max_queue=100)
    return session.tensorboard or None


def log_step(session, record: dict) -> None:
    """Record one optimizer step (main process only)."""
    if not session.is_main:
        return
    faults.hit("metrics-write")
    with open(session.logs_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tb = _writer(session)
    if tb:
        step = record["step"]
        for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
            if record.get(key) is not None:
                tb.add_scalar(f"train/{key}", record[key], step)


def file_event(session, text: str) -> None:
    """A file started or finished: the console, and a text marker on TensorBoard's step axis."""
    session.say(f"evertrain: {text}")
    tb = _writer(session) if session.is_main else None
    if tb:
        def mark():
            tb.add_text("files", text, session.progress.global_step)
            tb.flush()

        session.degraded.attempt("logs/tensorboard", mark)


def log_evals(session, results: list[dict]) -> None:
    tb = _writer(session) if session.is_main else None
    if tb:
        session.degraded.attempt("logs/tensorboard", lambda: [
            tb.add_scalar(f"held_out/{r['file_name']}", r["loss"], r["step"]) for r in results])
