"""Shared pieces of the daemon tests: a workspace on the tiny model, dropping files, a daemon in a thread, the
ledger's rows, each file's lines trained exactly once."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from conftest import cli

FAST = ("--batch-size", "4", "--no-packing", "--trace", "--held-out-fraction", "0", "--stable-seconds", "0", "--poll-seconds", "0.05",
        "--disk-margin-bytes", "0", "--status-interval", "0.1", "--save-steps", "0", "--learning-rate", "1e-3",
        "--warmup-steps", "0", "--incomplete-timeout", "0")  # a cut last line fails at once, not in 10 minutes


def make_ws(tmp_path: Path, model: Path, *extra, settings: tuple = FAST) -> Path:
    """`evertrain init tmp_path/ws` on `model` with `settings` (the fast ones unless told), then `extra`."""
    ws = tmp_path / "ws"
    assert cli("init", ws, "--model", model, *settings, *extra) == 0
    return ws


def rows(n: int, tag: str) -> list[dict]:
    return [{"text": f"{tag} line {i}: " + "ab " * (i % 5 + 1)} for i in range(n)]


def drop(ws: Path, name: str, content: list[dict] | str, *, folder: str = "inbox") -> Path:
    """The documented safe way: write elsewhere in the workspace, then rename into the inbox."""
    text = content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
    tmp = ws / f".staging-{name.replace('/', '_')}"
    tmp.write_text(text)
    target = ws / folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, target)
    return target


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def ledger_rows(ws: Path) -> list[dict]:
    db = sqlite3.connect(ws / "ledger.sqlite", timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM files ORDER BY id")]
    finally:
        db.close()


def by_name(ws: Path) -> dict[str, dict]:
    return {r["original_name"]: r for r in ledger_rows(ws)}


def status(ws: Path) -> dict:
    """The daemon's status file; {} before its first write. It is replaced atomically, so a torn one (a
    ValueError here) would be a bug to see, not to pass over."""
    try:
        return json.loads((ws / "status" / "training_status.json").read_text())
    except FileNotFoundError:
        return {}


class ThreadDaemon:
    """`evertrain run DIR` in a thread of the test process (no signals there: stopped with `evertrain stop`)."""

    def __init__(self, ws: Path):
        self.ws, self.rc = ws, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: status(ws).get("state") in ("idle", "preparing", "training", "paused") and status(ws).get("pid")
                 == os.getpid() or self.rc is not None, what="the daemon to start")

    def _run(self):
        self.rc = cli("run", self.ws)

    def stop(self, timeout: float = 60) -> int:
        if self.thread.is_alive():
            cli("stop", self.ws)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not stop"
        return self.rc


def coverage_by_sha(ws: Path) -> dict:
    from evertrain.observe import trace

    return trace.coverage(ws / "current_model" / "trace.jsonl")


def assert_exactly_once(ws: Path, row: dict, n_lines: int) -> None:
    """The file of a ledger row had each of its `n_lines` lines trained exactly once."""
    counts = coverage_by_sha(ws)[row["sha256"]]
    assert sorted(counts) == list(range(n_lines)) and set(counts.values()) == {1}, row["original_name"]


def slow_steps(monkeypatch) -> None:
    """At least 10 ms a step, so that a fast machine cannot finish a file before a control lands."""
    from evertrain.train import objectives

    real = objectives.collate

    def collate(*a):
        time.sleep(0.01)
        return real(*a)

    monkeypatch.setattr(objectives, "collate", collate)


def assert_trained_once(ws: Path, lines: dict[str, int], epochs: int = 1) -> None:
    """Every file named in `lines` (original name -> its number of lines) is done, and trace.jsonl shows each of
    its lines trained exactly once (`epochs` times), in one unbroken history of global steps."""
    from evertrain.observe import trace

    tr = ws / "current_model" / "trace.jsonl"
    steps = [r["step"] for r in trace.read(tr) if "step" in r]
    assert steps == list(range(1, len(steps) + 1)), "the trace has a gap or a repeated step"
    coverage, files = trace.coverage(tr), by_name(ws)
    for name, n in lines.items():
        row = files[name]
        assert row["state"] == "done", (name, row["state"], row["error"])
        counts = coverage[row["sha256"]]
        assert sorted(counts) == list(range(n)) and set(counts.values()) == {epochs}, (name, counts)


def debris(ws: Path) -> list[str]:
    """Temporary files and folders that crashed or failed writes could leave."""
    return [p.name for folder in (ws / "current_model", ws / "status", ws / "queue") if folder.is_dir()
            for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-", ".copying-")) or
            (p.name.startswith(".") and p.name.endswith(".tmp"))]
