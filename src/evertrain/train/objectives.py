"""Objectives: the loss of one micro-batch, whatever its examples teach, in one place.

A step's rows may hold examples of several objectives (a preference file's pairs, and the plain examples replayed
among them). The loss of a step is the sum, over the objectives present, of each one's mean over the whole
global batch: `Counts` holds each mean's denominator, counted over every row of the step on every process, so
that the micro-batches' shares add up to the same loss whatever the accumulation and the number of processes.

    supervised  next-token cross-entropy of the trained tokens; its mean is over the step's trained tokens
    preference  DPO (Rafailov et al. 2023): -log sigmoid(beta ((c - c_ref) - (r - r_ref))), c and r the summed
                log-probabilities of a pair's chosen and rejected answers, c_ref and r_ref their reference's (the
                model when the file began: references.py); or IPO (Azar et al. 2023) with TRL's normalization by
                the answers' lengths; mean over the step's pairs
    feedback    KTO (Ethayarajh et al. 2024): 1 - sigmoid(beta (a - a_ref - KL)) for an answer rated good,
                1 - sigmoid(beta (KL - (a - a_ref))) for one rated bad, weighted (desirable_weight,
                undesirable_weight); KL estimated as TRL does, from each answer's prompt with another record's
                answer, over the micro-batch on every process, clamped at 0 and never differentiated; mean over
                the step's rated answers
    rpo_alpha   adds the next-token loss of the preferred answers (chosen; rated good), mean over their tokens

These equal TRL's losses on the same batch (tests/test_judgments.py compares them with TRL's trainers and with a
plain implementation). A micro-batch of supervised examples alone takes transformers' own loss, as it always has.

    evertrain train --dataset PAIRS.jsonl --output-dir DIR --beta 0.1 --preference-loss sigmoid
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from evertrain.data import IGNORE, Example
from evertrain.data.packing import collate
from evertrain.train import chunked_loss

ROWS = 8  # held-out examples per forward pass


@dataclass
class Counts:
    """The denominators of a step's means, over the whole global batch (every process counts the same rows)."""

    tokens: int = 0        # trained tokens of supervised examples
    pairs: int = 0         # preference pairs
    rated: int = 0         # rated answers
    preferred: int = 0     # trained tokens of the preferred answers (rpo_alpha's mean)

    @classmethod
    def of(cls, rows: list[list[Example]]) -> "Counts":
        c = cls()
        for e in (e for row in rows for e in row):
            if e.objective == "preference":
                c.pairs += 1
                c.preferred += sum(1 for x in e.labels[:e.split] if x != IGNORE)
            elif e.objective == "feedback":
                c.rated += 1
                c.preferred += e.target_tokens if e.desirable else 0
            else:
                c.tokens += e.target_tokens
        return c

    @property
    def judged(self) -> bool:
        return bool(self.pairs or self.rated)


@dataclass
class Sums:
    """What a step's examples say besides the loss, summed on this process (train.loop reduces them)."""

    values: Counter = field(default_factory=Counter)

    def add(self, **values) -> None:
        self.values.update(values)

    KEYS = ("pairs", "chosen", "rejected", "right", "good", "good_rewards", "bad", "bad_rewards", "kl",
            "kl_batches")

    def reduced(self, accelerator) -> dict[str, float]:
        """The means over every process's examples of the step (every process calls it)."""
        if accelerator.num_processes > 1:
            t = torch.tensor([float(self.values[k]) for k in self.KEYS], dtype=torch.float64,
                             device=accelerator.device)
            torch.distributed.all_reduce(t)
            self.values = Counter(dict(zip(self.KEYS, t.tolist())))
        return self.means()

    def means(self) -> dict[str, float]:
        """TRL's per-step metrics from the summed values (all processes' sums, once reduced)."""
        v, out = self.values, {}
        if v["pairs"]:
            out.update({"rewards/chosen": v["chosen"] / v["pairs"], "rewards/rejected": v["rejected"] / v["pairs"],
                        "rewards/accuracies": v["right"] / v["pairs"],
                        "rewards/margins": (v["chosen"] - v["rejected"]) / v["pairs"]})
        if v["good"] or v["bad"]:
            if v["good"]:
                out["rewards/chosen"] = v["good_rewards"] / v["good"]
            if v["bad"]:
                out["rewards/rejected"] = v["bad_rewards"] / v["bad"]
            if v["good"] and v["bad"]:
                out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
            out["kl"] = v["kl"] / max(v["kl_batches"], 1)
        return out


class Objectives:
    """The loss of a micro-batch for the run's settings (beta, the preference loss, rpo_alpha, KTO's weights)."""

    def __init__(self, config, accelerator, *, sharded: bool = False):
        self.config, self.acc = config, accelerator
        self.chunked = config.chunked_loss
        self.sharded = sharded

    def loss(self, model, rows: list[list[Example]], counts: Counts, pad_id: int, sums: Sums):
        """This micro-batch's share of the step's loss (a tensor backward is called on); `sums` gets its metrics."""
        examples = [e for row in rows for e in row]
        if not counts.judged:
            batch = collate(rows, pad_id, self.acc.device)
            with chunked_loss.active(model) if self.chunked else nullcontext():
                return model(**batch, use_cache=False, num_items_in_batch=max(counts.tokens, 1)).loss
        kl = self.kl(model, examples, pad_id, sums) if counts.rated else None
        batch = collate(rows, pad_id, self.acc.device)
        logps = token_logps(model, batch, chunked=self.use_chunks(model))
        total = logps.new_zeros(())
        for e, row, start in placed(rows):
            total = total + self.example_loss(e, logps[row], start, counts, kl, sums)
        return total

    def example_loss(self, e: Example, logps: torch.Tensor, start: int, counts: Counts, kl, sums: Sums):
        """One example's part of the step's loss; `logps`: its row's token log-probabilities (shifted: position t
        holds the log-probability of token t + 1)."""
        cfg = self.config
        if e.objective == "supervised":
            return -segment_logp(logps, e, start, 0, len(e.input_ids)) / max(counts.tokens, 1)
        if e.objective == "preference":
            (a, b), (c, d) = e.segments
            chosen, rejected = segment_logp(logps, e, start, a, b), segment_logp(logps, e, start, c, d)
            per_pair = preference_loss(chosen, rejected, e, cfg)
            rewards = cfg.beta * (chosen.detach() - e.reference[0]), cfg.beta * (rejected.detach() - e.reference[1])
            sums.add(pairs=1, chosen=float(rewards[0]), rejected=float(rewards[1]),
                     right=float(rewards[0] > rewards[1]))
            nll = -chosen / max(counts.preferred, 1) if cfg.rpo_alpha else 0.0
            return per_pair / counts.pairs + cfg.rpo_alpha * nll
        answer = segment_logp(logps, e, start, 0, len(e.input_ids))
        ratio = answer - e.reference[0]
        if e.desirable:
            per_answer = cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - kl)))
            sums.add(good=1, good_rewards=cfg.beta * float(ratio.detach()))
        else:
            per_answer = cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratio)))
            sums.add(bad=1, bad_rewards=cfg.beta * float(ratio.detach()))
        nll = -answer / max(counts.preferred, 1) if cfg.rpo_alpha and e.desirable else 0.0
        return per_answer / counts.rated + cfg.rpo_alpha * nll

    def kl(self, model, examples: list[Example], pad_id: int, sums: Sums, reduce: bool = True) -> torch.Tensor:
        """KTO's KL estimate for this micro-batch, as TRL makes it: the mean, over the rated answers of this
        micro-batch on every process, of the log-ratio of each one's mismatched sequence (its prompt, another
        record's answer), clamped at 0; no gradient flows through it."""
        rated = [e for e in examples if e.objective == "feedback"]
        total = torch.zeros(2, device=self.acc.device, dtype=torch.float64)  # sum of log-ratios, count
        if rated:
            kl_rows = [[Example(line=e.line, format="", input_ids=e.kl[0], labels=e.kl[1])] for e in rated]
            with torch.no_grad():
                logps = token_logps(model, collate(kl_rows, pad_id, self.acc.device), chunked=False)
                for k, e in enumerate(rated):
                    total[0] += float(segment_logp(logps[k], kl_rows[k][0], 0, 0, len(e.kl[0]))) - e.reference[1]
            total[1] = len(rated)
        if reduce and self.acc.num_processes > 1:
            torch.distributed.all_reduce(total)
        kl = (total[0] / total[1]).clamp(min=0) if total[1] else total.new_zeros(())
        sums.add(kl=float(kl), kl_batches=1)
        return kl.to(torch.float32)

    def evaluate(self, model, examples: list[Example], pad_id: int) -> dict:
        """A held-out slice of judgments under the model as it stands: its mean loss (against each example's
        reference, as in training), its accuracy and margin (a pair: the chosen answer's reward above the
        rejected one's; a rated answer: its reward on the side of its rating) and its trained tokens."""
        cfg, was_training = self.config, model.training
        model.eval()
        losses, right, rewards = [], 0, {True: [], False: []}
        with torch.no_grad():
            kl = None
            if examples[0].objective == "feedback":  # over the whole slice, as training takes it per micro-batch
                kl_sums = Sums()
                kl = torch.stack([self.kl(model, examples[i:i + ROWS], pad_id, kl_sums, reduce=False)
                                  for i in range(0, len(examples), ROWS)]).mean().clamp(min=0)
            for i in range(0, len(examples), ROWS):
                chunk = examples[i:i + ROWS]
                logps = token_logps(model, collate([[e] for e in chunk], pad_id, self.acc.device), chunked=False)
                for k, e in enumerate(chunk):
                    if e.objective == "preference":
                        (a, b), (c, d) = e.segments
                        chosen, rejected = segment_logp(logps[k], e, 0, a, b), segment_logp(logps[k], e, 0, c, d)
                        losses.append(float(preference_loss(chosen, rejected, e, cfg)))
                        rewards[True].append(cfg.beta * (float(chosen) - e.reference[0]))
                        rewards[False].append(cfg.beta * (float(rejected) - e.reference[1]))
                        right += rewards[True][-1] > rewards[False][-1]
                    else:
                        ratio = float(segment_logp(logps[k], e, 0, 0, len(e.input_ids))) - e.reference[0]
                        kl_f = float(kl)
                        losses.append(1 - float(torch.sigmoid(torch.tensor(
                            cfg.beta * ((ratio - kl_f) if e.desirable else (kl_f - ratio))))))
                        rewards[bool(e.desirable)].append(cfg.beta * ratio)
                        right += ratio > 0 if e.desirable else ratio < 0
        model.train(was_training)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {"loss": mean(losses), "accuracy": right / len(examples), "margin": mean(rewards[True]) -
                mean(rewards[False]), "tokens": sum(e.target_tokens for e in examples)}

    def use_chunks(self, model) -> bool:
        """The log-probabilities from the output layer chunk by chunk (never the whole vocabulary's logits for
        every position) where that is exact: a plain output layer of a known model, not sharded."""
        return not self.sharded and chunked_loss.supported(model)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, e: Example, cfg) -> torch.Tensor:
    """One pair's loss: DPO's sigmoid, or IPO normalized by each answer's trained tokens (as TRL does)."""
    c_ratio, r_ratio = chosen - e.reference[0], rejected - e.reference[1]
    if cfg.preference_loss == "ipo":
        (a, b), (c, d) = e.segments
        n_c = max(sum(1 for x in e.labels[a:b] if x != IGNORE), 1)
        n_r = max(sum(1 for x in e.labels[c:d] if x != IGNORE), 1)
        return (c_ratio / n_c - r_ratio / n_r - 1 / (2 * cfg.beta)) ** 2
    return -F.logsigmoid(cfg.beta * (c_ratio - r_ratio))


def placed(rows: list[list[Example]]):
    """(example, its row, where it starts in the row) for every example of collated rows."""
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            yield e, r, start
            start += len(e.input_ids)


def segment_logp(logps: torch.Tensor, e: Example, start: int, a: int, b: int) -> torch.Tensor:
    """The summed log-probability of the trained tokens of e.input_ids[a:b], `e` starting at `start` in its row
    (its first token has no prediction: labels[0] is never trained)."""
    trained = [i for i in range(max(a, 1), b) if e.labels[i] != IGNORE]
    if not trained:
        return logps.new_zeros(())
    index = torch.tensor([start + i - 1 for i in trained], device=logps.device)
    return logps.index_select(0, index).sum()


def token_logps(model, batch: dict, *, chunked: bool) -> torch.Tensor:
    """[rows, width - 1]: at t, the log-probability the model gives the label at t + 1 (0 where it is IGNORE)."""
    if chunked:
        return chunked_loss.token_logps(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none",
                          ignore_index=IGNORE)
    return -nll.view(targets.shape)
