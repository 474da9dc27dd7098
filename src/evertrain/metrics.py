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
import json
import os
import threading
import uuid
from pathlib import Path

from evertrain import disk, faults
from evertrain.config import ConfigError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "aim": "aim"}  # report_to name -> the package it needs
PROJECT = "evertrain"
RUN_FILE = "tracker_run.json"


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


def tracker_dir(logs_dir: Path) -> Path:
    """Where the trackers that write files keep them: TensorBoard in tensorboard/evertrain/, an Aim repo."""
    return logs_dir / "tensorboard"


def start(session, hparams: dict) -> None:
    """Begin (or continue) the run's tracker run; the hyperparameters are logged only when it is new."""
    acc = session.accelerator
    if not acc.log_with:
        return
    path = session.logs_dir / RUN_FILE
    record = _read(path)
    new = record is None
    if new:
        record = {"name": f"{PROJECT}-{uuid.uuid4().hex[:8]}", "ids": {}}
    ids = record["ids"]
    if "mlflow" in _names(acc) and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # A store in the run's own folder, needing no server and no database driver. MLflow 3 keeps its file
        # store only on request: evertrain chose it here, so it makes that request (a URI you set is left alone).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((session.logs_dir / "mlruns").absolute().as_uri())
    init = {"wandb": {"id": ids.get("wandb") or record["name"], "resume": "allow", "name": record["name"]},
            "mlflow": {"run_id": ids.get("mlflow"), "run_name": record["name"]},
            "trackio": {"name": record["name"], "resume": "allow"},
            "aim": {"run_hash": ids["aim"]} if ids.get("aim") else {}}
    _quiet_full_disk_in_threads()
    acc.init_trackers(PROJECT, config=_flat(hparams) if new else None,
                      init_kwargs={k: v for k, v in init.items() if k in _names(acc)})
    if not session.is_main:
        return
    for name, get_id in (("wandb", lambda t: t.id), ("mlflow", lambda t: t.info.run_id),
                         ("aim", lambda t: t.hash)):
        if name in _names(acc):
            ids[name] = get_id(acc.get_tracker(name, unwrap=True))
    from evertrain.checkpoint import write_json_atomic

    write_json_atomic(path, record)


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


def _to_trackers(session, what: str, write) -> None:
    """A tracker write, skipped (said once) on a full disk: it reports, and must never stop the training."""
    if session.is_main and session.accelerator.log_with:
        session.degraded.attempt(what, write)


def _names(acc) -> set[str]:
    return {str(t).lower().split(".")[-1] for t in acc.log_with}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flat(values: dict) -> dict:
    """Hyperparameters as the trackers take them: str, int, float, bool (None as an empty string)."""
    return {k: "" if v is None else v for k, v in values.items()}


def log_step(session, record: dict) -> None:
    """Record one optimizer step (main process only); the caller skips it on a full disk (loop.log_step)."""
    if not session.is_main:
        return
    faults.hit("metrics-write")
    with open(session.logs_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    values = {f"train/{tag}": record[key] for key, tag in (("loss", "loss"), ("lr", "learning_rate"),
                                                           ("grad_norm", "grad_norm"),
                                                           ("tokens_per_second", "tokens_per_second"))
              if record.get(key) is not None}
    _to_trackers(session, "the trackers", lambda: session.accelerator.log(values, step=record["step"]))


def file_event(session, text: str) -> None:
    """A file started or finished: the console, and a text marker on TensorBoard's step axis."""
    session.say(f"evertrain: {text}")
    if "tensorboard" in _names(session.accelerator):
        _to_trackers(session, "logs/tensorboard", lambda: session.accelerator.get_tracker("tensorboard").log(
            {"files": text}, step=session.progress.global_step))


def log_evals(session, results: list[dict]) -> None:
    _to_trackers(session, "the trackers", lambda: [
        session.accelerator.log({f"eval/{r['file_name']}/loss": r["loss"]}, step=r["step"]) for r in results])


def log_drift(session, drift: dict | None) -> None:
    """The anchor's loss and KL to the base model (anchor.py), as the trackers' drift curves."""
    if drift is not None and drift["loss"] is not None:
        _to_trackers(session, "the trackers", lambda: session.accelerator.log(
            {"anchor/loss": drift["loss"], "anchor/kl": drift["kl"]}, step=session.progress.global_step))


def finish(session) -> None:
    """Close the trackers (a wandb or mlflow run is marked finished; the next start continues it)."""
    if session.accelerator.log_with:
        session.degraded.attempt("the trackers", session.accelerator.end_training)
