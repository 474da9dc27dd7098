"""A plain PyTorch training loop, written without evertrain's loop, to check evertrain's weights against.

Same rows in the same order (FileData.step_rows), same AdamW, same warmup and clipping; but every example is
run ALONE (no packing, no padding, no accumulation, no processes): the loss of a step is the sum of the token
losses of its examples over the step's target tokens. If evertrain's packing, accumulation, rank split or
loss scaling were wrong, its weights would leave this loop's. `reference_weights` gives the weights before and after,
named as evertrain's checkpoint names them (tests/test_reference.py, tests/test_distributed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from evertrain import models
from evertrain.config import TrainConfig
from evertrain.data import load_file
from evertrain.train.schedule import lr_factor


def train_reference(model, tokenizer, files, config, *, global_batch: int, global_step: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    for path in files:
        data = load_file(path, tokenizer, config)
        for file_step in range(data.total_steps(global_batch, config.epochs)):
            examples = [data.examples[i] for r in data.step_rows(file_step, global_batch, config.seed)
                        for i in data.rows[r]]
            n_target = sum(e.target_tokens for e in examples)
            for e in examples:
                ids = torch.tensor([e.input_ids])
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                labels = torch.tensor(e.labels[1:])
                loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n_target
                loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * lr_factor(config.lr_schedule, global_step, config.warmup_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
    return model


def reference_weights(tiny_model, files, config: TrainConfig, global_batch: int):
    """(weights before, weights after) of the plain loop, named as evertrain's checkpoint names them."""
    torch.manual_seed(config.seed)  # as evertrain does before LoRA's initialisation
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if config.lora:
        from peft import get_peft_model_state_dict

        model = models.add_lora(model, config)
        named = lambda: {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}  # noqa: E731
    else:
        named = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    before = named()
    train_reference(model, models.load_tokenizer(str(tiny_model)), files, config, global_batch=global_batch)
    return before, named()
