"""Evolution snapshots: what the model guesses for a few tracked examples, step after step.

Tracked examples are the user's probes (WORKDIR/probes.jsonl, any data format) plus `snapshot_per_file`
examples picked deterministically from each file as it arrives (kept in WORKDIR/snapshots/tracked.json).
At snapshot steps ONE batched forward pass gives, under teacher forcing, each target token's loss and the model's top-1 guess. At the last step of a
file, a few examples with a prompt (probes first) also get a greedy generation, bounded by
`snapshot_new_tokens` tokens and `snapshot_seconds` of wall clock (never a hang): generating costs many forward
passes, so the log-spaced snapshots in between stay one pass each and more of them fit in the budget.
Every file's last step gets a snapshot whatever the budget, and so does every `snapshot_every`-th step of a
file (a rhythm forced on request). The others (the first step of every file and log-spaced global steps) cost at
most `snapshot_budget` of training time: when over, the schedule skips them and counts the skips per file.
Written to WORKDIR/snapshots/evolution/step-NNNNNNNN.json.

    evertrain train --dataset FILE --output-dir DIR    # then look at DIR/snapshots/evolution/
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from evertrain.checkpoint import write_json_atomic
from evertrain.data import IGNORE, DataError, Example, FileData, load_file
from evertrain.data.containers import ContainerError, open_records
from evertrain.data.formats import RecordError, label, parse_columns, parse_record

LABEL_CHARS = 200


def is_log_spaced(step: int) -> bool:
    """1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, ...: about four snapshots per doubling of the step."""
    return step >= 1 and step in _log_steps(step)


def _log_steps(limit: int) -> set[int]:
    k = int(math.log2(limit) * 4) + 2
    return {round(2 ** (i / 4)) for i in range(k)}


def tracked_path(workdir: Path) -> Path:
    return Path(workdir) / "snapshots" / "tracked.json"


def load_tracked(session) -> list[dict]:
    """Probes first (re-read every time, so a person can edit probes.jsonl), then the examples picked from files."""
    tracked = []
    probes = session.workdir / "probes.jsonl"
    if probes.exists():
        try:
            cfg = dataclasses.replace(session.config, held_out_fraction=0.0, packing=False)
            data = load_file(probes, session.tokenizer, cfg, store_dir=session.output_dir / "tokens")
            names = labels(probes, {e.line for e in data.examples}, cfg)
            for e in data.examples:
                tracked.append({"id": f"probe-{e.id}", "source": "probe", "file": None, "line": e.line,
                                "label": names.get(e.line, ""), "input_ids": e.input_ids, "labels": e.labels})
        except DataError as err:
            session.say(f"evertrain: probes ignored: {err}")
    path = tracked_path(session.workdir)
    if path.exists():
        tracked += json.loads(path.read_text())
    return tracked


def track_file(session, data: FileData) -> None:
    """Pick this file's tracked examples (a fixed choice: content hash and seed) and remember them."""
    cfg = session.config
    if not cfg.snapshot_per_file or not session.is_main:
        return
    path = tracked_path(session.workdir)
    tracked = json.loads(path.read_text()) if path.exists() else []
    if any(t["file"] == data.sha256 for t in tracked):
        return
    rng = np.random.default_rng([int(data.sha256[32:48], 16), cfg.seed, 11])
    picks = sorted(rng.permutation(len(data.examples))[:cfg.snapshot_per_file].tolist())
    names = labels(data.path, {data.examples[i].line for i in picks}, cfg)
    for i in picks:
        e = data.examples[i]
        tracked.append({"id": f"{data.sha256[:12]}-{e.id}", "source": "file", "file": data.sha256,
                        "file_name": data.name, "line": e.line, "label": names.get(e.line, ""),
                        "input_ids": e.input_ids, "labels": e.labels})
    # Bounded: the newest files' picks win; probes are never dropped (they are not in this list).
    tracked = tracked[-cfg.snapshot_max_examples:]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, tracked, indent=None)


def labels(path: Path, lines: set[int], cfg) -> dict[int, str]:
    """Each chosen record's label (formats.label), read again from the file: the tokens alone cannot say which
    turn was the user's. Reading stops at the last chosen record."""
    out: dict[int, str] = {}
    if not lines:
        return out
    try:
        mapping = parse_columns(cfg.columns) if cfg.columns else None
        for number, obj in open_records(path, cfg.max_line_bytes, cfg.max_json_depth, cfg.text_sample_by):
            if number in lines:
                try:
                    out[number] = " ".join(label(parse_record(obj, mapping)).split())[:LABEL_CHARS]
                except RecordError:
                    pass
            if number >= max(lines):
                break
    except (OSError, ContainerError, ValueError):
        pass  # a label is a convenience: the example is tracked with or without one
    return out


def with_generations(file_step: int, total: int) -> bool:
    """Generations (many forward passes each) only when a file is done: what it taught, in the model's words."""
    return file_step == total


def decide(session, file_step: int, total: int) -> bool:
    """Whether to take a snapshot after this step: wanted, and (unless it is a file's last step or a forced one)
    affordable. A wanted one the budget cannot afford is counted in the progress as skipped."""
    cfg, p = session.config, session.progress
    if not session.is_main or session.sharded:  # one process cannot run a sharded model
        return False
    if file_step == total or (cfg.snapshot_every and file_step % cfg.snapshot_every == 0):
        return True  # what a file taught, always; and the rhythm a person asked for
    if not cfg.snapshot_budget:
        return False
    wanted = file_step == 1 or is_log_spaced(p.global_step)
    # Predictive: the spend so far plus what this kind of snapshot cost last time must fit the budget
    # (the first of each kind is a measurement).
    expected = p.snapshot_pass_cost + (p.snapshot_generate_cost if with_generations(file_step, total) else 0.0)
    within_budget = p.snapshot_seconds + expected <= cfg.snapshot_budget * p.train_seconds
    if wanted and not within_budget:
        p.snapshots_skipped += 1
        p.snapshots_skipped_by_file[p.current] = p.snapshots_skipped_by_file.get(p.current, 0) + 1
    return wanted and within_budget


@torch.no_grad()
def take(session, data: FileData, *, generations: bool) -> Path | None:
    """Record the model's guesses for every tracked example at the current global step."""
    from evertrain.data.packing import collate, next_token_logits

    t0 = time.perf_counter()
    tracked = load_tracked(session)
    if not tracked:
        return None
    tok, cfg, model = session.tokenizer, session.config, session.accelerator.unwrap_model(session.model)
    examples = [Example(line=t["line"] or 0, format="", input_ids=t["input_ids"], labels=t["labels"])
                for t in tracked]
    was_training = model.training
    model.eval()
    batch = collate([[e] for e in examples], tok.pad_token_id, session.accelerator.device)
    logits, labels = next_token_logits(model, batch)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    guesses = logits.argmax(-1)
    records = []
    for row, t in enumerate(tracked):
        mask = labels[row] != IGNORE
        exp_ids, pred_ids, tok_loss = labels[row][mask].tolist(), guesses[row][mask].tolist(), losses[row][mask]
        prompt_ids = [i for i, lab in zip(t["input_ids"], t["labels"]) if lab == IGNORE]
        records.append({
            "id": t["id"], "source": t["source"], "file": t["file"], "line": t["line"], "label": t.get("label"),
            "input": tok.decode(prompt_ids), "expected": tok.decode(exp_ids),
            "tokens": [{"expected": tok.decode([a]), "predicted": tok.decode([b]), "correct": a == b, "loss": float(x)}
                       for a, b, x in zip(exp_ids, pred_ids, tok_loss.tolist())],
            "prediction": tok.decode(pred_ids), "generation": None,
            "loss": float(tok_loss.mean()) if exp_ids else None,
            "token_accuracy": sum(a == b for a, b in zip(exp_ids, pred_ids)) / len(exp_ids) if exp_ids else None})
    # Generations for the first few examples that have a real prompt (probes come first in the list).
    prompts = [(r, [i for i, lab in zip(t["input_ids"], t["labels"]) if lab == IGNORE]) for r, t in zip(records, tracked)]
    t_gen = time.perf_counter()
    for rec, prompt_ids in [(r, p) for r, p in prompts if len(p) > 1][:cfg.snapshot_generate if generations else 0]:
        rec["generation"] = generate(session, model, prompt_ids)
    model.train(was_training)
    seconds = time.perf_counter() - t0
    session.progress.snapshot_pass_cost = t_gen - t0
    if generations:
        session.progress.snapshot_generate_cost = time.perf_counter() - t_gen
    step = session.progress.global_step
    out = session.workdir / "snapshots" / "evolution" / f"step-{step:08d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"step": step, "file": data.sha256, "file_name": data.name, "time": time.time(),
                            "seconds": seconds, "examples": records}, indent=None)
    session.progress.snapshot_seconds += seconds
    session.progress.snapshots_taken += 1
    return out


def generate(session, model, prompt_ids: list[int]) -> str:
    """Greedy continuation, bounded in tokens and in wall-clock time."""
    cfg, tok = session.config, session.tokenizer
    ids = torch.tensor([prompt_ids], device=session.accelerator.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=cfg.snapshot_new_tokens, max_time=cfg.snapshot_seconds,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
