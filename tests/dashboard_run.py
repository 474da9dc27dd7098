"""Real runs for the dashboard tests, built once per session in pytest's base temp folder (both dashboard test
modules share them): two files trained by the real `evertrain train` into an output folder, and the same two
files dropped into a daemon workspace and trained by the real `evertrain run`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from conftest import cli, write_jsonl

FILES = {"capitals.jsonl": [("The capital of France is", " Paris."), ("The capital of Spain is", " Madrid."),
                            ("The capital of Italy is", " Rome."), ("The capital of Japan is", " Tokyo."),
                            ("The capital of Peru is", " Lima."), ("The capital of Chile is", " Santiago.")],
         "colours.jsonl": [("The sky is", " blue."), ("Grass is", " green."), ("Snow is", " white."),
                           ("Coal is", " black."), ("Blood is", " red."), ("A lemon is", " yellow.")]}
PROBE = ("The capital of Peru is", " Lima.")
REPEAT = 3  # each pair several times (distinct lines): enough examples for a held-out slice and some steps


def COMMON(tiny_model: Path) -> tuple:  # noqa: N802  (the settings both runs share)
    # Snapshots may cost what they like here: the tiny model trains so fast that the default budget of 3%
    # would leave too few of them to look at.
    return ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--learning-rate", 3e-3,
            "--warmup-steps", 2, "--held-out-fraction", 0.2, "--save-steps", 4, "--keep-checkpoints", 3,
            "--snapshot-budget", 100, "--snapshot-per-file", 2, "--snapshot-new-tokens", 6)


def trained_run(tmp_path_factory, tiny_model: Path) -> Path:
    root = tmp_path_factory.getbasetemp() / "dashboard-run"
    run = root / "run"
    if (root / ".trained").exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    write_jsonl(run / "probes.jsonl", [{"prompt": PROBE[0], "completion": PROBE[1]}])
    for name, pairs in FILES.items():
        rows = [{"prompt": f"{p} ({i})", "completion": c} for i in range(REPEAT) for p, c in pairs]
        f = write_jsonl(root / name, rows)
        assert cli("train", "--dataset", f, "--output-dir", run, *COMMON(tiny_model)) == 0
    (root / ".trained").touch()
    return run


def trained_workspace(tmp_path_factory, tiny_model: Path) -> Path:
    """A daemon workspace (`evertrain init`, files dropped into inbox/, `evertrain run --once`)."""
    root = tmp_path_factory.getbasetemp() / "dashboard-workspace"
    ws = root / "ws"
    if (root / ".trained").exists():
        return ws
    assert cli("init", ws, *COMMON(tiny_model), "--stable-seconds", 0, "--no-watch") == 0
    write_jsonl(ws / "probes.jsonl", [{"prompt": PROBE[0], "completion": PROBE[1]}])
    for name, pairs in FILES.items():  # one after the other: the queue is first come, first served
        rows = [{"prompt": f"{p} ({i})", "completion": c} for i in range(REPEAT) for p, c in pairs]
        staged = write_jsonl(root / name, rows)
        staged.rename(ws / "inbox" / name)  # the documented safe way: write elsewhere, then move in
        assert cli("run", ws, "--once") == 0
    (root / ".trained").touch()
    return ws


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Serving:
    """A web Listener (the real uvicorn server) answering from a thread of this process."""

    def __init__(self, listener):
        self.server = listener
        self.port = listener.port
        self.thread = threading.Thread(target=listener.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.close()


class Served(Serving):
    """The dashboard of the run in `root`, on a port the OS chose."""

    def __init__(self, root: Path, host: str = "127.0.0.1", token: str | None = None):
        from evertrain.dashboard.server import make_server

        super().__init__(make_server(root, host, 0, token))
