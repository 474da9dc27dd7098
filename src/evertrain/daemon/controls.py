"""Controls: requests a person (or a script) leaves in status/ for the daemon, read before every optimizer step.

    status/paused          while it exists, nothing trains (it survives a restart: a pause is a decision)
    status/stop.request    checkpoint at the next step boundary and exit
    status/skip.request    {"file_id": N}: end file N now, marked skipped with the steps it got

    evertrain pause DIR; evertrain resume DIR; evertrain stop DIR; evertrain skip DIR

Pins are kept in the ledger (`pin`, shared by `evertrain pin` and the dashboard); they work with the daemon
stopped too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from evertrain.files import write_json_atomic
from evertrain.runs import Workspace
from evertrain.train import checkpoint


@dataclass
class Requests:
    paused: bool
    stop: bool
    skip_id: int | None


def read(ws: Workspace) -> Requests:
    d = ws.status_dir
    skip_id = None
    if os.path.exists(d / "skip.request"):
        try:
            skip_id = int(json.loads((d / "skip.request").read_text())["file_id"])
        except (OSError, ValueError, KeyError, TypeError):
            skip_id = -1  # unreadable: dropped by `clear`
    return Requests(paused=os.path.exists(d / "paused"), stop=os.path.exists(d / "stop.request"), skip_id=skip_id)


def pause(ws: Workspace) -> None:
    write_json_atomic(ws.status_dir / "paused", {"paused": True})


def resume(ws: Workspace) -> bool:
    """False when it was not paused."""
    try:
        os.unlink(ws.status_dir / "paused")
        return True
    except FileNotFoundError:
        return False


def stop(ws: Workspace) -> None:
    write_json_atomic(ws.status_dir / "stop.request", {"stop": True})


def skip(ws: Workspace, file_id: int) -> None:
    write_json_atomic(ws.status_dir / "skip.request", {"file_id": file_id})


def clear(ws: Workspace, name: str) -> None:
    """The daemon acknowledges a request: `stop` or `skip`."""
    try:
        os.unlink(ws.status_dir / f"{name}.request")
    except FileNotFoundError:
        pass


def pin(ws: Workspace, ledger, step: int, on: bool = True) -> tuple[bool, str]:
    """Pin (or unpin) checkpoint-STEP; (done, what to say). Only a complete checkpoint can be pinned."""
    if not on:
        if ledger.unpin(step):
            return True, f"unpinned checkpoint-{step}"
        return True, f"checkpoint-{step} was not pinned"
    if checkpoint.read_state(checkpoint.final_path(ws.model_dir, step)) is None:
        have = ", ".join(str(c.step) for c in reversed(checkpoint.candidates(ws.model_dir))) or "none"
        return False, f"no complete checkpoint-{step} in {ws.model_dir} (steps there: {have})"
    ledger.pin(step)
    return True, f"pinned checkpoint-{step}; retention will never delete it"
