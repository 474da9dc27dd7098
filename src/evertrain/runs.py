"""Where everything of a run lives: every file and folder name, once, for the writers and the readers alike.

A *run folder* holds the run itself: its checkpoints and what training keeps beside them. It is the --output-dir of
`evertrain train`, or a workspace's current_model/. The *work folder* holds what people read: the logs and the
evolution snapshots. For `train` both are the same folder; for the daemon the work folder is the workspace.

    RUN/checkpoint-N/        one complete checkpoint (train/checkpoint.py), with evertrain_config.json
    RUN/trace.jsonl          which lines every optimizer step trained (observe/trace.py; --trace)
    RUN/tokens/              token stores, keyed by content and tokenizer (data/store.py)
    RUN/held_out/            each file's held-out slice (observe/evals.py)
    RUN/replay/              each finished file's replay sample (train/replay.py)
    RUN/references/          the reference log-probabilities of the preference and feedback files still open
    RUN/anchor.json          the anchor set (observe/anchor.py)
    WORK/logs/               evertrain.log, metrics.jsonl, evals.jsonl, anchor.jsonl, tensorboard/, tracker_run.json
    WORK/snapshots/          tracked.json, evolution/step-NNNNNNNN.json (observe/snapshots.py)
    WORK/probes.jsonl        a person's own tracked examples
    WORK/releases/           `evertrain serve --release`: step-N/ exports of the accepted models, latest -> step-N
    WORKSPACE/evertrain.toml, ledger.sqlite, inbox/, queue/, done/, failed/, rejected/, status/ (daemon/)
    WORKSPACE/feedback/      feedback.sqlite: the answers `evertrain serve --collect-feedback` keeps (serve/feedback.py)

    python -m evertrain.runs DIR      # print where each file of the run in DIR is
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evertrain import locks

CONFIG_FILE = "evertrain.toml"          # what makes a folder a workspace
LEDGER_FILE = "ledger.sqlite"
FEEDBACK_FILE = "feedback.sqlite"       # in feedback/
MODEL_DIR = "current_model"
STATUS_FILE = "training_status.json"    # in status/
SETTINGS_FILE = "evertrain_config.json"  # the resolved TrainConfig, in every checkpoint
LOGS_DIR = "logs"
LOG_FILE = "evertrain.log"
METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.jsonl"
DRIFT_FILE = "anchor.jsonl"
TRACE_FILE = "trace.jsonl"
PROBES_FILE = "probes.jsonl"
WORKSPACE_FOLDERS = ("inbox", "queue", "done", "failed", "rejected", MODEL_DIR, "status", LOGS_DIR)


@dataclass(frozen=True)
class Run:
    """The places of one run: `run_dir` (checkpoints and what training keeps) and `work_dir` (logs, snapshots)."""

    run_dir: Path
    work_dir: Path

    @classmethod
    def at(cls, run_dir: Path, work_dir: Path | None = None) -> "Run":
        run_dir = Path(run_dir)
        return cls(run_dir, Path(work_dir) if work_dir is not None else run_dir)

    @property
    def is_workspace(self) -> bool:
        return (self.work_dir / CONFIG_FILE).is_file()

    # --- the run folder
    tokens = property(lambda self: self.run_dir / "tokens")
    held_out = property(lambda self: self.run_dir / "held_out")
    replay = property(lambda self: self.run_dir / "replay")
    references = property(lambda self: self.run_dir / "references")
    anchor = property(lambda self: self.run_dir / "anchor.json")
    trace = property(lambda self: self.run_dir / TRACE_FILE)

    # --- the work folder
    logs = property(lambda self: self.work_dir / LOGS_DIR)
    metrics = property(lambda self: self.logs / METRICS_FILE)
    evals = property(lambda self: self.logs / EVALS_FILE)
    drift = property(lambda self: self.logs / DRIFT_FILE)
    trackers = property(lambda self: self.logs / "tensorboard")   # TensorBoard's files, an Aim repo
    tracker_run = property(lambda self: self.logs / "tracker_run.json")
    snapshots = property(lambda self: self.work_dir / "snapshots")
    evolution = property(lambda self: self.snapshots / "evolution")
    tracked = property(lambda self: self.snapshots / "tracked.json")
    probes = property(lambda self: self.work_dir / PROBES_FILE)
    releases = property(lambda self: self.work_dir / "releases")


@dataclass
class Workspace:
    """The daemon's folder (daemon/workspace.py makes and checks it)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()

    config_file = property(lambda self: self.root / CONFIG_FILE)
    inbox = property(lambda self: self.root / "inbox")
    queue = property(lambda self: self.root / "queue")
    done = property(lambda self: self.root / "done")
    failed = property(lambda self: self.root / "failed")
    rejected = property(lambda self: self.root / "rejected")
    model_dir = property(lambda self: self.root / MODEL_DIR)
    status_dir = property(lambda self: self.root / "status")
    status_file = property(lambda self: self.status_dir / STATUS_FILE)
    logs = property(lambda self: self.root / LOGS_DIR)
    ledger_path = property(lambda self: self.root / LEDGER_FILE)
    feedback = property(lambda self: self.root / "feedback")
    feedback_log = property(lambda self: self.feedback / FEEDBACK_FILE)
    lock_path = property(lambda self: self.root / locks.LOCK_NAME)

    @property
    def run(self) -> Run:
        return Run(self.model_dir, self.root)


def open_run(root: Path) -> Run:
    """The run of a workspace or of a `train` output folder, to read (FileNotFoundError: no such folder)."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (give a workspace or the output dir of `evertrain train`)")
    if (root / CONFIG_FILE).is_file():
        return Workspace(root).run
    return Run.at(root)


def saved_settings(checkpoint_dir: Path) -> dict:
    """The settings a checkpoint was written with (its evertrain_config.json); {} when it has none that parses.
    TrainConfig.from_dict checks them; this only reads."""
    try:
        values = json.loads((Path(checkpoint_dir) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


if __name__ == "__main__":
    import sys

    run = open_run(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    for name in ("run_dir", "work_dir", "trace", "tokens", "held_out", "replay", "anchor", "logs", "metrics",
                 "evals", "drift", "snapshots", "releases"):
        print(f"{name:>10}  {getattr(run, name)}")
