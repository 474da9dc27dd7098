"""Replay: mix examples from earlier files (and the anchor set) into the current file's steps, against forgetting.

The dose means the same at any global batch: `replay_fraction` f gives f x global batch replayed rows per
optimizer step, spread exactly (step s gets floor(f G s) - floor(f G (s-1)) rows), and never fewer than one row
every `replay_min_every` steps, so a small global batch still replays. The rows are drawn from a bounded reservoir
on disk, RUN/replay/<sha256>.json: each finished file keeps a fixed random sample of itself, and each
file's share shrinks (a prefix of its sample) as files accumulate, so the pool never exceeds `replay_buffer`
examples. With `anchor_replay` the anchor set (anchor.py: the base model's own answers) joins the pool.
`replay_strategy` weighted draws more from the files whose held-out loss rose most at the last forgetting gate
(gate.py); uniform draws every kept example alike. A retry of a file after the gate tripped replays
`retry_replay_boost` times the dose (at least RETRY_FRACTION), anchor included. The reservoir's cache is the
Replay object's own (one per session).

Draws depend only on (seed, global step, the progress), so a resumed run replays exactly what an uninterrupted
one would. Replayed examples are recorded in the trace ("replay": [[sha256 or "anchor", line], ...]) and never
count as the current file's coverage.

Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large Language Models"
(arXiv:2403.08763) found 5% replay enough under a moderate shift at large batches; bench/forgetting.py measures
what evertrain's defaults do at small ones (BENCHMARKS.md).

    evertrain train --dataset FILE --output-dir DIR --replay-fraction 0.1 --replay-strategy weighted
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from evertrain.data import Example, FileData, example_from, example_record
from evertrain.files import write_json_atomic
from evertrain.observe import gate
from evertrain.runs import Run

ANCHOR = "anchor"       # the source of an anchor example, where a replayed example names its file
RETRY_FRACTION = 0.05   # a retry's dose is retry_replay_boost x max(replay_fraction, this)


def keeps_samples(config) -> bool:
    """Do finished files keep a sample for replay (replay is on, or a retry of the gate may need one)?"""
    return bool(config.replay_fraction) or config.forgetting_action == "retry"


def sample_path(run: Run, sha256: str) -> Path:
    return run.replay / f"{sha256}.json"


def quota(buffer: int, n_files: int) -> int:
    return max(1, buffer // max(n_files, 1))


def dose(config, boost: float = 1.0) -> float:
    """Replayed rows per step as a fraction of the global batch."""
    return config.replay_fraction if boost == 1.0 else max(config.replay_fraction, RETRY_FRACTION) * boost


def rows_at(step: int, per_step: float, min_every: int) -> int:
    """Replayed rows at global step `step` (1-based): `per_step` on average, exactly, with the floor."""
    n = math.floor(per_step * step) - math.floor(per_step * (step - 1))
    return 1 if not n and min_every and step % min_every == 0 else n


class Replay:
    """The replay reservoir of a run, as one session's progress knows it."""

    def __init__(self, config, run: Run, is_main: bool):
        self.config, self.run, self.is_main = config, run, is_main
        self._pool: list[tuple[str, Example]] | None = None

    def add_file(self, data: FileData) -> None:
        """Keep a fixed sample of a file that is finishing (before its checkpoint: unused until that commits)."""
        cfg = self.config
        if not keeps_samples(cfg) or not self.is_main:
            return
        rng = np.random.default_rng([int(data.sha256[48:64], 16), cfg.seed, 5])
        picks = rng.permutation(len(data.examples))[:cfg.replay_buffer].tolist()
        path = sample_path(self.run, data.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, [example_record(data.examples[i]) for i in picks], indent=None)
        self._pool = None  # rebuilt at the next draw

    def trim(self, progress) -> None:
        """After a checkpoint: cut every file's sample to its current share, bounding the reservoir on disk.

        Draws only ever read a prefix of each sample, so trimming (or a crash before it) never changes them.
        """
        if not keeps_samples(self.config) or not self.is_main:
            return
        done = [f.sha256 for f in progress.files if f.status == "done"]
        share = quota(self.config.replay_buffer, len(done))
        for sha in done:
            p = sample_path(self.run, sha)
            if p.exists():
                sample = json.loads(p.read_text())
                if len(sample) > share:
                    write_json_atomic(p, sample[:share], indent=None)

    def pool(self, progress) -> list[tuple[str, Example]]:
        """The reservoir as the progress knows it: only files the checkpoint records as finished count."""
        if self._pool is None:
            done = [f.sha256 for f in progress.files if f.status == "done"]
            share, items = quota(self.config.replay_buffer, len(done)), []
            for sha in done:
                p = sample_path(self.run, sha)
                if p.exists():
                    items += [(sha, example_from(e)) for e in json.loads(p.read_text())[:share]]
            self._pool = items
        return self._pool

    def draw(self, progress, current_sha: str, global_batch: int, anchor: list[Example]) -> list[tuple[str, Example]]:
        """The replayed examples of the next optimizer step: a pure function of seed, step and progress (and the
        anchor set's examples)."""
        cfg = self.config
        cursor = progress.cursors.get(current_sha)
        boost = cursor.replay_boost if cursor else 1.0
        with_anchor = cfg.anchor_replay or boost > 1.0
        if not (cfg.replay_fraction or with_anchor):
            return []
        items = [it for it in self.pool(progress) if it[0] != current_sha] if keeps_samples(cfg) else []
        if with_anchor:
            items += [(ANCHOR, e) for e in anchor]
        step = progress.global_step + 1
        k = min(rows_at(step, dose(cfg, boost) * global_batch, cfg.replay_min_every), len(items))
        if not k:
            return []
        rng = np.random.default_rng([cfg.seed, step, 3])
        return [items[i] for i in rng.choice(len(items), size=k, replace=False,
                                             p=weights(cfg, progress, items, cursor))]


def place(rows: list[list[Example]], replayed: list[Example], capacity: int) -> list[list[Example]]:
    """The step's rows with the replayed examples where they cost only their tokens: each (longest first) into the
    fullest row that still has room for it within `capacity` tokens (the lowest row on a tie), the rest packed
    together into rows of their own the same way, after the file's (the loop runs those as micro-batches of their
    own: beside rows of 512, an anchor answer of 40 tokens would be padded to 512). Packed examples never attend to
    each other (position ids restart), so a row's own examples train as they would alone. A pure function of the
    rows and the draw: a resumed run places them as an uninterrupted one did."""
    rows = [list(row) for row in rows]
    used = [sum(len(e.input_ids) for e in row) for row in rows]
    first_new = len(rows)
    for e in sorted(replayed, key=lambda e: -len(e.input_ids)):  # sorted() is stable: ties keep the draw's order
        n = len(e.input_ids)
        fits = [r for r in range(len(rows)) if used[r] + n <= capacity]
        # the file's rows first (the padding they have anyway), then rows of replay only
        r = min(fits, key=lambda r: (r >= first_new, capacity - used[r] - n, r)) if fits else None
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(e)
        used[r] += n
    return rows


def weights(config, progress, items: list[tuple[str, Example]], cursor) -> np.ndarray | None:
    """Weighted replay: each source's share grows with the rise of its loss at the last gate (None: uniform)."""
    rises = gate.last_rises(progress, cursor) if config.replay_strategy == "weighted" else {}
    up = {sha: max(r, 0.0) for sha, r in rises.items()}
    if not any(up.values()):
        return None
    # Every source keeps a tenth of the largest rise, so a file the last gate found safe still gets some replay.
    base = 0.1 * max(up.values())
    counts: dict[str, int] = {}
    for sha, _e in items:
        counts[sha] = counts.get(sha, 0) + 1
    w = np.array([(up.get(sha, 0.0) + base) / counts[sha] for sha, _e in items])
    return w / w.sum()
