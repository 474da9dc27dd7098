"""status/training_status.json (rewritten atomically while the daemon works) and the `evertrain status` view.

    evertrain status DIR            # a table: the daemon's state, the queue, the last files
    evertrain status DIR --json     # {"status": training_status.json, "files": every ledger row}
"""

from __future__ import annotations

import json
import os
import time

from evertrain import disk, faults
from evertrain.logs import duration
from evertrain.daemon.ledger import Ledger
from evertrain.daemon.workspace import daemon_pid
from evertrain.files import write_json_atomic
from evertrain.runs import Workspace

STATUS_FILE = "training_status.json"


class Board:
    """What the daemon is doing, kept in memory and flushed to status/training_status.json."""

    def __init__(self, ws: Workspace, ledger: Ledger, interval: float, say=print):
        self.ws, self.ledger, self.interval = ws, ledger, interval
        self.degraded = disk.Degraded(say)  # a full disk: the state stays here, in memory, until it can be written
        self.last_write = 0.0
        self.seconds_per_step: float | None = None
        self.seconds_per_byte: float | None = None
        self.current_size = 0
        self.last_step_time: float | None = None
        self.data = {"state": "idle", "global_step": 0, "current_file": None, "current_file_id": None,
                     "prepare_percent": None, "eta_prepare_seconds": None,
                     "file_step": None, "file_total_steps": None, "loss": None, "learning_rate": None,
                     "tokens_per_second": None, "eta_file_seconds": None, "eta_queue_seconds": None,
                     "queue_length": 0, "files_done": 0, "files_failed": 0, "files_rejected": 0, "files_duplicate": 0,
                     "files_skipped": 0, "total_evals": 0, "last_checkpoint": None, "alert": None,
                     "precision": None, "global_batch": None,
                     "intake": None,
                     "pid": os.getpid(), "updated_at": None}

    def set(self, **values) -> None:
        """A change of state: written at once."""
        self.data.update(values)
        self.write()

    def start_file(self, row: dict, global_step: int, total_steps: int, file_step: int) -> None:
        self.current_size = row["size"] or 0
        self.last_step_time = None
        self.set(state="training", current_file=row["original_name"], current_file_id=row["id"],
                 prepare_percent=None, eta_prepare_seconds=None, file_step=file_step, file_total_steps=total_steps, global_step=global_step, alert=None)

    def step(self, record) -> None:
        """Every optimizer step (a loop.StepRecord); written every `interval` seconds."""
        now = time.monotonic()
        if self.last_step_time is not None:
            dt = now - self.last_step_time
            self.seconds_per_step = dt if self.seconds_per_step is None else 0.9 * self.seconds_per_step + 0.1 * dt
        self.last_step_time = now
        total = record.file_total_steps
        if self.seconds_per_step is not None and self.current_size:
            self.seconds_per_byte = self.seconds_per_step * total / self.current_size
        self.data.update(global_step=record.step, file_step=record.file_step, file_total_steps=total,
                         loss=record.loss, learning_rate=record.lr, tokens_per_second=record.tokens_per_second)
        if now - self.last_write >= self.interval:
            self.write()

    def write(self) -> None:
        d, counts = self.data, self.ledger.counts()
        eta_file = None
        if self.seconds_per_step is not None and d["file_total_steps"] is not None and d["state"] == "training":
            eta_file = (d["file_total_steps"] - (d["file_step"] or 0)) * self.seconds_per_step
        eta_queue = None
        if self.seconds_per_byte is not None:
            eta_queue = (eta_file or 0.0) + self.ledger.queued_bytes() * self.seconds_per_byte
        d.update(eta_file_seconds=eta_file, eta_queue_seconds=eta_queue, queue_length=counts["queued"],
                 files_done=counts["done"], files_failed=counts["failed"], files_rejected=counts["rejected"],
                 files_duplicate=counts["duplicate"],
                 files_skipped=counts["skipped"],
                 total_evals=self.ledger.db.execute("SELECT COUNT(*) FROM evals").fetchone()[0],
                 updated_at=time.time())
        path = self.ws.status_dir / STATUS_FILE

        def replace():
            faults.hit("status-write")
            write_json_atomic(path, d)

        self.degraded.attempt(f"the status file {path}", replace)
        self.last_write = time.monotonic()


def read(ws: Workspace) -> dict | None:
    try:
        return json.loads((ws.status_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def show(ws: Workspace, ledger: Ledger, as_json: bool = False) -> str:
    """The `evertrain status` output."""
    status = read(ws)
    running = daemon_pid(ws)
    if status is not None and not running and status.get("state") not in ("error",):
        status = dict(status, state="not running")
    if as_json:
        return json.dumps({"status": status, "daemon_pid": running, "files": ledger.files(),
                           "checkpoints": ledger.checkpoints(), "pins": sorted(ledger.pins()),
                           "events": ledger.events()}, indent=2)
    import io

    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    head = Table(title=f"evertrain workspace {ws.root}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    for k, v in (status or {"state": "never ran"}).items():
        if k == "state" and v == "preparing":
            eta = status.get("eta_prepare_seconds")
            v = (f"preparing {status.get('current_file')} {status.get('prepare_percent') or 0:.0f}%"
                 + (f", about {duration(eta)} left" if eta is not None else ""))
        if v is not None:
            head.add_row(k, _fmt(k, v))
    head.add_row("daemon", f"running, pid {running}" if running else "not running")
    console.print(head)

    queue = Table(title="queue (next first)")
    for col in ("id", "file", "priority", "steps", "bytes"):
        queue.add_column(col)
    for r in ledger.queue():
        queue.add_row(str(r["id"]), r["original_name"], r["priority"],
                      f"{r['steps_trained']}/{r['expected_steps'] or '?'}", str(r["size"]))
    console.print(queue)

    last = Table(title="last files")
    for col in ("id", "file", "state", "steps", "global steps", "note"):
        last.add_column(col)
    finished = [r for r in ledger.files() if r["state"] not in ("queued",)][-10:]
    for r in finished:
        span = f"{r['first_step']}-{r['last_step']}" if r["first_step"] else ""
        note = (r["error"] or "").splitlines()[0][:60] if r["error"] else ""
        verdict = json.loads(r["forgetting"]) if r.get("forgetting") else None
        if not note and verdict and verdict["tripped"]:  # kept by forgetting_action alert
            note = f"ALERT {verdict['reason']}"[:60]
        last.add_row(str(r["id"]), r["original_name"], r["state"],
                     f"{r['steps_trained']}/{r['expected_steps'] or '?'}", span, note)
    console.print(last)
    return console.file.getvalue()


def _fmt(key: str, value) -> str:
    if key.endswith("_seconds") and isinstance(value, (int, float)):
        return duration(value)
    if key == "updated_at":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
