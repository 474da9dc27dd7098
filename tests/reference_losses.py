"""DPO, IPO and KTO written from their papers, without evertrain's code: one sequence at a time, no packing, the
full logits, plain PyTorch. tests/test_judgments.py requires evertrain's objectives to agree with these (and with
TRL's trainers) on the same batch and reference.

    pytest -q tests/test_judgments.py -k plain
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_logp(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(answer | prompt): the sum of the answer tokens' log-probabilities."""
    ids = torch.tensor([prompt + answer])
    logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(prompt) - 1:].sum()


def dpo(model, pairs, reference, beta: float, sft_weight: float = 0.0) -> torch.Tensor:
    """Rafailov et al. 2023, eq. 7: mean over pairs of -log sigmoid(beta (log-ratio chosen - log-ratio rejected));
    plus `sft_weight` x the mean next-token loss of the chosen answers' tokens (TRL's loss_type "sft")."""
    losses, nll, tokens = [], 0.0, 0
    for (prompt, chosen, rejected), (ref_c, ref_r) in zip(pairs, reference):
        c, r = answer_logp(model, prompt, chosen), answer_logp(model, prompt, rejected)
        losses.append(-F.logsigmoid(beta * ((c - ref_c) - (r - ref_r))))
        nll, tokens = nll - c, tokens + len(chosen)
    return torch.stack(losses).mean() + sft_weight * nll / tokens


def ipo(model, pairs, reference, beta: float) -> torch.Tensor:
    """Azar et al. 2023, eq. 17, each log-ratio divided by its answer's length (as TRL computes it)."""
    losses = []
    for (prompt, chosen, rejected), (ref_c, ref_r) in zip(pairs, reference):
        c, r = answer_logp(model, prompt, chosen), answer_logp(model, prompt, rejected)
        losses.append(((c - ref_c) / len(chosen) - (r - ref_r) / len(rejected) - 1 / (2 * beta)) ** 2)
    return torch.stack(losses).mean()


def kto(model, rated, reference, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> torch.Tensor:
    """Ethayarajh et al. 2024, eq. 8, with the KL term estimated as TRL does: each prompt with the answer of the
    record before it (the first's: the last's), no gradient, clamped at 0."""
    with torch.no_grad():
        kl = torch.stack([answer_logp(model, prompt, rated[i - 1][1]) - reference[i][1]
                          for i, (prompt, _a, _good) in enumerate(rated)]).mean().clamp(min=0)
    losses = []
    for (prompt, answer, good), (ref, _ref_kl) in zip(rated, reference):
        ratio = answer_logp(model, prompt, answer) - ref
        losses.append(desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))) if good
                      else undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return torch.stack(losses).mean()
