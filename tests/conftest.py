"""Shared fixtures and helpers: the tiny model folder and its tokenizer, JSONL writers, the real CLI run in-process
or in a process of its own, the steps in a trace, and a browser for the dashboard. The daemon's: daemon_helpers.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_model_dir  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tok(tiny_model):
    """The tiny model's tokenizer, as evertrain loads it."""
    from evertrain.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def browser():
    """Debian's headless chromium; the test is skipped without it, except under CI=true, where it fails."""
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is required under CI and missing ({CHROMIUM}); the test set-up installs it")
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium) to drive the dashboard")
    return path


def free_port() -> int:
    """A port the OS says is free now (for a launcher that wants a number, not 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list) -> Path:
    """Each row a line: a string as it is, anything else as JSON. The folder is made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def text_rows(n: int, tag: str = "x") -> list[dict]:
    """n distinct text examples of varied lengths."""
    return [{"text": f"{tag} example {i}: " + "abc " * (i % 7 + 1)} for i in range(n)]


def cli(*args) -> int:
    """Run the real `evertrain` command in this process; returns its exit code."""
    from evertrain.cli import main

    return main([str(a) for a in args])


def evertrain(*args, fault: str | None = None, timeout: float = 300, wait: bool = True, env: dict | None = None,
              **popen):
    """`python -m evertrain ARGS` in a process of its own, with EVERTRAIN_FAULT set to `fault` (and otherwise unset)
    over `env` (this process's environment if None). wait: to its end, at most `timeout` seconds, its output
    captured as text (a CompletedProcess); else started and returned (a Popen), stdout and stderr piped unless
    `popen` says otherwise."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "EVERTRAIN_FAULT"}
    if fault:
        env["EVERTRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "evertrain", *map(str, args)]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **popen)
    return subprocess.Popen(cmd, env=env, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                                             **popen})


def clean_env() -> dict:
    """This process's environment without what a launcher sets for its ranks: a launch from a test starts afresh."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD"))}


@contextlib.contextmanager
def settings_saved_without(*keys: str):
    """Inside, a run saves its settings without `keys`, as a version from before those settings wrote them."""
    from evertrain.config import TrainConfig

    real = TrainConfig.to_dict

    def as_an_older_version_wrote_it(self):
        d = real(self)
        for key in keys:
            d.pop(key)
        return d

    with pytest.MonkeyPatch.context() as m:
        m.setattr(TrainConfig, "to_dict", as_an_older_version_wrote_it)
        yield


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
    """Optimizer steps in an output folder's trace.jsonl (a run with --trace; a workspace's: ws / "current_model");
    0 before the trace exists."""
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


def nested(depth: int) -> bytes:
    """A JSON record holding `depth` containers, counting itself: {"text": [[...]]}."""
    return b'{"text": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def explode_on_boom(monkeypatch):
    """Reading a line that holds "boom" raises MemoryError, as a reader meeting poison might."""
    from evertrain.data import containers

    real = containers._too_deep

    def too_deep(line, limit):
        if b"boom" in line:
            raise MemoryError()
        return real(line, limit)

    monkeypatch.setattr(containers, "_too_deep", too_deep)


def random_examples(n: int):
    """n Examples of random token ids (seeded), 5, 8, 11... long, their first token unlabelled."""
    import torch

    from evertrain.data import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 200, (5 + 3 * i,), generator=g).tolist()
        out.append(Example(line=i, format="text", input_ids=ids, labels=[-100] + ids[1:]))
    return out


# The forgetting tests' files: facts, the same facts contradicted (the same prompts, other answers), other facts.
FACTS = 40


def facts(answer, lines=range(FACTS)) -> list[dict]:
    return [{"prompt": f"What is fact {i}?", "completion": f" {answer(i)}"} for i in lines]


OLD = facts(lambda i: f"alpha {i}")
CONTRADICTING = facts(lambda i: f"zulu {i}")
OTHER = facts(lambda i: f"alpha {i}", range(FACTS, 2 * FACTS))  # agrees with OLD
