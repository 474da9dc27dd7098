"""Per-step metrics: WORKDIR/logs/metrics.jsonl always, and the trackers of `report_to` through accelerate's
tracker integration (`Accelerator(log_with=...)`, `init_trackers`, `accelerator.log`).

Tags are named like the Trainer's: train/loss, train/learning_rate, train/grad_norm, train/tokens_per_second,
eval/<file>/loss; the start and end of every file go to TensorBoard as text. One tracker run per evertrain run:
its name and ids are kept in WORKDIR/logs/tracker_run.json, so a restart, a resume or the next file logs into the
same run; the run's settings are logged as hyperparameters once, when that run is made.

    evertrain train --dataset FILE --output-dir DIR && tensorboard --logdir DIR/logs/tensorboard
    evertrain train --dataset FILE --output-dir DIR --report-to mlflow     # MLFLOW_TRACKING_URI, else DIR/logs/mlruns
"""

from __future__ import annotations

import importlib.util
import os
import threading
import uuid
from pathlib import Path

from evertrain import disk, faults, logs
from evertrain.config import ConfigError
from evertrain.files import append_json_line, read_json, read_records, write_json_atomic
from evertrain.runs import Run

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "aim": "aim"}  # report_to name -> the package it needs
PROJECT = "evertrain"


def log_with(report_to: str, *, default: bool) -> list[str]:
    """The trackers to start. A tracker asked for whose package is missing is one clear error; the default
    (tensorboard) is skipped quietly when tensorboard is not installed."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing and default:
        return [n for n in names if n not in missing]
    if missing:
        raise ConfigError(f"report_to {', '.join(missing)}: the {' and '.join(TRACKERS[n] for n in missing)} "
                          f"package is not installed (pip install 'evertrain[{missing[0]}]')")
    return names


def add_committed(records: list[dict], record: dict, key: str = "step") -> bool:
    """Append a line of a log to `records`, dropping those it replaces: a line whose step is not above the last
    one's means the run resumed from an older checkpoint and trained those steps again, and only the newer lines
    are its committed history. True when lines were dropped."""
    dropped = False
    while records and records[-1][key] >= record[key]:
        records.pop()
        dropped = True
    records.append(record)
    return dropped


def read_committed(path: Path) -> list[dict]:
    """logs/metrics.jsonl as the run's committed history (see add_committed)."""
    out: list[dict] = []
    for r in read_records(path):
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            add_committed(out, r)
    return out


class Metrics:
    """The run's metrics for one session: every step to logs/metrics.jsonl and the trackers, a console line every
    `log_steps`; evaluations, drift and file events to the trackers. Writes go through `degraded`: a full disk
    skips them (said once), never the training."""

    def __init__(self, accelerator, run: Run, log_steps: int, degraded: disk.Degraded):
        self.acc, self.run, self.log_steps, self.degraded = accelerator, run, log_steps, degraded
        self.is_main = accelerator.is_main_process

    def start(self, hparams: dict) -> None:
        """Begin (or continue) the run's tracker run; the hyperparameters are logged only when it is new."""
        acc = self.acc
        if not acc.log_with:
            return
        record = read_json(self.run.tracker_run)
        new = not isinstance(record, dict)
        if new:
            record = {"name": f"{PROJECT}-{uuid.uuid4().hex[:8]}", "ids": {}}
        ids = record["ids"]
        if "mlflow" in self.names() and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # A store in the run's own folder, needing no server and no database driver. MLflow 3 keeps its file
            # store only on request: evertrain chose it here, so it makes that request (a URI you set is left alone).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.run.logs / "mlruns").absolute().as_uri())
        init = {"wandb": {"id": ids.get("wandb") or record["name"], "resume": "allow", "name": record["name"]},
                "mlflow": {"run_id": ids.get("mlflow"), "run_name": record["name"]},
                "trackio": {"name": record["name"], "resume": "allow"},
                "aim": {"run_hash": ids["aim"]} if ids.get("aim") else {}}
        _quiet_full_disk_in_threads()
        acc.init_trackers(PROJECT, config=_flat(hparams) if new else None,
                          init_kwargs={k: v for k, v in init.items() if k in self.names()})
        if not self.is_main:
            return
        for name, get_id in (("wandb", lambda t: t.id), ("mlflow", lambda t: t.info.run_id),
                             ("aim", lambda t: t.hash)):
            if name in self.names():
                ids[name] = get_id(acc.get_tracker(name, unwrap=True))
        write_json_atomic(self.run.tracker_run, record)

    def names(self) -> set[str]:
        return {str(t).lower().split(".")[-1] for t in self.acc.log_with}

    def step(self, record: dict) -> None:
        """One optimizer step (a train StepRecord as a dict): the log, the trackers, and the console every
        `log_steps` (and at a file's last step)."""
        if not self.is_main:
            return
        self.degraded.attempt(f"logs/{self.run.metrics.name}", lambda: self._append(record))
        values = {f"train/{tag}": record[key] for key, tag in (("loss", "loss"), ("lr", "learning_rate"),
                                                               ("grad_norm", "grad_norm"),
                                                               ("tokens_per_second", "tokens_per_second"))
                  if record.get(key) is not None}
        values.update({f"train/{name}": v for name, v in (record.get("objective") or {}).items()})
        self._to_trackers("the trackers", lambda: self.acc.log(values, step=record["step"]))
        if record["file_step"] % self.log_steps == 0 or record["file_step"] == record["file_total_steps"]:
            logs.say(f"  step {record['step']:>7}  {record['file_name']} {record['file_step']}/"
                     f"{record['file_total_steps']}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                     f"{record['tokens_per_second']:.0f} tok/s{judged(record.get('objective') or {})}",
                     progress=True)

    def _append(self, record: dict) -> None:
        faults.hit("metrics-write")
        append_json_line(self.run.metrics, record)

    def event(self, text: str, step: int) -> None:
        """A file started or finished: the console, and a text marker on TensorBoard's step axis."""
        if self.is_main:
            logs.say(f"evertrain: {text}")
        if "tensorboard" in self.names():
            self._to_trackers("logs/tensorboard", lambda: self.acc.get_tracker("tensorboard").log(
                {"files": text}, step=step))

    def evals(self, results: list[dict]) -> None:
        """Each held-out result as eval/<file>/loss (and, for judgments, its accuracy and margin)."""
        self._to_trackers("the trackers", lambda: [self.acc.log(
            {f"eval/{r['file_name']}/{k}": r[k] for k in ("loss", "accuracy", "margin") if k in r},
            step=r["step"]) for r in results])

    def drift(self, drift: dict | None, step: int) -> None:
        """The anchor's loss and KL to the base model (anchor.py), as the trackers' drift curves."""
        if drift is not None and drift["loss"] is not None:
            self._to_trackers("the trackers", lambda: self.acc.log(
                {"anchor/loss": drift["loss"], "anchor/kl": drift["kl"]}, step=step))

    def finish(self) -> None:
        """Close the trackers (a wandb or mlflow run is marked finished; the next start continues it).

        Not `Accelerator.end_training`: it also takes the process group down, each process at its own moment, and a
        launch then ends in the interpreter's teardown that collective.end_process exists to avoid (a rank aborted:
        "terminate called without an active exception")."""
        if self.acc.log_with:
            self.degraded.attempt("the trackers", lambda: [tracker.finish() for tracker in self.acc.trackers])

    def _to_trackers(self, what: str, write) -> None:
        """A tracker write, skipped (said once) on a full disk: it reports, and must never stop the training."""
        if self.is_main and self.acc.log_with:
            self.degraded.attempt(what, write)


def judged(values: dict) -> str:
    """The console's words for what a step's judgments say: how often the preferred answer won, by how much."""
    parts = [f"{label} {values[key]:.{digits}f}" for key, label, digits in (
        ("rewards/accuracies", "accuracy", 2), ("rewards/margins", "margin", 3), ("kl", "kl", 3)) if key in values]
    return "".join(f"  {p}" for p in parts)


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


def _flat(values: dict) -> dict:
    """Hyperparameters as the trackers take them: str, int, float, bool (None as an empty string)."""
    return {k: "" if v is None else v for k, v in values.items()}
