"""train/chunked_loss.py: the loss taken over the output layer in chunks equals the full logits' loss, and so do its
gradients, with and without LoRA. Training with it, and where it is refused: tests/test_speed_paths.py.

    pytest -q tests/test_chunked_loss.py
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import random_examples

from evertrain import models
from evertrain.data.packing import collate


@pytest.mark.parametrize("lora", [False, True])
def test_the_chunked_loss_and_its_gradients_equal_the_full_logits_ones(tiny_model, lora):
    from evertrain.train import chunked_loss
    from evertrain.config import TrainConfig

    model = models.load_model(str(tiny_model), "float32", "sdpa")
    if lora:
        model = models.add_lora(model, TrainConfig(model=str(tiny_model), lora=True, lora_r=4))
    exs = random_examples(4)
    batch, n = collate([exs[:2], exs[2:]], 0, "cpu"), sum(e.target_tokens for e in exs)  # packed, padded

    def loss_and_grads(context):
        model.zero_grad(set_to_none=True)
        with context:
            out = model(**batch, use_cache=False, num_items_in_batch=n)
            out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads(nullcontext())
    chunked, chunked_grads = loss_and_grads(chunked_loss.active(model, chunk=7))  # chunks cut through examples
    assert full.logits.shape[-1] == model.config.vocab_size
    assert chunked.logits.shape[-1] == model.config.hidden_size  # no logits: the loss took the output layer over
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) > 2
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # and outside, the model is itself again: logits for evaluation and generation
        torch.testing.assert_close(model(**batch, use_cache=False).logits, full.logits)
