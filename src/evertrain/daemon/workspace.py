"""The workspace folder: its layout, its one configuration file `evertrain.toml`, and its single-instance lock.

    evertrain init DIR --model M --batch-size 4     # writes DIR/evertrain.toml and the folders below

    DIR/evertrain.toml   [train] = TrainConfig fields, [daemon] = DaemonConfig fields
    DIR/inbox/           drop files here (inbox/urgent/, inbox/high/, inbox/low/ set a priority)
    DIR/queue/           taken files waiting or in training, renamed <id>-<name>
    DIR/done/            files trained to the end (and duplicates, and skipped files)
    DIR/failed/          files that could not be trained, each with <name>.error.txt
    DIR/rejected/        files the forgetting gate undid (gate.py), each with <name>.error.txt
    DIR/current_model/   the run: checkpoint-N/ folders, trace.jsonl, held_out/, replay/, tokens/
    DIR/status/          training_status.json and the control requests (paused, stop, skip)
    DIR/logs/            evertrain.log (rotated), metrics.jsonl, evals.jsonl, tensorboard/
    DIR/snapshots/       evolution snapshots (probes.jsonl beside evertrain.toml adds your own tracked examples)
    DIR/ledger.sqlite    every file, checkpoint and evaluation (see ledger.py); a copy is in every checkpoint
    DIR/ledger-broken-*/ a damaged ledger that `evertrain repair` moved aside (never deleted)
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from evertrain import locks
from evertrain.config import ConfigError, TrainConfig, _opt, check_fields, settings_from_dict
from evertrain.data.columns import toml_lines
from evertrain.files import write_text_atomic
from evertrain.locks import AlreadyRunning  # noqa: F401  (raised by lock)
from evertrain.runs import CONFIG_FILE, WORKSPACE_FOLDERS, Workspace

PRIORITIES = ("low", "normal", "high", "urgent")


@dataclass
class DaemonConfig:
    """Settings of the service itself; they can change between restarts without touching the run."""

    stable_seconds: float = _opt(2.0, "take an inbox file only after its size and mtime were unchanged this long",
                                 low=0.0, high=3600.0)
    incomplete_timeout: float = _opt(
        600.0, "an inbox file that looks cut short (a .jsonl/.csv/.tsv without its final newline, a .json array "
        "without its closing ], a .parquet without its footer) is still being written: wait this many seconds after "
        "its last change, then validate it as it is (a whole last line that does not parse is not waited for)",
        low=0.0, high=86400.0)
    poll_seconds: float = _opt(1.0, "rescan the inbox at least this often (file events wake it sooner)",
                               low=0.05, high=60.0)
    watch: bool = _opt(True, "use file-system events (watchdog) to notice files at once; --no-watch only polls")
    disk_margin_bytes: int = _opt(1 << 30, "free disk kept beyond one checkpoint's size before a file starts",
                                  low=0)
    checkpoint_budget_bytes: int = _opt(0, "delete old checkpoints beyond this many bytes in all (0: no budget)",
                                        low=0)
    notify_command: str = _opt("", "a shell command run with one JSON event on stdin when a file is done, fails or "
                               "is skipped, on a NaN rollback, when the disk runs low and when the daemon stops "
                               "(its failure is logged, never a reason to stop training)")
    notify_timeout: float = _opt(30.0, "seconds notify_command may take before it is ended", low=0.1, high=3600.0)
    status_interval: float = _opt(2.0, "rewrite status/training_status.json at least this often while training",
                                  low=0.1, high=60.0)

    def __post_init__(self) -> None:
        check_fields(self)


class NotAWorkspace(ConfigError):
    pass


def init(root: Path, train: dict, daemon: dict) -> Workspace:
    """Create the folders and write evertrain.toml; settings are checked before anything is written."""
    ws = Workspace(root)
    if ws.config_file.exists():
        raise ConfigError(f"{ws.config_file} already exists: {ws.root} is a workspace already "
                          f"(edit {CONFIG_FILE} to change daemon settings)")
    train_cfg = TrainConfig.from_dict(train, source="evertrain init")
    daemon_cfg = settings_from_dict(DaemonConfig, daemon, "evertrain init")
    for name in WORKSPACE_FOLDERS:
        (ws.root / name).mkdir(parents=True, exist_ok=True)
    write_text_atomic(ws.config_file, to_toml(train_cfg, daemon_cfg))
    return ws


def load(root: Path) -> tuple[Workspace, TrainConfig, DaemonConfig]:
    """Read and check evertrain.toml: unknown tables or keys and out-of-range values are refused by name."""
    ws = Workspace(root)
    if not ws.config_file.is_file():
        raise NotAWorkspace(f"{ws.root} is not an evertrain workspace (no {CONFIG_FILE}); "
                            f"create one with: evertrain init {root}")
    train_values, daemon_values = read_settings(ws.config_file)
    train = TrainConfig.from_dict(train_values, source=f"{ws.config_file} [train]")
    daemon = settings_from_dict(DaemonConfig, daemon_values, f"{ws.config_file} [daemon]")
    for name in WORKSPACE_FOLDERS:
        (ws.root / name).mkdir(exist_ok=True)  # a person may have removed an empty one
    return ws, train, daemon


def read_settings(path: Path, sections: tuple[str, ...] = ("train", "daemon", "data")) -> tuple[dict, dict]:
    """The [train] values (with [data.columns] folded into `columns`) and the [daemon] values of a TOML file;
    unknown sections and a columns table given twice are refused by name. `train --config` reads the same."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None
    unknown = sorted(set(doc) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: "
                          + ", ".join("[data.columns]" if s == "data" else f"[{s}]" for s in sections))
    for section in sections:
        if not isinstance(doc.get(section, {}), dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table")
    train_values = dict(doc.get("train", {}))
    columns = _columns_table(doc.get("data", {}), path)
    if columns:
        if train_values.get("columns"):
            raise ConfigError(f"{path}: columns are given twice ([train] columns and [data.columns]); keep one")
        train_values["columns"] = columns
    return train_values, dict(doc.get("daemon", {}))


def _columns_table(data: dict, source: Path) -> str:
    """[data.columns] (dataset field = format key) as the `columns` setting's text: "question=prompt,..."."""
    unknown = sorted(set(data) - {"columns"})
    columns = data.get("columns", {})
    if unknown or not isinstance(columns, dict):
        raise ConfigError(f"{source}: [data] holds only a [data.columns] table (dataset field = format key), "
                          f"got {', '.join(unknown) or repr(columns)}")
    bad = [k for k, v in columns.items() if not isinstance(v, str) or "," in k + v or "=" in k + v]
    if bad:
        raise ConfigError(f"{source}: [data.columns] {bad[0]} must map to a format key given as a string, "
                          'e.g. question = "prompt"')
    return ",".join(f"{k}={v}" for k, v in columns.items())


def to_toml(train: TrainConfig, daemon: DaemonConfig) -> str:
    """A commented evertrain.toml; every value is a flat scalar, so a writer of a few lines suffices."""
    out = ["# evertrain workspace settings; `evertrain run` reads them at start (restart it after an edit).",
           "# Settings marked (identity) define the run: they are fixed at the first step.", "",
           "# Map a dataset's own field names onto a format's keys, e.g. question = \"prompt\"",
           "[data.columns]"]
    out += toml_lines(dict(item.split("=", 1) for item in train.columns.split(",") if item))
    out.append("")
    for section, obj in (("train", train), ("daemon", daemon)):
        out.append(f"[{section}]")
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name == "columns":
                continue  # written as its own [data.columns] table below
            mark = " (identity)" if f.metadata.get("identity") else ""
            out.append(f"# {f.metadata['help']}{mark}")
            out.append(f"# {f.name} =  (not set)" if value is None else f"{f.name} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


# ------------------------------------------------------------------------------------------------- lock

def lock(ws: Workspace) -> int | None:
    """Hold the workspace's lock for the life of the process (the main process of a launch alone)."""
    if not locks.is_main_launch_process():
        return None
    return locks.hold(ws.lock_path, "daemon", "stop it first (evertrain stop)")


def daemon_pid(ws: Workspace) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon runs."""
    return locks.holder(ws.lock_path)


# ------------------------------------------------------------------------------------------------- names

def safe_name(name: str) -> str:
    """A file name that is plain ASCII and cannot climb out of a folder; the original is kept in the ledger."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "file"
    return cleaned[:120]


def printable(name: str) -> str:
    """A file name as text, whatever bytes it holds (undecodable bytes shown as \\xNN)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# Where a file of each state (ledger.STATES) lives.
FOLDER = {"queued": "queue", "training": "queue", "done": "done", "duplicate": "done", "skipped": "done",
          "failed": "failed", "rejected": "rejected"}


def place(ws: Workspace, row: dict) -> Path | None:
    """Move a file into the folder of its state (it may be in any of queue/, done/, failed/, rejected/); its path."""
    if not row or not row["name"]:
        return None
    target = ws.root / FOLDER[row["state"]] / row["name"]
    if target.exists() or target.is_symlink():
        return target
    for folder in ("queue", "done", "failed", "rejected"):
        src = ws.root / folder / row["name"]
        if src.exists() or src.is_symlink():
            src.rename(target)
            return target
    return None
