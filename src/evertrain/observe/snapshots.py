"""Evolution snapshots: what the model guesses for a few tracked examples, step after step.

Tracked examples are the user's probes (WORK/probes.jsonl, any data format) plus `snapshot_per_file`
examples picked deterministically from each file as it arrives (kept in WORK/snapshots/tracked.json).
At snapshot steps ONE batched forward pass gives, under teacher forcing, each target token's loss and the model's top-1 guess. At the last step of a
file, a few examples with a prompt (probes first) also get a greedy generation, bounded by
`snapshot_new_tokens` tokens and `snapshot_seconds` of wall clock (never a hang): generating costs many forward
passes, so the log-spaced snapshots in between stay one pass each and more of them fit in the budget.
Every file's last step gets a snapshot whatever the budget, and so does every `snapshot_every`-th step of a
file (a rhythm forced on request). The others (the first step of every file and log-spaced global steps) cost at
most `snapshot_budget` of training time: when over, the schedule skips them and counts the skips per file.
Written to WORK/snapshots/evolution/step-NNNNNNNN.json. The budget's account (what snapshots cost, how many were
skipped) is this module's own state, saved with every checkpoint (Snapshots.state_dict).

    evertrain train --dataset FILE --output-dir DIR    # then look at DIR/snapshots/evolution/
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evertrain import logs
from evertrain.data import IGNORE, DataError, Example, FileData, example_from, example_record, load_file
from evertrain.data.containers import ContainerError, open_records
from evertrain.config import parse_columns
from evertrain.data.formats import RecordError, label, parse_record
from evertrain.files import read_json, write_json_atomic
from evertrain.runs import Run

LABEL_CHARS = 200


def is_log_spaced(step: int) -> bool:
    """1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, ...: about four snapshots per doubling of the step."""
    return step >= 1 and step in _log_steps(step)


def _log_steps(limit: int) -> set[int]:
    k = int(math.log2(limit) * 4) + 2
    return {round(2 ** (i / 4)) for i in range(k)}


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


@dataclass
class Budget:
    """What snapshots have cost, against the training time they may take a share of (`snapshot_budget`)."""

    seconds: float = 0.0            # wall time spent taking snapshots
    taken: int = 0
    skipped: int = 0                # wanted but skipped to stay within the budget
    skipped_by_file: dict[str, int] = field(default_factory=dict)  # the same, by file sha256
    pass_cost: float = 0.0          # seconds of the last snapshot's forward pass: the next one's estimate
    generate_cost: float = 0.0      # seconds of the last snapshot's generations

    # A checkpoint written before the budget was the observers' own kept it in the progress, under these names.
    LEGACY = {"seconds": "snapshot_seconds", "taken": "snapshots_taken", "skipped": "snapshots_skipped",
              "skipped_by_file": "snapshots_skipped_by_file", "pass_cost": "snapshot_pass_cost",
              "generate_cost": "snapshot_generate_cost"}

    @classmethod
    def from_state(cls, saved: dict | None, legacy: dict) -> "Budget":
        if saved is not None:
            return cls(**saved)
        return cls(**{k: legacy[old] for k, old in cls.LEGACY.items() if old in legacy})


def judged(e: Example, losses, labels, beta: float) -> dict:
    """A tracked pair's margin (beta times how far its chosen answer's log-ratio to the reference is above its
    rejected one's) and a rated answer's reward; nothing for a plain example. `losses`: its row's token losses."""
    if e.reference is None:
        return {}
    trained = labels != IGNORE
    if e.split:
        chosen = -float(losses[:e.split - 1][trained[:e.split - 1]].sum())
        rejected = -float(losses[e.split - 1:][trained[e.split - 1:]].sum())
        return {"margin": beta * ((chosen - e.reference[0]) - (rejected - e.reference[1]))}
    return {"reward": beta * (-float(losses[trained].sum()) - e.reference[0]), "desirable": e.desirable}


def snapshot_budget(record: dict) -> dict:
    """The snapshot budget's account in a checkpoint's record (trainer_state.json), of any version."""
    return dataclasses.asdict(Budget.from_state((record.get("observers") or {}).get("snapshots"),
                                                record.get("evertrain", {})))


class Snapshots:
    """Evolution snapshots of one run, taken with the model a session trains (on the main process only: one
    process cannot run a sharded model)."""

    def __init__(self, run: Run, accelerator, tokenizer, config, *, sharded: bool, budget: Budget):
        self.run, self.acc, self.tokenizer, self.config = run, accelerator, tokenizer, config
        self.active = accelerator.is_main_process and not sharded
        self.budget = budget

    def load_tracked(self) -> list[dict]:
        """Probes first (re-read every time, so a person can edit probes.jsonl), then the examples picked from
        files."""
        tracked = []
        if self.run.probes.exists():
            try:
                cfg = dataclasses.replace(self.config, held_out_fraction=0.0, packing=False)
                data = load_file(self.run.probes, self.tokenizer, cfg, store_dir=self.run.tokens)
                names = labels(self.run.probes, {e.line for e in data.examples}, cfg)
                for e in data.examples:
                    tracked.append({"id": f"probe-{e.id}", "source": "probe", "file": None, "line": e.line,
                                    "label": names.get(e.line, ""), "input_ids": e.input_ids, "labels": e.labels})
            except DataError as err:
                logs.say(f"evertrain: probes ignored: {err}")
        return tracked + (read_json(self.run.tracked) or [])

    def track_file(self, data: FileData) -> None:
        """Pick this file's tracked examples (a fixed choice: content hash and seed) and remember them."""
        cfg = self.config
        if not cfg.snapshot_per_file or not self.acc.is_main_process:
            return
        tracked = read_json(self.run.tracked) or []
        if any(t["file"] == data.sha256 for t in tracked):
            return
        # A file of judgments: its held-out pairs, whose margin then shows what it learned without training on them.
        pool = data.held_out if data.objective != "supervised" and data.held_out else data.examples
        rng = np.random.default_rng([int(data.sha256[32:48], 16), cfg.seed, 11])
        picks = sorted(rng.permutation(len(pool))[:cfg.snapshot_per_file].tolist())
        names = labels(data.path, {pool[i].line for i in picks}, cfg)
        for i in picks:
            e = pool[i]
            tracked.append({"id": f"{data.sha256[:12]}-{e.id}", "source": "file", "file": data.sha256,
                            "file_name": data.name, "label": names.get(e.line, ""),
                            **{k: v for k, v in example_record(e).items() if k != "kl"}})
        # Bounded: the newest files' picks win; probes are never dropped (they are not in this list).
        tracked = tracked[-cfg.snapshot_max_examples:]
        self.run.tracked.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run.tracked, tracked, indent=None)

    def wanted(self, sha256: str, file_step: int, total: int, global_step: int, train_seconds: float) -> bool:
        """Whether to take a snapshot after this step: wanted, and (unless it is a file's last step or a forced
        one) affordable. A wanted one the budget cannot afford is counted as skipped."""
        cfg, b = self.config, self.budget
        if not self.active:
            return False
        if file_step == total or (cfg.snapshot_every and file_step % cfg.snapshot_every == 0):
            return True  # what a file taught, always; and the rhythm a person asked for
        if not cfg.snapshot_budget:
            return False
        wanted = file_step == 1 or is_log_spaced(global_step)
        # Predictive: the spend so far plus what this kind of snapshot cost last time must fit the budget
        # (the first of each kind is a measurement).
        expected = b.pass_cost + (b.generate_cost if with_generations(file_step, total) else 0.0)
        within_budget = b.seconds + expected <= cfg.snapshot_budget * train_seconds
        if wanted and not within_budget:
            b.skipped += 1
            b.skipped_by_file[sha256] = b.skipped_by_file.get(sha256, 0) + 1
        return wanted and within_budget

    def take(self, model, data: FileData, step: int, *, generations: bool) -> Path | None:
        """Record the model's guesses for every tracked example at global step `step`."""
        import torch  # here: the dashboard reads snapshot_budget without loading torch

        with torch.no_grad():
            return self._take(model, data, step, generations)

    def _take(self, model, data: FileData, step: int, generations: bool) -> Path | None:
        import torch

        from evertrain.data.packing import collate, next_token_logits

        t0 = time.perf_counter()
        tracked = self.load_tracked()
        if not tracked:
            return None
        tok, cfg, model = self.tokenizer, self.config, self.acc.unwrap_model(model)
        examples = [example_from({**t, "line": t["line"] or 0}) for t in tracked]
        was_training = model.training
        model.eval()
        batch = collate([[e] for e in examples], tok.pad_token_id, self.acc.device)
        logits, labels_ = next_token_logits(model, batch)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels_.clamp(min=0), reduction="none")
        guesses = logits.argmax(-1)
        records = []
        for row, (t, e) in enumerate(zip(tracked, examples)):
            shown = e.split or len(e.input_ids)  # a pair shows its chosen answer (its first sequence)
            mask = (labels_[row] != IGNORE) & (torch.arange(labels_.shape[1], device=labels_.device) < shown - 1)
            exp_ids, pred_ids, tok_loss = labels_[row][mask].tolist(), guesses[row][mask].tolist(), losses[row][mask]
            prompt_ids = [i for i, lab in zip(e.input_ids[:shown], e.labels[:shown]) if lab == IGNORE]
            records.append({
                "id": t["id"], "source": t["source"], "file": t["file"], "line": t["line"], "label": t.get("label"),
                "input": tok.decode(prompt_ids), "expected": tok.decode(exp_ids),
                "tokens": [{"expected": tok.decode([a]), "predicted": tok.decode([b]), "correct": a == b,
                            "loss": float(x)} for a, b, x in zip(exp_ids, pred_ids, tok_loss.tolist())],
                "prediction": tok.decode(pred_ids), "generation": None,
                "loss": float(tok_loss.mean()) if exp_ids else None,
                "token_accuracy": sum(a == b for a, b in zip(exp_ids, pred_ids)) / len(exp_ids) if exp_ids else None,
                **judged(e, losses[row], labels_[row], cfg.beta)})
        # Generations for the first few examples that have a real prompt (probes come first in the list).
        prompts = [(r, [i for i, lab in zip(e.input_ids[:e.split or None], e.labels[:e.split or None])
                        if lab == IGNORE]) for r, e in zip(records, examples)]
        t_gen = time.perf_counter()
        for rec, prompt_ids in [(r, p) for r, p in prompts if len(p) > 1][:cfg.snapshot_generate if generations else 0]:
            rec["generation"] = self.generate(model, prompt_ids)
        model.train(was_training)
        seconds = time.perf_counter() - t0
        self.budget.pass_cost = t_gen - t0
        if generations:
            self.budget.generate_cost = time.perf_counter() - t_gen
        out = self.run.evolution / f"step-{step:08d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {"step": step, "file": data.sha256, "file_name": data.name, "time": time.time(),
                                "seconds": seconds, "examples": records}, indent=None)
        self.budget.seconds += seconds
        self.budget.taken += 1
        return out

    def generate(self, model, prompt_ids: list[int]) -> str:
        """Greedy continuation, bounded in tokens and in wall-clock time."""
        import torch

        cfg, tok = self.config, self.tokenizer
        ids = torch.tensor([prompt_ids], device=self.acc.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=cfg.snapshot_new_tokens, max_time=cfg.snapshot_seconds,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
