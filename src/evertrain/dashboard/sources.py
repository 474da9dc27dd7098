"""What the dashboard shows, read from the files of a run (their places: runs.py).

Every function takes a `View` (a run and what was read of it so far) and returns plain JSON-able dicts. Nothing
here writes or renames; the ledger is read through daemon/ledger.py read-only, so the dashboard never holds a
lock the daemon waits on.

    python -m evertrain.dashboard.sources DIR      # print what /api/state would answer, as JSON

DIR is a daemon workspace (DIR/evertrain.toml; checkpoints in DIR/current_model/) or the output folder of
`evertrain train` (checkpoints directly in it).
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading
import time
from pathlib import Path

from evertrain.daemon.ledger import read_files, read_pins
from evertrain.files import read_json
from evertrain.observe.evals import forgetting_matrix
from evertrain.observe.metrics import add_committed
from evertrain.observe.snapshots import snapshot_budget
from evertrain.runs import Run, Workspace, open_run
from evertrain.serve.feedback import summary as feedback_summary
from evertrain.train import checkpoint

SNAPSHOT_NAME = re.compile(r"^step-(\d{8,})\.json$")
MAX_POINTS = 2000                       # metric points sent at once; longer histories are thinned
SHOWN_CHECKPOINTS = 10
TRAIN_QUIET_SECONDS = 120               # a `train` run with no metrics line for this long is not training
METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_second", "file_step", "file_total_steps", "time")


class View:
    """One run as the dashboard reads it: where its files are (runs.Run) and what it has read of them so far."""

    def __init__(self, run: Run):
        self.run = run
        self.root = run.work_dir                # the folder the dashboard was given
        self.daemon = run.is_workspace           # a daemon workspace (else a `train` output dir)
        self.model_dir = run.run_dir
        self.metrics = JsonlTail(run.metrics, key="step", keep=METRIC_FIELDS + ("file", "file_name"))
        self.evals = JsonlTail(run.evals)
        self.drift = JsonlTail(run.drift, keep=("step", "after_file_name", "loss", "kl"))
        self.snapshots = SnapshotCache(run.evolution)


def open_view(root: Path) -> View:
    """FileNotFoundError when `root` is no folder."""
    return View(open_run(root))


# ------------------------------------------------------------------------------------------------- jsonl

class JsonlTail:
    """An append-only JSONL log read incrementally: each call parses only the bytes added since the last.

    With `key` (metrics: the global step), a record whose key is not above the previous one means the run
    resumed from an older checkpoint and trained those steps again: the newer lines replace the older ones,
    as only they are the run's committed history."""

    def __init__(self, path: Path, key: str | None = None, keep: tuple[str, ...] | None = None):
        self.file, self.key, self.keep = path, key, keep
        self.path: Path | None = None
        self.offset = 0
        self.records: list[dict] = []
        self.rewrites = 0  # times earlier records were replaced: a reader holding old ones starts over
        self.lock = threading.Lock()

    def read(self) -> list[dict]:
        with self.lock:
            path = self.file
            try:
                size = path.stat().st_size
            except OSError:
                return self.records
            if path != self.path or size < self.offset:  # another file, or rewritten: start over
                self.path, self.offset, self.records = path, 0, []
                self.rewrites += 1
            if size > self.offset:
                with open(path, "rb") as f:
                    f.seek(self.offset)
                    chunk = f.read(size - self.offset)
                end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
                self.offset += end
                for line in chunk[:end].splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line torn by a crash
                    if not isinstance(rec, dict):
                        continue
                    if self.keep is not None:  # a run that never ends: hold only what is shown
                        rec = {k: rec.get(k) for k in self.keep}
                    if self.key is None:
                        self.records.append(rec)
                    elif isinstance(rec.get(self.key), int) and add_committed(self.records, rec, self.key):
                        self.rewrites += 1
            return self.records


# ------------------------------------------------------------------------------------------------- metrics

def metrics(run: View, since: int = 0, max_points: int = MAX_POINTS) -> dict:
    """Steps after `since` as columns (thinned to at most `max_points`, the last step always kept), and the
    span of global steps of every file (the chart's file boundaries), from the whole history."""
    records = run.metrics.read()
    new = records[bisect.bisect_right(records, since, key=lambda r: r["step"]):]
    stride = max(1, -(-len(new) // max_points))
    if stride > 1:
        new = new[::stride] + ([new[-1]] if (len(new) - 1) % stride else [])
    spans: list[dict] = []
    for r in records:
        if spans and spans[-1]["file"] == r.get("file") and spans[-1]["last_step"] == r["step"] - 1:
            spans[-1]["last_step"] = r["step"]
        else:
            spans.append({"file": r.get("file"), "file_name": r.get("file_name"), "first_step": r["step"],
                          "last_step": r["step"]})
    return {"since": since, "last_step": records[-1]["step"] if records else 0, "stride": stride,
            "history": run.metrics.rewrites,
            "columns": {k: [r.get(k) for r in new] for k in METRIC_FIELDS},
            "files": spans}


# ------------------------------------------------------------------------------------------------- evals

def forgetting(run: View, listed: list[dict] | None = None) -> dict:
    """The forgetting matrix (see evals.forgetting_matrix), from the run's evaluations; `no_slice`: the trained
    files that hold out nothing (too small for a slice), which have no column of their own."""
    fm = forgetting_matrix(run.evals.read())
    small = [{"file": f["sha256"], "file_name": f["original_name"], "examples": f.get("examples")}
             for f in (files(run) if listed is None else listed) if f.get("state") == "done" and not _held_out(f)]
    # Such a file is a row (after it trained) but has no losses of its own: its column says so instead.
    keep = [j for j, f in enumerate(fm["files"]) if f["file"] not in {s["file"] for s in small}]
    kept = lambda values: [values[j] for j in keep]  # noqa: E731
    return {"files": kept(fm["files"]), "before": kept(fm["before"]), "before_judged": kept(fm["before_judged"]),
            "rows": [dict(r, cells=kept(r["cells"]), judged=kept(r["judged"])) for r in fm["rows"]],
            "no_slice": small}


def _held_out(f: dict) -> list:
    held = f.get("held_out")
    if isinstance(held, str):  # the ledger keeps it as JSON text
        try:
            held = json.loads(held)
        except ValueError:
            return []
    return held or []


# ------------------------------------------------------------------------------------------------- snapshots

SUMMARY_TEXT = 240  # characters of a prediction/generation kept in the per-step summary


class SnapshotCache:
    """snapshots/evolution/step-NNNNNNNN.json files, each parsed once (they are written once, atomically)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.summaries: dict[tuple, dict] = {}  # (path, mtime_ns, size) -> summary
        self.lock = threading.Lock()

    def paths(self) -> dict[int, Path]:
        folder = self.folder
        out = {}
        if folder.is_dir():
            for p in folder.iterdir():
                m = SNAPSHOT_NAME.match(p.name)
                if m:
                    out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    def summary(self, path: Path) -> dict | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (path, st.st_mtime_ns, st.st_size)
        with self.lock:
            if key in self.summaries:
                return self.summaries[key]
        snap = read_json(path)
        if snap is None:
            return None
        summary = {"step": snap.get("step"), "file": snap.get("file"), "file_name": snap.get("file_name"),
                   "time": snap.get("time"),
                   "examples": {e["id"]: {"loss": e.get("loss"), "token_accuracy": e.get("token_accuracy"),
                                          "margin": e.get("margin"), "reward": e.get("reward"),
                                          "prediction": _clip(e.get("prediction")),
                                          "generation": _clip(e.get("generation")),
                                          "source": e.get("source"), "file": e.get("file"), "line": e.get("line"),
                                          "label": e.get("label"),
                                          "text": _clip(e.get("input") or e.get("expected"))}
                                for e in snap.get("examples", []) if isinstance(e, dict) and "id" in e}}
        with self.lock:
            self.summaries = {k: v for k, v in self.summaries.items() if k[0] != path}
            self.summaries[key] = summary
        return summary


def snapshots_index(run: View) -> dict:
    """Every snapshot step, and every tracked example with its loss/accuracy/outputs at each step."""
    steps, examples = [], {}
    names = {r["file"]: r["file_name"] for r in run.metrics.read()}
    for step, path in run.snapshots.paths().items():
        s = run.snapshots.summary(path)
        if s is None:
            continue
        steps.append({"step": step, "file_name": s["file_name"], "time": s["time"]})
        for ex_id, e in s["examples"].items():
            ex = examples.setdefault(ex_id, {"id": ex_id, "label": example_label(ex_id, e, names), "steps": []})
            ex["steps"].append(_at_snapshot(step, e))
    return {"steps": steps, "examples": list(examples.values())}


def example_evolution(run: View, ex_id: str) -> dict | None:
    """One tracked example across every snapshot, grouped by the file in training at each: its own file's
    snapshots (what that file taught it, step by step), then each later file's (what they kept or undid)."""
    example, groups = None, []
    names = {r["file"]: r["file_name"] for r in run.metrics.read()}
    for step, path in run.snapshots.paths().items():
        s = run.snapshots.summary(path)
        e = s and s["examples"].get(ex_id)
        if e is None:
            continue
        if example is None:
            example = {"id": ex_id, "label": example_label(ex_id, e, names), "file": e["file"],
                       "file_name": names.get(e["file"]) if e["file"] else "probes.jsonl"}
        if not groups or groups[-1]["file"] != s["file"]:
            groups.append({"file": s["file"], "file_name": s["file_name"], "own": s["file"] == e["file"],
                           "snapshots": []})
        groups[-1]["snapshots"].append(_at_snapshot(step, e))
    return None if example is None else {**example, "files": groups}


def _at_snapshot(step: int, e: dict) -> dict:
    """A tracked example as one snapshot saw it (a pair or a rated answer also with its margin or reward)."""
    return {"step": step, **{k: e.get(k) for k in ("loss", "token_accuracy", "prediction", "generation", "margin",
                                                   "reward")}}


def snapshot_counts(run: View) -> dict[str, dict]:
    """Per file (sha256): snapshots taken while it trained, and the ones the budget skipped."""
    counts: dict[str, dict] = {}
    for path in run.snapshots.paths().values():
        s = run.snapshots.summary(path)
        if s is not None and s["file"]:
            counts.setdefault(s["file"], {"taken": 0, "skipped": 0})["taken"] += 1
    ckpt = newest(run)
    skipped = snapshot_budget(ckpt.state)["skipped_by_file"] if ckpt else {}
    for sha, n in skipped.items():
        counts.setdefault(sha, {"taken": 0, "skipped": 0})["skipped"] = n
    return counts


def snapshot(run: View, step: int) -> dict | None:
    path = run.snapshots.paths().get(step)
    return read_json(path) if path is not None else None


def example_label(ex_id: str, e: dict, names: dict[str, str]) -> str:
    """What the example picker shows: where the example comes from, and what tells it apart (its last user turn,
    its prompt, or how its text begins; snapshots from before labels show how the rendered text begins)."""
    where = "probes.jsonl" if e["source"] == "probe" else names.get(e["file"]) or (e["file"] or "?")[:12]
    if e["line"] is not None:
        where += f" line {e['line'] + 1}"
    text = (e.get("label") or e["text"] or "").strip().replace("\n", " ")
    return f"{where}: {text[:70]}"


def _clip(text):
    if isinstance(text, str) and len(text) > SUMMARY_TEXT:
        return text[:SUMMARY_TEXT] + "…"
    return text


# ------------------------------------------------------------------------------------------------- files

def files(run: View) -> list[dict]:
    """Every file of the run with its state, in arrival order: the ledger's files table for a daemon
    workspace; for a `train` output dir, the files recorded in the newest checkpoint (finished ones, then
    part-way ones)."""
    ledger = Workspace(run.root).ledger_path
    if run.daemon and ledger.is_file():
        return read_files(ledger)
    ckpt = newest(run)
    if ckpt is None:
        return []
    progress = ckpt.state.get("evertrain", {})
    out = [{"original_name": f["name"], "sha256": f["sha256"], "state": f.get("status", "done"),
            "examples": f.get("examples"), "tokens": f.get("tokens"), "expected_steps": f.get("expected_steps"),
            "steps_trained": f.get("steps"), "first_step": f.get("first_step"), "last_step": f.get("last_step"),
            "held_out": f.get("held_out", []), "forgetting": f.get("forgetting")}
           for f in progress.get("files", [])]
    for c in progress.get("cursors", {}).values():
        out.append({"original_name": c["name"], "sha256": c["sha256"], "state": "interrupted",
                    "expected_steps": c.get("total_steps"), "steps_trained": c.get("file_step"),
                    "first_step": c.get("first_step"), "last_step": None})
    return out


def feedback(run: View) -> dict:
    """What `evertrain serve --collect-feedback` kept and received (serve/feedback.py, read-only), each of its
    files with its fate in the ledger (by the name it was dropped as); {"kept": false} when there is no log."""
    found = feedback_summary(run.root) if run.daemon else None
    if found is None:
        return {"kept": False}
    ledger = Workspace(run.root).ledger_path
    taken: dict[str, list[dict]] = {}
    for row in read_files(ledger) if ledger.is_file() else []:
        taken.setdefault(row["original_name"], []).append(row)
    for f in found["files"]:
        rows = taken.get(f["name"], [])
        # A file dropped again after a crash is a duplicate of the first copy: the first copy's state is its fate.
        first = next((r for r in rows if r["state"] != "duplicate"), rows[0] if rows else None)
        f["state"] = first["state"] if first else "in inbox" if f["dropped_at"] else "not dropped yet"
        f["ledger"] = [{"id": r["id"], "state": r["state"]} for r in rows]
    return {"kept": True, **found}


# ------------------------------------------------------------------------------------------------- checkpoints, status

def newest(run: View) -> checkpoint.Checkpoint | None:
    """The newest checkpoint whose state parses (not verified: hashing weights every poll would be slow)."""
    found = checkpoint.candidates(run.model_dir)
    return found[0] if found else None


def checkpoints(run: View) -> list[dict]:
    ledger = Workspace(run.root).ledger_path
    pins = read_pins(ledger) if run.daemon and ledger.is_file() else set()
    out = []
    for c in checkpoint.candidates(run.model_dir)[:SHOWN_CHECKPOINTS]:
        try:
            created = (c.path / checkpoint.STATE_FILE).stat().st_mtime
        except OSError:
            continue  # pruned while we looked
        out.append({"name": c.name, "step": c.step, "created_at": created,
                    "bytes": sum(m.get("size", 0) for m in c.state.get("manifest", {}).values()),
                    "files": len(c.state.get("files", [])), "pinned": c.name in pins})
    return out


def status(run: View) -> dict:
    """The daemon's status file; for a `train` output dir (no daemon), what the last metrics line says."""
    if run.daemon:
        st = read_json(Workspace(run.root).status_file)
        if st is not None:
            return dict(st, source="daemon")
        return {"state": "never ran", "source": "daemon"}
    last = run.metrics.records[-1] if run.metrics.read() else None
    ckpt = newest(run)
    st = {"state": "idle" if last or ckpt else "no run yet", "source": "train",
          "global_step": ckpt.step if ckpt else 0, "last_checkpoint": ckpt.name if ckpt else None, "updated_at": None}
    if last is None:
        return st
    st.update(global_step=max(st["global_step"], last["step"]), loss=last.get("loss"),
              learning_rate=last.get("lr"), updated_at=last.get("time"))
    part_way = last.get("file_step") != last.get("file_total_steps") or bool(
        ckpt and ckpt.state.get("evertrain", {}).get("cursors"))
    if part_way:
        # No daemon reports on a `train` process: steps logged lately mean it is still at work.
        recent = isinstance(last.get("time"), (int, float)) and time.time() - last["time"] < TRAIN_QUIET_SECONDS
        st.update(state="training" if recent else "interrupted", current_file=last.get("file_name"),
                  file_step=last.get("file_step"), file_total_steps=last.get("file_total_steps"),
                  tokens_per_second=last.get("tokens_per_second"))
    return st


def state(run: View) -> dict:
    """Everything /api/state answers: one poll gives the whole top of the page."""
    counts = snapshot_counts(run)
    listed = [dict(f, snapshots=counts.get(f.get("sha256") or "")) for f in files(run)]
    return {"root": str(run.root), "kind": "workspace" if run.daemon else "train output dir",
            "status": status(run), "files": listed, "checkpoints": checkpoints(run),
            "forgetting": forgetting(run, listed), "drift": run.drift.read(), "snapshots": snapshot_marker(run)}


def snapshot_marker(run: View) -> dict:
    """Enough for the page to know whether to fetch the snapshot index again."""
    paths = run.snapshots.paths()
    last = max(paths) if paths else None
    try:
        mtime = paths[last].stat().st_mtime_ns if last is not None else None
    except OSError:
        mtime = None
    return {"count": len(paths), "last_step": last, "last_mtime": mtime}


if __name__ == "__main__":
    import sys

    print(json.dumps(state(open_view(Path(sys.argv[1] if len(sys.argv) > 1 else os.getcwd()))), indent=2))
