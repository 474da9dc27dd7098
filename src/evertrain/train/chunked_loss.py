"""The training loss without the full logits (chunked_loss): cross-entropy over chunks of target positions.

A causal LM's forward multiplies every position's hidden state by the output matrix and keeps the product for
the backward pass: batch x length x vocabulary logits (one row of 4096 tokens of Qwen2.5's 151,936 words is
2.5 GB in float32). Inside `active(model)`, the output layer hands its hidden states on unchanged and the loss
multiplies them by its weight chunk by chunk, only at positions that have a target, each chunk recomputed in
the backward pass (torch.utils.checkpoint) rather than kept: the peak holds one chunk's logits. The sum is the
same, up to the order of additions, and so are the gradients (tests/test_chunked_loss.py). The model is still
called through its wrappers (DDP, PEFT), so their hooks see every parameter.

    evertrain train --dataset F --output-dir D --chunked-loss
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint

from evertrain.config import ConfigError

CHUNK = 1024  # target positions per chunk: 1024 x 151,936 float32 logits is 0.6 GB
# Model types whose logits are their output layer's product and nothing more: no soft-capping or scaling after
# it (Gemma 2, Cohere, Granite have one), so the loss may take the product over from the layer.
PLAIN_HEADS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3")


def causal_lm(model):
    """The transformers model inside DDP and PEFT wrappers (whose `loss_function` the forward calls)."""
    inner = extract_model_from_parallel(model)  # DDP (and DeepSpeed, a compiled module)
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return inner


def supported(model) -> bool:
    """Whether the output layer can be taken over here (refuse_unsupported says why not, when asked for)."""
    inner = causal_lm(model)
    return (getattr(inner.config, "model_type", None) in PLAIN_HEADS
            and type(inner.get_output_embeddings()) is torch.nn.Linear)


def refuse_unsupported(model, *, sharded: bool) -> None:
    """chunked_loss where it cannot be honoured: say why, before anything is trained."""
    inner = causal_lm(model)
    head = inner.get_output_embeddings()
    model_type = getattr(inner.config, "model_type", None)
    if sharded:
        raise ConfigError("chunked_loss takes the output layer's weight whole; under FSDP it is sharded: train "
                          "without --chunked-loss")
    if model_type not in PLAIN_HEADS:
        raise ConfigError(f"chunked_loss knows that a {model_type!r} model's logits are its output layer's product "
                          f"only for {', '.join(PLAIN_HEADS)}: train without --chunked-loss")
    if type(head) is not torch.nn.Linear:
        raise ConfigError(f"chunked_loss needs a plain output layer; this model's is a {type(head).__name__} "
                          "(a LoRA on lm_head?): train without --chunked-loss")


@contextmanager
def active(model, chunk: int = CHUNK):
    """Inside, a forward with labels returns the chunked loss; its `logits` are the hidden states (unused)."""
    inner = causal_lm(model)
    head = inner.get_output_embeddings()
    had = inner.__dict__.get("_loss_function")
    head.forward = _pass_on
    inner.loss_function = partial(chunked_cross_entropy, head=head, chunk=chunk)
    try:
        yield
    finally:
        del head.forward
        if had is None:
            del inner._loss_function
        else:
            inner.loss_function = had


def _pass_on(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, *, head: torch.nn.Linear,
                          chunk: int, num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: torch.Tensor | None = None, **_kwargs) -> torch.Tensor:
    """transformers' ForCausalLMLoss, from the hidden states (`logits` here) and the output layer `head`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = logits.reshape(-1, logits.size(-1))
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = targets != ignore_index
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        total = total + checkpoint(_chunk_loss, hidden[start:start + chunk], targets[start:start + chunk],
                                   head.weight, head.bias, use_reentrant=False)
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def token_logps(model, batch: dict, chunk: int = CHUNK) -> torch.Tensor:
    """[rows, width - 1]: at t, the log-probability of the label at t + 1 (0 where it is IGNORE), from the output
    layer chunk by chunk over the positions that have a label: never the whole vocabulary's logits for every
    position, each chunk's recomputed in the backward pass (objectives.py: a pair's answers, a rated answer)."""
    inner = causal_lm(model)
    head = inner.get_output_embeddings()
    head.forward = _pass_on
    try:
        hidden = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
    finally:
        del head.forward
    targets = batch["labels"][:, 1:]
    keep = targets.reshape(-1) != -100
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.size(-1))[keep], targets.reshape(-1)[keep]
    pieces = [checkpoint(_chunk_logps, flat_hidden[s:s + chunk], flat_targets[s:s + chunk], head.weight, head.bias,
                         use_reentrant=False) for s in range(0, len(flat_targets), chunk)]
    out = hidden.new_zeros(targets.numel(), dtype=torch.float32)
    if pieces:
        out = out.index_put((keep.nonzero().squeeze(1),), torch.cat(pieces))
    return out.view(targets.shape)


def _chunk_logps(hidden, targets, weight, bias):
    return -F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


def _chunk_loss(hidden, targets, weight, bias):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
