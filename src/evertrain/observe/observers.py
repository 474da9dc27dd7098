"""The observers of one training session, called by the loop at three moments (see observe/__init__.py).

    evertrain train --dataset FILE --output-dir DIR --trace
"""

from __future__ import annotations

import dataclasses
import time

from evertrain import disk, logs
from evertrain.data import Example, FileData
from evertrain.observe.anchor import Anchor
from evertrain.observe.evals import Evals, seen_files
from evertrain.observe.gate import Gate
from evertrain.observe.metrics import Metrics
from evertrain.observe.snapshots import Budget, Snapshots, with_generations
from evertrain.observe.trace import Trace
from evertrain.runs import Run


class Observers:
    """The observers of one training session (setup makes them; a rollback's new session makes new ones)."""

    def __init__(self, config, run: Run, accelerator, tokenizer, *, sharded: bool, saved: dict | None = None,
                 legacy: dict | None = None, judge=None):
        """`saved`: what `state_dict` gave at the checkpoint resumed from (None: a new run, or a checkpoint written
        before the observers kept their own state, whose progress dict `legacy` then holds it). `judge(model,
        examples)`: a held-out slice of preference pairs or rated answers measured (train/objectives.py)."""
        self.config, self.acc = config, accelerator
        self.degraded = disk.Degraded(self.say)  # optional writes, skipped while the disk is full
        self.metrics = Metrics(accelerator, run, config.log_steps, self.degraded)
        self.trace = Trace(run.trace) if config.trace else None
        self.evals = Evals(run, accelerator, tokenizer, judge)
        self.anchor = Anchor(run, accelerator, tokenizer, config, sharded=sharded)
        self.snapshots = Snapshots(run, accelerator, tokenizer, config, sharded=sharded,
                                   budget=Budget.from_state((saved or {}).get("snapshots"), legacy or {}))
        self.gate = Gate(config, accelerator, lambda model, shas: self.evals.measure(model, shas, None),
                         self.anchor.measure)

    def state_dict(self) -> dict:
        return {"snapshots": dataclasses.asdict(self.snapshots.budget)}

    def say(self, text: str) -> None:
        if self.acc.is_main_process:
            logs.say(text)

    # ------------------------------------------------------------------------------------------ the three moments

    def file_started(self, model, progress, data: FileData, total: int) -> dict | None:
        """A file's first step is next (its first time: not a resume). Its held-out slice is kept and measured,
        its tracked examples picked, the anchor set made at the run's first step; returns the gate's baseline."""
        step = progress.global_step
        self.evals.store_held_out(data)
        self.acc.wait_for_everyone()  # every process evaluates the slice the main one just stored
        self._evals(self.evals.measure(model, [data.sha256], step, before_file=data))
        self.degraded.attempt("snapshots/tracked.json", lambda: self.snapshots.track_file(data))
        earlier = [s for s in seen_files(progress) if s != data.sha256]
        if self.anchor.build(model, data, step, self.snapshots.load_tracked):
            drift = self._drift(model, step, None)  # where the drift plot starts
            if not earlier:  # the gate's baseline is this measurement: the model has not changed since
                self.gate.remember(step, {}, drift and drift["by_source"])
        baseline = self.gate.baseline(model, earlier, step)
        self.event(f"start {data.name} ({data.sha256[:12]}) at global step {step}: {total} steps", step)
        return baseline

    def step_ended(self, model, progress, data: FileData, record, seen: list[dict]) -> None:
        """After an optimizer step (`record`, a train StepRecord; `seen`: this process's micro-batch evidence)."""
        if self.trace is not None:
            self.trace.step(self.acc, record.step, data.sha256, seen)
        self.metrics.step(record.as_dict())
        total = record.file_total_steps
        if self.snapshots.wanted(data.sha256, record.file_step, total, record.step, progress.train_seconds):
            self.degraded.attempt("an evolution snapshot", lambda: self.snapshots.take(
                model, data, record.step, generations=with_generations(record.file_step, total)))
        eval_steps = self.config.eval_steps
        if eval_steps and record.step % eval_steps == 0 and record.file_step < total:
            self._evals(self.evals.measure(model, seen_files(progress), record.step))
            self._drift(model, record.step, None)

    def file_ended(self, model, progress, data: FileData, cursor) -> dict | None:
        """A file's last step is done: every slice seen so far and the anchor measured, and the gate's verdict on
        the file (None when the gate is off) from its baseline in `cursor`."""
        t0, step = time.perf_counter(), progress.global_step
        results = self.evals.measure(model, seen_files(progress), step, after_file=data)
        self._evals(results)
        drift = self._drift(model, step, data)
        verdict = self.gate.judge(data, step, cursor.gate_before, results, drift, time.perf_counter() - t0,
                                  cursor.attempt)
        # The next file's baseline, if this one stays.
        self.gate.remember(step, {r["file"]: r["loss"] for r in results}, drift and drift["by_source"])
        return verdict

    # ------------------------------------------------------------------------------------------ and by name

    def event(self, text: str, step: int) -> None:
        """A file started, finished or was skipped: the console and the trackers' text."""
        self.metrics.event(text, step)

    def held_out(self, data: FileData) -> None:
        """A file's held-out lines, into the trace (when its cursor is made)."""
        if self.trace is not None and self.acc.is_main_process:
            self.trace.held_out(data.sha256, data.held_out_lines)

    def anchor_examples(self) -> list[Example]:
        """The anchor set's examples, for replay to rehearse."""
        return [item.example for item in self.anchor.items()]

    def finish(self) -> None:
        self.metrics.finish()

    def _evals(self, results: list[dict]) -> None:
        self.evals.record(results)
        self.metrics.evals(results)

    def _drift(self, model, step: int, after_file: FileData | None) -> dict | None:
        drift = self.anchor.measure(model)
        if drift is not None:
            self.degraded.attempt(f"logs/{self.anchor.run.drift.name}",
                                  lambda: self.anchor.record(drift, step, after_file))
            self.metrics.drift(drift, step)
        return drift
