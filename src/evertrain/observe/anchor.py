"""The anchor set: what the base model itself answered, kept to measure (and rehearse) drift from it.

At the run's first step, before any training, evertrain takes `anchor_size` prompts from the probes
(WORK/probes.jsonl) and the first file (a fixed choice: content hash and seed), lets the base model answer
each greedily (`anchor_new_tokens`), and keeps the result in RUN/anchor.json, with the base model's top
token probabilities at every answer position. No outside data is needed and nothing is built twice: a resumed run
reads the file back. Every evaluation then measures, on those prompts and answers:
- the loss of the base model's own answers under the current model (it rises as the model drifts away), and
- the KL divergence from the base model's next-token distributions to the current model's, over the base's top
  TOP_K tokens and one bucket for the rest: a lower bound of the full KL, exact enough to follow drift.
Each measurement is one line of WORK/logs/anchor.jsonl (the drift plot of the page). With `anchor_replay` the
anchor examples are also mixed into training like replay (train/replay.py): the model rehearses what it knew.

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

from evertrain import collective, logs
from evertrain.data import Example, FileData
from evertrain.data.packing import IGNORE
from evertrain.files import append_json_line, read_records, write_json_atomic
from evertrain.runs import Run

TOP_K = 16        # base-model probabilities kept per answer token, for the KL
PLAIN_PROMPT = 32  # tokens of a plain-text example (no prompt part) used as its prompt
ROWS = 8           # anchor examples per forward pass


@dataclass
class Item:
    example: Example
    source: str                 # "probe", or the sha256 of the file the prompt came from
    top_ids: list[list[int]]    # per answer token: the base model's TOP_K most likely tokens
    top_logp: list[list[float]]  # and their log-probabilities


def load(run: Run) -> list[Item]:
    if not run.anchor.exists():
        return []
    return [Item(Example(line=i, format="anchor", input_ids=d["input_ids"], labels=d["labels"]), d["source"],
                 d["top_ids"], d["top_logp"]) for i, d in enumerate(json.loads(run.anchor.read_text())["items"])]


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The part of an example before its first trained token (a plain text: its first PLAIN_PROMPT tokens)."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    if first <= 1:
        return list(input_ids[:min(PLAIN_PROMPT, max(2, len(input_ids) // 2))])
    return list(input_ids[:first])


def summary(by_source: dict[str, list[float]], leave_out: str | None = None) -> dict:
    """Mean token loss and KL over the sources (all, or all but `leave_out`); None where there is no token."""
    kept = [v for s, v in by_source.items() if s != leave_out]
    tokens = sum(v[2] for v in kept)
    return {"loss": sum(v[0] for v in kept) / tokens if tokens else None,
            "kl": sum(v[1] for v in kept) / tokens if tokens else None, "tokens": tokens}


def read_log(run: Run) -> list[dict]:
    return read_records(run.drift)


class Anchor:
    """The anchor set of one run, built and measured with the model a session trains."""

    def __init__(self, run: Run, accelerator, tokenizer, config, *, sharded: bool):
        self.run, self.acc, self.tokenizer, self.config, self.sharded = run, accelerator, tokenizer, config, sharded
        self._items: list[Item] | None = None
        # Made and measured only for what uses it: the forgetting gate, or rehearsing it (anchor_replay). A run
        # with both off pays nothing for it (16 answers generated, two measurements a file).
        self.wanted = bool(config.anchor_size) and (config.forgetting_action != "off" or config.anchor_replay)

    def items(self) -> list[Item]:
        """The anchor set, read once per session (none when nothing uses it)."""
        if self._items is None:
            self._items = load(self.run) if self.wanted else []
        return self._items

    def prompts(self, data: FileData, tracked: list[dict]) -> list[tuple[str, list[int]]]:
        """(source, prompt tokens): the probes' prompts first (of the `tracked` examples), then a fixed choice of
        the first file's."""
        cfg, out = self.config, []
        for t in tracked:
            if t["source"] == "probe":
                out.append(("probe", prompt_of(t["input_ids"], t["labels"])))
        rng = np.random.default_rng([int(data.sha256[:16], 16), cfg.seed, 13])
        for i in rng.permutation(len(data.examples))[:cfg.anchor_size].tolist():
            e = data.examples[i]
            out.append((data.sha256, prompt_of(e.input_ids, e.labels)))
        return [(s, p) for s, p in out if len(p) > 1][:cfg.anchor_size]

    def build(self, model, data: FileData, global_step: int, tracked) -> bool:
        """Make the anchor set from the base model, at the run's first step; every process computes it, the main
        one writes it. True when it was made now. Not under FSDP (said once). `tracked()`: the tracked examples
        (the probes among them), read on the main process only."""
        import torch

        if not self.wanted or self.run.anchor.exists():
            return False
        if global_step > 0:
            self.say("evertrain: this run began before anchor sets existed: it has none (the base model is gone)")
            return False
        if self.sharded:  # generate() may enter a PEFT model below FSDP2's root, where its weights stay sharded
            self.say("evertrain: FSDP: no anchor set (the base model's answers are generated by one whole model), "
                     "so no anchor replay; the forgetting gate compares the held-out slices")
            return False
        t0 = time.perf_counter()
        whole = self.acc.unwrap_model(model)
        was_training = whole.training
        whole.eval()
        # The main process reads the probes (building their token store alone); every process gets its choice.
        chosen = collective.from_main(self.acc, self.prompts(data, tracked()) if self.acc.is_main_process else None)
        made = []
        with torch.no_grad():
            for i in range(0, len(chosen), ROWS):
                batch = chosen[i:i + ROWS]
                for (_s, prompt), answer in zip(batch, self.answers(whole, batch)):
                    made.append(Example(line=len(made), format="anchor", input_ids=prompt + answer,
                                        labels=[IGNORE] * len(prompt) + answer))
            tops = [logp.topk(TOP_K, dim=-1) for logp, _targets in self.log_probs(model, made)]
        whole.train(was_training)
        if self.acc.is_main_process:
            write_json_atomic(self.run.anchor, {
                "built_at_step": global_step, "seconds": time.perf_counter() - t0,
                "items": [{"source": s, "input_ids": e.input_ids, "labels": e.labels, "top_ids": top.indices.tolist(),
                           "top_logp": top.values.tolist()} for (s, _p), e, top in zip(chosen, made, tops)]},
                indent=None)
        self.acc.wait_for_everyone()
        self._items = None
        self.say(f"evertrain: anchor set: {len(made)} prompts answered by the base model "
                 f"({time.perf_counter() - t0:.1f} s), in {self.run.anchor}")
        return True

    def answers(self, model, chosen: list[tuple[str, list[int]]]) -> list[list[int]]:
        """The model's greedy answers to a few prompts at once (left-padded), each cut at its end-of-sequence
        token. No time limit: the same anchor on every process and at every rebuild."""
        import torch

        tok, device = self.tokenizer, self.acc.device
        width = max(len(p) for _s, p in chosen)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for _s, p in chosen], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _s, p in chosen], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=self.config.anchor_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, use_cache=True)
        result = []
        for row in out[:, width:].tolist():
            cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            result.append(row[:cut] or [tok.eos_token_id])
        return result

    def log_probs(self, model, examples: list[Example]):
        """(log-probabilities [answer tokens, vocab], the answer tokens) of each example, in order."""
        import torch

        from evertrain.data.packing import collate, next_token_logits

        for i in range(0, len(examples), ROWS):
            chunk = examples[i:i + ROWS]
            batch = collate([[e] for e in chunk], self.tokenizer.pad_token_id, self.acc.device)
            logits, labels = next_token_logits(model, batch)
            logp = torch.log_softmax(logits, dim=-1)
            for row in range(len(chunk)):
                mask = labels[row] != IGNORE
                yield logp[row][mask], labels[row][mask]

    def measure(self, model) -> dict | None:
        """The anchor's loss and KL under the current model, in total and per source; None without an anchor."""
        import torch

        anchor = self.items()
        if not anchor:
            return None
        was_training = model.training
        model.eval()
        by_source: dict[str, list[float]] = {}  # source -> [loss sum, KL sum, tokens]
        with torch.no_grad():
            for item, (logp, targets) in zip(anchor, self.log_probs(model, [it.example for it in anchor])):
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

    def record(self, drift: dict | None, step: int, after_file: FileData | None) -> dict | None:
        """A measurement as one line of logs/anchor.jsonl (the main process); the line, or None."""
        if drift is None:
            return None
        line = {"step": step, "after_file": after_file.sha256 if after_file else None,
                "after_file_name": after_file.name if after_file else None, "loss": drift["loss"],
                "kl": drift["kl"], "tokens": drift["tokens"], "by_source": drift["by_source"], "time": time.time()}
        if self.acc.is_main_process:
            append_json_line(self.run.drift, line)
        return line

    def say(self, text: str) -> None:
        if self.acc.is_main_process:
            logs.say(text)
