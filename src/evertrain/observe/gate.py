"""The forgetting gate: after every file, did it raise what earlier files taught, or drift from the base model?

Before a file's first step the gate takes its baseline: the held-out loss of every earlier file and the anchor's
loss (anchor.py), kept in the file's cursor (so a resumed file is judged against the same values). After the
file's last step the end-of-file evaluation gives the same numbers again. A rise of any of them beyond
`forgetting_tolerance` (relative to its value before the file) trips the gate, and `forgetting_action` says what
follows: `alert` records the verdict and training goes on; `rollback` and `retry` make the loop return status
"forgot" without ending the file, and train/rollback.py `undo_file` takes the run back to the checkpoint before
it (retry: once, with `retry_replay_boost` times the replay dose; then rollback).

Cost: the after-file numbers are the end-of-file evaluation that runs anyway (each slice at most `held_out_max`
examples) plus one pass over the anchor set; the baseline is the previous file's end-of-file numbers (the same
weights), measured again only after a restart. Both times are in the verdict ("seconds").

    evertrain train --dataset FILE --output-dir DIR --forgetting-action rollback; echo $?   # 7: rejected
"""

from __future__ import annotations

import time

from evertrain import collective
from evertrain.data import FileData
from evertrain.observe import anchor

FLOOR = 0.5  # nats: a rise is relative to max(loss before, FLOOR): a slice learnt to a loss near 0 (facts, memorised)
#                does not trip the gate by going from 0.005 to 0.1, which is still a token probability of 0.9


def active(config) -> bool:
    return config.forgetting_action != "off"


def undoes(config) -> bool:
    """Does a tripped gate take the run back (and so need the checkpoint before each file kept)?"""
    return config.forgetting_action in ("rollback", "retry")


def rise(before: float, after: float) -> float:
    return (after - before) / max(before, FLOOR)


class Gate:
    """The gate of one session: its baseline before a file, its verdict after it. It keeps the last end-of-file
    numbers (the same weights as the next file's start), so the baseline is measured again only after a restart."""

    def __init__(self, config, accelerator, measure_files, measure_anchor):
        self.config, self.acc = config, accelerator
        self.measure_files, self.measure_anchor = measure_files, measure_anchor  # (model, shas) / (model) -> numbers
        self.measured: tuple | None = None  # (global step, {"files": {sha: loss}, "anchor": by_source})

    def baseline(self, model, earlier: list[str], global_step: int) -> dict | None:
        """Every earlier file's held-out loss and the anchor's (per source), as the model stands before a file."""
        if not active(self.config):
            return None
        t0 = time.perf_counter()
        step, known = self.measured or (None, None)
        if step == global_step and set(earlier) <= set(known["files"]):
            values = {"files": {s: known["files"][s] for s in earlier}, "anchor": known["anchor"]}
        else:
            drift = self.measure_anchor(model)
            values = {"files": {r["file"]: r["loss"] for r in self.measure_files(model, earlier)},
                      "anchor": drift and drift["by_source"]}
        return {**values, "seconds": time.perf_counter() - t0}

    def remember(self, global_step: int, files: dict[str, float], anchor_by_source: dict | None) -> None:
        """Held-out losses and the anchor's, as the model stood at `global_step`: the next baseline taken there
        needs no measuring (the end of a file; after a rollback, the baseline of the file undone)."""
        self.measured = (global_step, {"files": files, "anchor": anchor_by_source})

    def judge(self, data: FileData, global_step: int, before: dict | None, results: list[dict],
              drift: dict | None, seconds: float, attempt: int) -> dict | None:
        """The verdict on `data` (the main process's, on every process); None when the gate is off or unmeasured."""
        verdict = None
        if self.acc.is_main_process and before is not None:
            tol, after = self.config.forgetting_tolerance, {r["file"]: r for r in results}
            files = []
            for sha, b in before["files"].items():
                if sha in after and sha != data.sha256:
                    a = after[sha]["loss"]
                    files.append({"file": sha, "file_name": after[sha]["file_name"], "before": b, "after": a,
                                  "rise": rise(b, a), "over": rise(b, a) > tol})
            anchor_rise = None
            if before["anchor"] and drift:
                # The anchor items drawn from this file are its own prompts: the file is meant to change their
                # answers.
                b, a = (anchor.summary(before["anchor"], data.sha256), anchor.summary(drift["by_source"], data.sha256))
                if b["loss"] is not None and a["loss"] is not None:
                    anchor_rise = {"before": b["loss"], "after": a["loss"], "rise": rise(b["loss"], a["loss"]),
                                   "kl_before": b["kl"], "kl_after": a["kl"],
                                   "over": rise(b["loss"], a["loss"]) > tol}
            over = [f for f in files if f["over"]] + ([dict(anchor_rise, file_name="the anchor")]
                                                      if anchor_rise and anchor_rise["over"] else [])
            verdict = {"file": data.sha256, "file_name": data.name, "step": global_step,
                       "attempt": attempt, "tolerance": tol, "action": self.config.forgetting_action,
                       "tripped": bool(over), "files": files, "anchor": anchor_rise,
                       "seconds": round(seconds + before["seconds"], 3), "reason": reason(over, tol)}
        return collective.from_main(self.acc, verdict)


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
