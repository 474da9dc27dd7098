"""How the daemon reports what became of a file (a train/driver.py Outcome): its ledger row and state, the folder
it lies in (with NAME.error.txt where it failed or was rejected), the status, the log and notify_command.

    evertrain run DIR --once; evertrain status DIR     # every file's fate, as recorded here
"""

from __future__ import annotations

import json
import time

from evertrain import faults
from evertrain.daemon import controls
from evertrain.daemon.inbox import write_error
from evertrain.daemon.workspace import place
from evertrain.train import driver


def record(svc, row: dict, outcome: driver.Outcome) -> None:
    """The end of a file's turn: done (after the guards), skipped, interrupted to resume, rejected, or failed."""
    status = outcome.status
    if status == driver.ROLLED_BACK:
        rolled_back(svc, row, outcome)
    elif status == driver.FAILED:
        svc.ledger.sync_checkpoints(svc.ws.model_dir)
        fail(svc, row, f"{row['original_name']}: {outcome.error}; ended with the "
                       f"{svc.session.progress.files[-1].steps} steps it trained. To train it from its start, drop "
                       "it into the inbox again")
    elif status == driver.SKIPPED:
        skipped(svc, row)
    elif status == driver.INTERRUPTED:
        interrupted(svc, row, outcome.result)
    elif status == driver.REJECTED:
        rejected(svc, row, outcome.result)
    elif status == driver.NOT_DONE:
        fail(svc, row, f"{row['original_name']}: trained but NOT done: " + "; ".join(outcome.problems))
    else:
        done(svc, row, outcome.result)


def done(svc, row: dict, result) -> None:
    ledger, progress, name = svc.ledger, svc.session.progress, row["original_name"]
    rec = progress.files[-1]
    faults.hit("before-ledger-done")
    ledger.update(row["id"], state="done", steps_trained=rec.steps, first_step=rec.first_step,
                  last_step=rec.last_step, replayed=rec.replayed, finished_at=time.time(), error=None,
                  forgetting=json.dumps(rec.forgetting) if rec.forgetting else None)
    place(svc.ws, ledger.get(row["id"]))
    if rec.forgetting and rec.forgetting["tripped"]:
        alert = f"{name}: {rec.forgetting['reason']} (forgetting_action {rec.forgetting['action']}: kept)"
        svc.board.set(alert=alert)
        tell(svc, "forgetting", f"ALERT {alert}", file=name, file_id=row["id"], verdict=rec.forgetting)
    elif rec.forgetting and rec.forgetting["attempt"] > 1:
        tell(svc, "forgetting", f"{name}: passed the forgetting gate when trained again with a stronger replay "
                                f"dose ({rec.forgetting['reason']})", file=name, file_id=row["id"],
             verdict=rec.forgetting)
    tell(svc, "file_done", f"done {name}: {rec.steps}/{result.expected_steps} steps, global steps {rec.first_step}-"
                           f"{rec.last_step}, mean loss {result.loss:.4f}, checkpoint {checkpoint_name(svc)}",
         file=name, file_id=row["id"], global_step=progress.global_step, loss=result.loss)
    svc.board.set(global_step=progress.global_step, loss=result.loss)


def skipped(svc, row: dict) -> None:
    ledger, progress, name = svc.ledger, svc.session.progress, row["original_name"]
    rec = progress.files[-1]
    controls.clear(svc.ws, "skip")
    ledger.update(row["id"], state="skipped", steps_trained=rec.steps, first_step=rec.first_step if rec.steps
                  else None, last_step=rec.last_step if rec.steps else None, finished_at=time.time(),
                  error=f"skipped by request after {rec.steps}/{rec.expected_steps} steps")
    place(svc.ws, ledger.get(row["id"]))
    tell(svc, "file_skipped", f"skipped {name} after {rec.steps}/{rec.expected_steps} steps (global step "
                              f"{progress.global_step})", file=name, file_id=row["id"])


def interrupted(svc, row: dict, result) -> None:
    """Stopped at a step boundary (a stop, a pause, an urgent file): it goes back to the queue at its cursor."""
    if svc.reason is None:  # another process of the launch was told to stop (a signal reached it alone)
        svc.reason = "stop"
        svc.stop.set()
    svc.ledger.update(row["id"], state="queued", steps_trained=result.file_step)
    words = {"stop": "stopping", "pause": "paused", "urgent": "pre-empted by an urgent file"}[svc.reason]
    svc.say(f"evertrain: {row['original_name']} {words} at its step {result.file_step}/{result.expected_steps} "
            f"(global step {result.step_after}); it resumes there")
    svc.board.set(state="stopping" if svc.reason == "stop" else svc.board.data["state"])


def rejected(svc, row: dict, result) -> None:
    """The forgetting gate undid the file: it lies in rejected/ with the verdict, for a person to decide."""
    name, verdict = row["original_name"], result.gate
    reason = (f"{name}: REJECTED by the forgetting gate after {verdict['attempt']} attempt(s): {verdict['reason']}; "
              f"the run went back to global step {result.step_after}. To train it anyway, set forgetting_action = "
              f"\"alert\" in evertrain.toml (or raise forgetting_tolerance) and drop it into the inbox again")
    svc.ledger.sync_checkpoints(svc.ws.model_dir)
    svc.ledger.update(row["id"], state="rejected", steps_trained=0, first_step=None, last_step=None,
                      error=reason, forgetting=json.dumps(verdict), finished_at=time.time())
    write_error(place(svc.ws, svc.ledger.get(row["id"])) or svc.ws.rejected / row["name"], reason)
    svc.board.set(state="idle", current_file=None, current_file_id=None, global_step=result.step_after,
                  alert=reason)
    tell(svc, "file_rejected", reason, file=name, file_id=row["id"], verdict=verdict)


def rolled_back(svc, row: dict, outcome: driver.Outcome) -> None:
    """A NaN/inf loss: the run is back at its newest complete checkpoint; the file failed, the next one follows."""
    error, name = outcome.error, row["original_name"]
    tell(svc, "rollback", f"{name}: {error}; rolled back to the last good checkpoint", file=name, file_id=row["id"],
         global_step=error.step)
    svc.ledger.sync_checkpoints(svc.ws.model_dir)
    fail(svc, row, f"{name}: loss became {error.loss} at global step {error.step} (file step {error.file_step}); "
                   f"rolled back to {checkpoint_name(svc) or 'the initial model'} (global step "
                   f"{svc.session.progress.global_step}); the file is not trained further")


def duplicate(svc, row: dict, outcome: driver.Outcome) -> None:
    """Its content was trained in this run already: recorded as a duplicate of the first file that trained it."""
    sha, earlier = outcome.data.sha256, outcome.earlier
    first = next((r for r in svc.ledger.files(("done",)) if r["sha256"] == sha), None)
    note = (f"same content (sha256 {sha[:12]}) as {earlier.name}, trained at global steps "
            f"{earlier.first_step}-{earlier.last_step}; not trained again")
    svc.ledger.update(row["id"], state="duplicate", duplicate_of=first and first["id"], error=note,
                      finished_at=time.time())
    place(svc.ws, svc.ledger.get(row["id"]))
    svc.say(f"evertrain: {row['original_name']}: duplicate: {note}")
    svc.board.write()


def fail(svc, row: dict, reason: str) -> None:
    svc.ledger.update(row["id"], state="failed", error=reason, finished_at=time.time())
    target = place(svc.ws, svc.ledger.get(row["id"])) or svc.ws.failed / row["name"]
    write_error(target, reason)
    svc.board.set(state="idle", current_file=None, current_file_id=None)
    tell(svc, "file_failed", f"FAILED {reason}", file=row["original_name"], file_id=row["id"])


def tell(svc, event: str, text: str, **fields) -> None:
    """Say it, and tell notify_command (in a thread of its own: training never waits for it)."""
    svc.say(f"evertrain: {text}")
    svc.notify.send(event, text, workspace=str(svc.ws.root), **fields)


def summary(svc, since: float) -> int:
    """What happened to each file this call took or left waiting (`run --once`); the number that failed."""
    rows = [r for r in svc.ledger.files()
            if r["state"] in ("queued", "training") or (r["finished_at"] or 0) >= since]
    svc.say(f"evertrain: summary: {len(rows)} file(s)" + (":" if rows else ""))
    for r in rows:
        steps = f"{r['steps_trained']}/{r['expected_steps'] or '?'} steps"
        note = {"done": f"{steps}, global steps {r['first_step']}-{r['last_step']}",
                "queued": f"still queued, {steps}"}.get(r["state"]) or " · ".join(
            line.strip() for line in (r["error"] or "").splitlines() if line.strip())[:300]
        svc.say(f"  {r['original_name']} (id {r['id']}): {r['state']}" + (f": {note}" if note else ""))
    return sum(r["state"] == "failed" for r in rows)


def checkpoint_name(svc) -> str | None:
    ckpt = svc.session.last_checkpoint if svc.session else None
    return ckpt.name if ckpt else None
