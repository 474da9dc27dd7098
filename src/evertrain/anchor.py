"""The anchor set: what the base model itself answered, kept to measure (and rehearse) drift from it.

At the run's first step, before any training, evertrain takes `anchor_size` prompts from the probes
(WORKDIR/probes.jsonl) and the first file (a fixed choice: content hash and seed), lets the base model answer
each greedily (`anchor_new_tokens`), and keeps the result in OUTPUT_DIR/anchor.json, with the base model's top
token probabilities at every answer position. No outside data is needed and nothing is built twice: a resumed run
reads the file back. Every evaluation then measures, on those prompts and answers:
- the loss of the base model's own answers under the current model (it rises as the model drifts away), and
- the KL divergence from the base model's next-token distributions to the current model's, over the base's top
  TOP_K tokens and one bucket for the rest: a lower bound of the full KL, exact enough to follow drift.
Each measurement is one line of WORKDIR/logs/anchor.jsonl (the drift plot of the page). With `anchor_replay` the
anchor examples are also mixed into training like replay (replay.py): the model rehearses what it already knew.

An item drawn from a file is its answer to that file's prompt; while that file trains, the model is meant to
change that answer, so the forgetting gate (gate.py) leaves such items out of that file's check.

    evertrain train --dataset FILE --output-dir DIR --anchor-size 16    # then: cat DIR/logs/anchor.jsonl
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evertrain import collective
from evertrain.checkpoint import read_records, write_json_atomic
from evertrain.data import Example, FileData
from evertrain.data.packing import IGNORE

TOP_K = 16        # base-model probabilities kept per answer token, for the KL
PLAIN_PROMPT = 32  # tokens of a plain-text example (no prompt part) used as its prompt
ROWS = 8           # anchor examples per forward pass


@dataclass
class Item:
    example: Example
    source: str                 # "probe", or the sha256 of the file the prompt came from
    top_ids: list[list[int]]    # per answer token: the base model's TOP_K most likely tokens
    top_logp: list[list[float]]  # and their log-probabilities


def anchor_path(output_dir: Path) -> Path:
    return Path(output_dir) / "anchor.json"


def log_path(workdir: Path) -> Path:
    return Path(workdir) / "logs" / "anchor.jsonl"


def load(output_dir: Path) -> list[Item]:
    path = anchor_path(output_dir)
    if not path.exists():
        return []
    return [Item(Example(line=i, format="anchor", input_ids=d["input_ids"], labels=d["labels"]), d["source"],
                 d["top_ids"], d["top_logp"]) for i, d in enumerate(json.loads(path.read_text())["items"])]


def items(session) -> list[Item]:
    """The anchor set, read once per session."""
    if session.anchor is None:
        session.anchor = load(session.output_dir)
    return session.anchor


def prompts(session, data: FileData) -> list[tuple[str, list[int]]]:
    """(source, prompt tokens): the probes' prompts first, then a fixed choice of the first file's."""
    from evertrain import snapshots

    cfg, out = session.config, []
    for t in snapshots.load_tracked(session):
        if t["source"] == "probe":
            out.append(("probe", prompt_of(t["input_ids"], t["labels"])))
    rng = np.random.default_rng([int(data.sha256[:16], 16), cfg.seed, 13])
    for i in rng.permutation(len(data.examples))[:cfg.anchor_size].tolist():
        e = data.examples[i]
        out.append((data.sha256, prompt_of(e.input_ids, e.labels)))
    return [(s, p) for s, p in out if len(p) > 1][:cfg.anchor_size]


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The part of an example before its first trained token (a plain text: its first PLAIN_PROMPT tokens)."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    if first <= 1:
        return list(input_ids[:min(PLAIN_PROMPT, max(2, len(input_ids) // 2))])
    return list(input_ids[:first])


def build(session, data: FileData) -> bool:
    """Make the anchor set from the base model, at the run's first step; every process computes it (a sharded
    model needs them all), the main one writes it. True when it was made now."""
    import torch

    cfg = session.config
    if not cfg.anchor_size or anchor_path(session.output_dir).exists():
        return False
    if session.progress.global_step > 0:
        session.say("evertrain: this run began before anchor sets existed: it has none (the base model is gone)")
        return False
    t0 = time.perf_counter()
    model = session.accelerator.unwrap_model(session.model)
    was_training = model.training
    model.eval()
    # The main process reads the probes (building their token store alone); every process gets its choice.
    chosen = collective.from_main(session.accelerator, prompts(session, data) if session.is_main else None)
    made = []
    with torch.no_grad():
        for i in range(0, len(chosen), ROWS):
            batch = chosen[i:i + ROWS]
            for (_s, prompt), answer in zip(batch, answers(session, model, batch)):
                made.append(Example(line=len(made), format="anchor", input_ids=prompt + answer,
                                    labels=[IGNORE] * len(prompt) + answer))
        tops = [logp.topk(TOP_K, dim=-1) for logp, _targets in log_probs(session, made)]
    model.train(was_training)
    if session.is_main:
        write_json_atomic(anchor_path(session.output_dir), {
            "built_at_step": session.progress.global_step, "seconds": time.perf_counter() - t0,
            "items": [{"source": s, "input_ids": e.input_ids, "labels": e.labels, "top_ids": top.indices.tolist(),
                       "top_logp": top.values.tolist()} for (s, _p), e, top in zip(chosen, made, tops)]}, indent=None)
    session.accelerator.wait_for_everyone()
    session.anchor = None
    session.say(f"evertrain: anchor set: {len(made)} prompts answered by the base model "
                f"({time.perf_counter() - t0:.1f} s), in {anchor_path(session.output_dir)}")
    return True


def answers(session, model, chosen: list[tuple[str, list[int]]]) -> list[list[int]]:
    """The model's greedy answers to a few prompts at once (left-padded), each cut at its end-of-sequence token.

    No time limit: the same anchor on every process and at every rebuild."""
    import torch

    tok, cfg, device = session.tokenizer, session.config, session.accelerator.device
    width = max(len(p) for _s, p in chosen)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for _s, p in chosen], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _s, p in chosen], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=cfg.anchor_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
    result = []
    for row in out[:, width:].tolist():
        cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        result.append(row[:cut] or [tok.eos_token_id])
    return result


def log_probs(session, examples: list[Example]):
    """(log-probabilities [answer tokens, vocab], the answer tokens) of each example, in order."""
    import torch

    from evertrain.data.packing import collate

    for i in range(0, len(examples), ROWS):
        chunk = examples[i:i + ROWS]
        batch = collate([[e] for e in chunk], session.tokenizer.pad_token_id, session.accelerator.device)
        logits = session.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        # Position t predicts token t+1.
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        for row in range(len(chunk)):
            mask = labels[row] != IGNORE
            yield logp[row][mask], labels[row][mask]


def measure(session) -> dict | None:
    """The anchor's loss and KL under the current model, in total and per source; None without an anchor."""
    import torch

    anchor = items(session)
    if not anchor:
        return None
    model = session.model
    was_training = model.training
    model.eval()
    by_source: dict[str, list[float]] = {}  # source -> [loss sum, KL sum, tokens]
    with torch.no_grad():
        for item, (logp, targets) in zip(anchor, log_probs(session, [it.example for it in anchor])):
            base_ids = torch.tensor(item.top_ids, device=logp.device)
            base_logp = torch.tensor(item.top_logp, device=logp.device)
            now_top = logp.gather(-1, base_ids)
            # The rest of the vocabulary as one bucket on each side: KL over TOP_K + 1 outcomes.
            base_rest = torch.log1p(-base_logp.exp().sum(-1).clamp(max=1 - 1e-6))
            now_rest = torch.log1p(-now_top.exp().sum(-1).clamp(max=1 - 1e-6))
            kl = (base_logp.exp() * (base_logp - now_top)).sum(-1) + base_rest.exp() * (base_rest - now_rest)
            sums = by_source.setdefault(item.source, [0.0, 0.0, 0])
            sums[0] += float(-logp.gather(-1, targets[:, None]).sum())
            sums[1] += float(kl.clamp(min=0).sum())
            sums[2] += int(targets.numel())
    model.train(was_training)
    return {"by_source": by_source, **summary(by_source)}


def summary(by_source: dict[str, list[float]], leave_out: str | None = None) -> dict:
    """Mean token loss and KL over the sources (all, or all but `leave_out`); None where there is no token."""
    kept = [v for s, v in by_source.items() if s != leave_out]
    tokens = sum(v[2] for v in kept)
    return {"loss": sum(v[0] for v in kept) / tokens if tokens else None,
            "kl": sum(v[1] for v in kept) / tokens if tokens else None, "tokens": tokens}


def evaluate(session, *, after_file: FileData | None = None) -> dict | None:
    """Measure the anchor now and append it to logs/anchor.jsonl (the main process)."""
    drift = measure(session)
    if drift is None:
        return None
    record = {"step": session.progress.global_step, "after_file": after_file.sha256 if after_file else None,
              "after_file_name": after_file.name if after_file else None, "loss": drift["loss"], "kl": drift["kl"],
              "tokens": drift["tokens"], "by_source": drift["by_source"], "time": time.time()}
    if session.is_main:
        session.degraded.attempt("logs/anchor.jsonl", lambda: _append(log_path(session.workdir), record))
    return drift


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(workdir: Path) -> list[dict]:
    return read_records(log_path(workdir))
