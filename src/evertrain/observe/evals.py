"""Held-out evaluation and forgetting: is the model still good at what earlier files taught it?

Each file's held-out slice (`held_out_fraction`, never trained) is kept tokenized in RUN/held_out/<sha256>.json.
Before a file trains, its own slice is evaluated ("before"); at the end of every file (and every `eval_steps`)
the slice of every file seen so far is evaluated. Each result is one line of WORK/logs/evals.jsonl.
Row i of the forgetting matrix is the evaluation after file i; column j is file j's held-out loss.

    evertrain report DIR        # print the forgetting matrix and each file's loss before/after its training
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from evertrain.data import Example, FileData, example_from, example_record
from evertrain.files import append_json_line, read_records, write_json_atomic
from evertrain.runs import Run, open_run

EVAL_ROWS = 16  # held-out examples per forward pass


def held_out_path(run: Run, sha256: str) -> Path:
    return run.held_out / f"{sha256}.json"


def load_held_out(run: Run, sha256: str) -> tuple[str, list[Example]] | None:
    path = held_out_path(run, sha256)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return d["name"], [example_from(e) for e in d["examples"]]


def seen_files(progress) -> list[str]:
    """Every file of the run so far, finished or part-way, in training order (not those the forgetting gate
    rejected: their steps were undone)."""
    done = [f.sha256 for f in progress.files if f.status != "rejected"]
    return done + [s for s in progress.cursors if s not in done]


class Evals:
    """The held-out slices of one run, measured with the model a session trains."""

    def __init__(self, run: Run, accelerator, tokenizer, judge=None):
        self.run, self.acc, self.tokenizer, self.judge = run, accelerator, tokenizer, judge

    def store_held_out(self, data: FileData) -> None:
        """Keep a file's held-out slice with the run, so later files (and later processes) can evaluate it."""
        path = held_out_path(self.run, data.sha256)
        if not data.held_out or path.exists() or not self.acc.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"name": data.name, "examples": [example_record(e) for e in data.held_out]},
                          indent=None)

    def measure(self, model, shas: list[str], step: int, *, after_file: FileData | None = None,
                before_file: FileData | None = None) -> list[dict]:
        """The held-out loss of each of `shas` that has a slice, as the model stands at global step `step`."""
        results = []
        for sha in shas:
            found = load_held_out(self.run, sha)
            if found is None:
                continue
            name, examples = found
            if examples[0].objective != "supervised" and self.judge is not None:
                judged = self.judge(model, examples)  # a preference or feedback slice: its loss, accuracy, margin
                loss, tokens = judged.pop("loss"), judged.pop("tokens")
            else:
                (loss, tokens), judged = self.mean_loss(model, examples), {}
            results.append({"step": step, "after_file": after_file.sha256 if after_file else None,
                            "after_file_name": after_file.name if after_file else None,
                            "before_file": before_file.sha256 if before_file else None,
                            "file": sha, "file_name": name, "loss": loss, "tokens": tokens,
                            "examples": len(examples), "time": time.time(), **judged})
        return results

    def record(self, results: list[dict]) -> None:
        """Append results to logs/evals.jsonl (the main process)."""
        if self.acc.is_main_process:
            for r in results:
                append_json_line(self.run.evals, r)

    def mean_loss(self, model, examples: list[Example]) -> tuple[float, int]:
        """Mean token loss over examples (each its own row), and the number of target tokens."""
        import torch  # here, not at the top: the dashboard reads evaluations without loading torch

        from evertrain.data.packing import collate

        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), EVAL_ROWS):
            chunk = examples[i:i + EVAL_ROWS]
            n = sum(e.target_tokens for e in chunk)
            if n == 0:
                continue
            batch = collate([[e] for e in chunk], self.tokenizer.pad_token_id, self.acc.device)
            with torch.no_grad():
                total += model(**batch, use_cache=False, num_items_in_batch=n).loss.item() * n
            count += n
        model.train(was_training)
        return (total / count if count else float("nan")), count


# ------------------------------------------------------------------------------------------------- report

def read_evals(run: Run) -> list[dict]:
    return read_records(run.evals)


def forgetting_matrix(evals: list[dict]) -> dict:
    """The forgetting matrix of a run's evaluations.

    A row per evaluation event (after file i finished, or a periodic one), ordered by step; a column per evaluated
    file in training order; cell = mean held-out loss. `before` holds each file's loss right before its training.
    A file of judgments (pairs, rated answers) also has, in `judged` beside each of its cells (and
    `before_judged`), the held-out accuracy and margin; elsewhere those are None.
    """
    columns: dict[str, dict] = {}  # sha256 -> {"file", "file_name", "judged"}, in first-seen order
    rows: dict[tuple, dict] = {}
    before: dict[str, float] = {}
    before_judged: dict[str, dict] = {}
    column = lambda sha, name: columns.setdefault(sha, {"file": sha, "file_name": name, "judged": False})  # noqa: E731
    for e in evals:
        sha = e.get("file")
        if not isinstance(sha, str) or not isinstance(e.get("loss"), (int, float)):
            continue
        judged = {k: e.get(k) for k in ("accuracy", "margin")} if "accuracy" in e else None
        if e.get("before_file") is not None:
            before[sha], before_judged[sha] = e["loss"], judged
        else:
            after = e.get("after_file")
            if after is not None:
                column(after, e.get("after_file_name"))
            row = rows.setdefault((e.get("step"), after), {
                "step": e.get("step"), "after_file": after, "after_file_name": e.get("after_file_name"),
                "cells": {}, "judged": {}})
            row["cells"][sha], row["judged"][sha] = e["loss"], judged
        column(sha, e.get("file_name"))["judged"] |= judged is not None
    order = list(columns)
    return {"files": list(columns.values()),
            "before": [before.get(sha) for sha in order],
            "before_judged": [before_judged.get(sha) for sha in order],
            "rows": [dict(r, cells=[r["cells"].get(sha) for sha in order],
                          judged=[r["judged"].get(sha) for sha in order])
                     for r in sorted(rows.values(), key=lambda r: (r["step"] is None, r["step"] or 0))]}


def report(root: Path) -> str:
    m = forgetting_matrix(read_evals(open_run(root)))
    if not m["rows"]:
        return ("no evaluations yet: set held_out_fraction > 0 (e.g. 0.02) so each file keeps a held-out slice, "
                "then train files")
    names = [f["file_name"] for f in m["files"]]
    label = lambda r: r["after_file_name"] or f"step {r['step']}"  # noqa: E731
    width = max(12, *(len(n) for n in names), *(len(label(r)) for r in m["rows"]))
    fmt = lambda x: "      -" if x is None else f"{x:7.3f}"  # noqa: E731
    lines = ["Forgetting matrix: held-out loss of each file (columns) after training each file (rows).",
             " " * width + "  " + "  ".join(f"{j + 1:>7}" for j in range(len(names)))]
    for r in m["rows"]:
        lines.append(f"{label(r):>{width}}  " + "  ".join(fmt(x) for x in r["cells"]))
    lines += ["", "Per file: held-out loss before its training, right after it, and now (the last evaluation);",
              "for pairs and rated answers also the accuracy (the preferred answer's reward above the other's; a "
              "rating's side) and the margin."]
    pct = lambda x: "   -" if x is None else f"{x['accuracy']:4.0%}"  # noqa: E731
    for j, (f, name) in enumerate(zip(m["files"], names)):
        own = next((r for r in m["rows"] if r["after_file"] == f["file"]), None)
        line = (f"{j + 1:>3}. {name:<{width}}  before {fmt(m['before'][j])}  "
                f"after {fmt(own['cells'][j] if own else None)}  now {fmt(m['rows'][-1]['cells'][j])}")
        if f["judged"]:
            now = m["rows"][-1]["judged"][j]
            line += (f"   accuracy {pct(m['before_judged'][j])} -> {pct(own['judged'][j] if own else None)} -> "
                     f"{pct(now)}   margin now {fmt(now['margin'] if now else None).strip()}")
        lines.append(line)
    return "\n".join(lines)
