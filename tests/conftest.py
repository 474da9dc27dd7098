"""Shared fixtures: the tiny model folder, JSONL writers, and the real CLI run in-process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


def free_port() -> int:
    """A port the OS says is free now (for a launcher that wants a number, not 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def text_rows(n: int, tag: str = "x") -> list[dict]:
    """n distinct text examples of varied lengths."""
    return [{"text": f"{tag} example {i}: " + "abc " * (i % 7 + 1)} for i in range(n)]


def cli(*args) -> int:
    """Run the real `evertrain` command in this process; returns its exit code."""
    from evertrain.cli import main

    return main([str(a) for a in args])


def break_weights_at(monkeypatch, file_step: int, sha256: str | None = None) -> list:
    """From now on, the weights turn NaN when the file in training (only `sha256`, if given) reaches `file_step`,
    as a bad update would leave them. Returns the sessions setup makes (a rollback makes one more)."""
    import torch

    from evertrain.train import objectives
    from evertrain.train import setup as setup_module

    sessions, real_session, real_collate = [], setup_module.Session, objectives.collate

    def session(*a, **k):
        sessions.append(real_session(*a, **k))
        return sessions[-1]

    def collate(batch_rows, pad_id, device):
        progress = sessions[-1].progress
        cursor = progress.cursors.get(progress.current or "")
        if cursor is not None and cursor.file_step == file_step and sha256 in (None, progress.current):
            with torch.no_grad():
                for p in sessions[-1].model.parameters():
                    p.fill_(float("nan"))
        return real_collate(batch_rows, pad_id, device)

    monkeypatch.setattr(setup_module, "Session", session)
    monkeypatch.setattr(objectives, "collate", collate)
    return sessions


def trained_steps(out) -> int:
    """Optimizer steps in an output folder's trace.jsonl (a run with --trace)."""
    try:
        return (out / "trace.jsonl").read_text().count('"step"')
    except FileNotFoundError:
        return 0


def run_and_kill_after(cmd, out, steps: int, deadline_s: float = 120) -> None:
    """Start `cmd` and kill -9 it once its trace holds `steps` steps (or it ended by itself)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + deadline_s
    while trained_steps(out) < steps and proc.poll() is None:
        assert time.monotonic() < end, "the run never reached the step to kill it at"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
