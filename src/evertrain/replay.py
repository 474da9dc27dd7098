"""Replay: mix a fraction of examples from earlier files into the current file's batches, against forgetting.

With `replay_fraction` f > 0, every optimizer step of a file gets about f x global batch extra rows drawn from
a bounded reservoir of earlier files' examples. The reservoir lives on disk in OUTPUT_DIR/replay/<sha256>.json:
each finished file keeps a fixed random sample of itself, and each file's share shrinks (a prefix of its sample)
as files accumulate, so the pool never exceeds `replay_buffer` examples. Draws depend only on (seed, global step,
the finished files), so a resumed run replays exactly what an uninterrupted one would. Replayed examples are
recorded in the trace ("replay": [[sha256, line], ...]) and never count as the current file's coverage.

0.05 is a good default for data that shifts between files: Ibrahim et al. 2024, "Simple and Scalable
Strategies to Continually Pre-train Large Language Models" (arXiv:2403.08763) found 5% replay enough to
largely undo forgetting under a moderate distribution shift.

    evertrain train --dataset FILE --output-dir DIR --replay-fraction 0.05
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from evertrain.checkpoint import write_json_atomic
from evertrain.data import Example, FileData


def sample_path(output_dir: Path, sha256: str) -> Path:
    return Path(output_dir) / "replay" / f"{sha256}.json"


def quota(buffer: int, n_files: int) -> int:
    return max(1, buffer // max(n_files, 1))


def add_file(session, data: FileData) -> None:
    """Keep a fixed sample of a file that is finishing (before its checkpoint: unused until that commits)."""
    cfg = session.config
    if not cfg.replay_fraction or not session.is_main:
        return
    rng = np.random.default_rng([int(data.sha256[48:64], 16), cfg.seed, 5])
    picks = rng.permutation(len(data.examples))[:cfg.replay_buffer].tolist()
    path = sample_path(session.output_dir, data.sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, [{"line": data.examples[i].line, "input_ids": data.examples[i].input_ids,
                              "labels": data.examples[i].labels} for i in picks], indent=None)
    session.replay_pool = None  # rebuilt at the next draw


def trim(session) -> None:
    """After a checkpoint: cut every file's sample to its current share, bounding the reservoir on disk.

    Draws only ever read a prefix of each sample, so trimming (or a crash before it) never changes them.
    """
    if not session.config.replay_fraction or not session.is_main:
        return
    done = [f.sha256 for f in session.progress.files if f.status == "done"]
    share = quota(session.config.replay_buffer, len(done))
    for sha in done:
        p = sample_path(session.output_dir, sha)
        if p.exists():
            sample = json.loads(p.read_text())
            if len(sample) > share:
                write_json_atomic(p, sample[:share], indent=None)


def pool(session) -> list[tuple[str, Example]]:
    """The reservoir as the progress knows it: only files the checkpoint records as finished count."""
    if session.replay_pool is None:
        done = [f.sha256 for f in session.progress.files if f.status == "done"]
        share, items = quota(session.config.replay_buffer, len(done)), []
        for sha in done:
            p = sample_path(session.output_dir, sha)
            if p.exists():
                items += [(sha, Example(line=e["line"], format="", input_ids=e["input_ids"], labels=e["labels"]))
                          for e in json.loads(p.read_text())[:share]]
        session.replay_pool = items
    return session.replay_pool


def draw(session, current_sha: str) -> list[tuple[str, Example]]:
    """The replayed examples of the next optimizer step: a pure function of seed, step and finished files."""
    cfg = session.config
    if not cfg.replay_fraction:
        return []
    items = [it for it in pool(session) if it[0] != current_sha]
    if not items:
        return []
    rng = np.random.default_rng([cfg.seed, session.progress.global_step, 3])
    want = cfg.replay_fraction * session.global_batch
    k = math.floor(want) + (rng.random() < want - math.floor(want))
    return [items[i] for i in rng.choice(len(items), size=min(k, len(items)), replace=False)] if k else []
