"""evertrain's weights equal those of a plain PyTorch loop (tests/reference_loop.py) on the same rows.

Packing on, gradient accumulation, warmup and clipping; full fine-tuning and LoRA. Two processes are checked
against the same loop in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cli, text_rows, write_jsonl
from reference_loop import reference_weights
from safetensors.torch import load_file as load_tensors

from evertrain.train import checkpoint
from evertrain.config import TrainConfig

SETTINGS = {"batch_size": 2, "gradient_accumulation": 3, "max_length": 48, "packing": True,
            "learning_rate": 2e-3, "warmup_steps": 3, "held_out_fraction": 0.0, "lora_r": 4}
# The plain loop trains each file's own rows only: no replay of earlier files or of the anchor set (on by default).
FLAGS = ["--batch-size", 2, "--gradient-accumulation", 3, "--max-length", 48, "--packing", "--learning-rate", 2e-3,
         "--warmup-steps", 3, "--held-out-fraction", 0, "--lora-r", 4, "--replay-fraction", 0, "--no-anchor-replay"]


@pytest.mark.parametrize("lora", [False, True])
def test_weights_equal_a_plain_pytorch_loop(tmp_path, tiny_model, lora):
    files = [write_jsonl(tmp_path / "a.jsonl", text_rows(23, "a")), write_jsonl(tmp_path / "b.jsonl", text_rows(9, "b"))]
    out = tmp_path / "run"
    for f in files:
        assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, *FLAGS,
                   "--lora" if lora else "--full") == 0
    ckpt = checkpoint.newest_complete(out)
    ours = load_tensors(ckpt.path / ("adapter_model.safetensors" if lora else "model.safetensors"))
    before, theirs = reference_weights(tiny_model, files, TrainConfig(model=str(tiny_model), lora=lora, **SETTINGS),
                                       global_batch=2 * 3)
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-4, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert sum(not torch.equal(theirs[k], before[k]) for k in theirs) >= len(theirs) // 2  # really trained
