"""The forgetting gate: after every file, did it raise what earlier files taught, or drift from the base model?

Before a file's first step the gate takes its baseline: the held-out loss of every earlier file and the anchor's
loss (anchor.py), kept in the file's cursor (so a resumed file is judged against the same values). After the
file's last step the end-of-file evaluation gives the same numbers again. A rise of any of them beyond
`forgetting_tolerance` (relative to its value before the file) trips the gate, and `forgetting_action` says what
follows: `alert` records the verdict and training goes on; `rollback` and `retry` make the loop return status
"forgot" without ending the file, and `loop.undo_file` takes the run back to the checkpoint before it (retry:
once, with `retry_replay_boost` times the replay dose; then rollback).

Cost: the after-file numbers are the end-of-file evaluation that runs anyway (each slice at most `held_out_max`
examples) plus one pass over the anchor set; the baseline is the previous file's end-of-file numbers (the same
weights), measured again only after a restart. Both times are in the verdict ("seconds").

    evertrain train --dataset FILE --output-dir DIR --forgetting-action rollback; echo $?   # 7: rejected
"""

from __future__ import annotations

import time

from evertrain import anchor, collective, evals
from evertrain.data import FileData

FLOOR = 0.5  # nats: a rise is relative to max(loss before, FLOOR): a slice learnt to a loss near 0 (facts, memorised)
#                does not trip the gate by going from 0.005 to 0.1, which is still a token probability of 0.9


def active(config) -> bool:
    return config.forgetting_action != "off"


def undoes(config) -> bool:
    """Does a tripped gate take the run back (and so need the checkpoint before each file kept)?"""
    return config.forgetting_action in ("rollback", "retry")


def baseline(session, data: FileData) -> dict | None:
    """Every earlier file's held-out loss and the anchor's (per source), as the model stands before `data`."""
    if not active(session.config):
        return None
    t0 = time.perf_counter()
    earlier = [s for s in evals.seen_files(session) if s != data.sha256]
    step, known = session.measured or (None, None)
    if step == session.progress.global_step and set(earlier) <= set(known["files"]):
        values = {"files": {s: known["files"][s] for s in earlier}, "anchor": known["anchor"]}
    else:
        drift = anchor.measure(session)
        values = {"files": {r["file"]: r["loss"] for r in evals.measure(session, earlier)},
                  "anchor": drift and drift["by_source"]}
    return {**values, "seconds": time.perf_counter() - t0}


def remember(session, results: list[dict], drift: dict | None) -> None:
    """The end-of-file numbers, which are the next file's baseline (the same weights)."""
    session.measured = (session.progress.global_step, {"files": {r["file"]: r["loss"] for r in results},
                                                       "anchor": drift and drift["by_source"]})


def rise(before: float, after: float) -> float:
    return (after - before) / max(before, FLOOR)


def judge(session, data: FileData, before: dict | None, results: list[dict], drift: dict | None,
          seconds: float, attempt: int) -> dict | None:
    """The verdict on `data` (the main process's, on every process); None when the gate is off or unmeasured."""
    verdict = None
    if session.is_main and before is not None:
        cfg = session.config
        tol, after = cfg.forgetting_tolerance, {r["file"]: r for r in results}
        files = []
        for sha, b in before["files"].items():
            if sha in after and sha != data.sha256:
                a = after[sha]["loss"]
                files.append({"file": sha, "file_name": after[sha]["file_name"], "before": b, "after": a,
                              "rise": rise(b, a), "over": rise(b, a) > tol})
        anchor_rise = None
        if before["anchor"] and drift:
            # The anchor items drawn from this file are its own prompts: the file is meant to change their answers.
            b, a = (anchor.summary(before["anchor"], data.sha256), anchor.summary(drift["by_source"], data.sha256))
            if b["loss"] is not None and a["loss"] is not None:
                anchor_rise = {"before": b["loss"], "after": a["loss"], "rise": rise(b["loss"], a["loss"]),
                               "kl_before": b["kl"], "kl_after": a["kl"], "over": rise(b["loss"], a["loss"]) > tol}
        over = [f for f in files if f["over"]] + ([dict(anchor_rise, file_name="the anchor")]
                                                  if anchor_rise and anchor_rise["over"] else [])
        verdict = {"file": data.sha256, "file_name": data.name, "step": session.progress.global_step,
                   "attempt": attempt, "tolerance": tol, "action": cfg.forgetting_action, "tripped": bool(over),
                   "files": files, "anchor": anchor_rise, "seconds": round(seconds + before["seconds"], 3),
                   "reason": reason(over, tol)}
    return collective.from_main(session.accelerator, verdict)


def reason(over: list[dict], tolerance: float) -> str:
    if not over:
        return f"no held-out loss rose by more than {tolerance:.0%}"
    worst = sorted(over, key=lambda f: -f["rise"])
    parts = [f"{f['file_name']}'s loss {f['before']:.3f} -> {f['after']:.3f} ({f['rise']:+.0%})" for f in worst[:3]]
    more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
    return f"forgetting: raised {', '.join(parts)}{more}; tolerance {tolerance:.0%}"


def last_rises(progress, cursor=None) -> dict[str, float]:
    """Each earlier file's rise (and "anchor"'s) at the newest verdict: the one that sent `cursor`'s file back to
    be trained again, else the run's last. What weighted replay leans toward."""
    verdicts = [cursor.forgot] if cursor is not None and cursor.forgot else []
    verdicts += [rec.forgetting for rec in reversed(progress.files) if rec.forgetting]
    if not verdicts:
        return {}
    out = {f["file"]: f["rise"] for f in verdicts[0]["files"]}
    if verdicts[0].get("anchor"):
        out["anchor"] = verdicts[0]["anchor"]["rise"]
    return out
