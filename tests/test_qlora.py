"""QLoRA (--load-in-4bit) on bitsandbytes' CPU backend: a LoRA adapter trained on frozen NF4 weights, with the
gradients of LoRA on those weights dequantized, resumed after kill -9 to the adapter of a run never interrupted,
refused on a run of the other kind, and exported merged into the base model's own dtype.

    pytest -q tests/test_qlora.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import cli, run_and_kill_after, text_rows, write_jsonl
from safetensors.torch import load_file as load_tensors

from evertrain import exits
from evertrain.runs import Run
from evertrain.train import checkpoint
from evertrain.train.setup import setup
from evertrain.config import TrainConfig

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: `make install` puts it in .venv "
                                                 "(the qlora extra)")

QLORA = ("--lora", "--lora-r", "4", "--lora-alpha", "8", "--load-in-4bit", "--batch-size", "2", "--no-packing",
         "--held-out-fraction", "0", "--learning-rate", "1e-3", "--warmup-steps", "0", "--save-steps", "3",
         "--keep-checkpoints", "10", "--trace")


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_4bit_base_gives_the_gradients_of_lora_on_its_weights_dequantized_even_after_an_evaluation(
        tmp_path, tiny_model, monkeypatch):
    config = TrainConfig(model=str(tiny_model), lora=True, lora_r=4, load_in_4bit=True, held_out_fraction=0)
    session = setup(config, Run.at(tmp_path / "run"), cpu=True)
    model = session.model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every Linear of the base, at 4 bits a weight
    assert all(m.weight.numel() * m.weight.element_size() * 2 == m.in_features * m.out_features for m in quantized)
    ids = torch.arange(3, 40).reshape(1, -1) % 50
    batch = {"input_ids": ids, "labels": ids}

    def dequantized(layer, x):  # the definition: LoRA's base term on the weights the NF4 codes stand for
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(x.dtype)
        return torch.nn.functional.linear(x, weight, layer.bias)

    with monkeypatch.context() as m:
        m.setattr(bnb.nn.Linear4bit, "forward", dequantized)
        expected = lora_grads(model, batch)
    model.eval()
    with torch.no_grad():  # what the anchor set, evaluations and snapshots do between steps
        model(input_ids=ids)
    model.train()
    got = lora_grads(model, batch)
    assert expected.keys() == got.keys() and len(got) == 2 * 7 * 2
    assert all(expected[n].abs().sum() > 0 for n in expected if "lora_B" in n)  # lora_A's is 0 while B starts at 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_trains_an_adapter_that_a_plain_run_cannot_resume_and_exports_it_merged_in_the_base_dtype(
        tmp_path, tiny_model, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "a.jsonl", text_rows(12))
    out = tmp_path / "run"
    assert cli("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *QLORA) == exits.OK
    newest = checkpoint.newest_complete(out)
    assert newest.step == 6 and newest.state["run"]["load_in_4bit"] is True
    assert (newest.path / "adapter_model.safetensors").is_file() and not (newest.path / "model.safetensors").exists()
    adapter = load_tensors(newest.path / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the adapter only: the 4-bit base is never saved
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained

    more = write_jsonl(tmp_path / "b.jsonl", text_rows(4, "b"))
    capsys.readouterr()
    plain = tuple("--no-load-in-4bit" if a == "--load-in-4bit" else a for a in QLORA)  # left out: the run's own
    assert cli("train", "--dataset", more, "--output-dir", out, "--model", tiny_model, *plain) == exits.BAD_INPUT
    assert "load_in_4bit" in capsys.readouterr().err
    assert checkpoint.newest_complete(out).step == 6  # refused before anything was trained

    assert cli("export", out, tmp_path / "m", "--merge", "--base-id", "someone/tiny-llama") == exits.OK
    merged_keys = load_tensors(tmp_path / "m" / "model.safetensors").keys()
    assert not any("lora" in k or "absmax" in k or "quant" in k for k in merged_keys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert merged.dtype == base.dtype == torch.float32
    applied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), newest.path).eval()
    ids = torch.arange(3, 30).reshape(1, -1) % 50
    with torch.no_grad():
        want, got, before = applied(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert not torch.allclose(want, before, atol=1e-4), "the adapter changed nothing: a useless test"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "m" / "evertrain_lineage.json").read_text())["global_step"] == 6


def test_kill_9_mid_file_resumes_a_qlora_run_to_the_adapter_of_one_never_interrupted(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(24))  # 12 steps of 2 rows

    def command(out):
        return [sys.executable, "-m", "evertrain", "train", "--dataset", str(data), "--output-dir", str(out),
                "--model", str(tiny_model), *QLORA]

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(command(whole), check=True, env=env, capture_output=True)
    run_and_kill_after(command(broken), broken, 5)
    assert checkpoint.newest_complete(broken).step < 12  # really killed mid-file
    done = subprocess.run(command(broken), env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "resumes at its step" in done.stdout, done.stdout + done.stderr
    a, b = (load_tensors(checkpoint.final_path(out, 12) / "adapter_model.safetensors") for out in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_qlora_run_trains_the_same_parameters_in_the_same_dtypes_as_a_fresh_one(tmp_path, tiny_model):
    # In bfloat16 peft's preparation casts everything not 4-bit to fp32: a resume that skipped it would go on
    # training the embeddings' and norms' neighbours in another dtype than the run began with.
    data = write_jsonl(tmp_path / "a.jsonl", text_rows(4))
    out = tmp_path / "run"
    opts = tuple(a for a in QLORA if a != "--trace")
    assert cli("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *opts, "--dtype",
               "bfloat16") == exits.OK

    def kinds(session):
        return {n: (p.dtype, p.requires_grad) for n, p in session.model.named_parameters()}

    config = TrainConfig(model=str(tiny_model), lora=True, lora_r=4, lora_alpha=8, load_in_4bit=True,
                         dtype="bfloat16", batch_size=2, packing=False, held_out_fraction=0)
    fresh = kinds(setup(config, Run.at(tmp_path / "fresh"), cpu=True))
    resumed = setup(config, Run.at(out), cpu=True)
    assert resumed.progress.global_step == 2 and kinds(resumed) == fresh
    assert {dtype for dtype, trained in fresh.values() if not trained} >= {torch.float32}  # the cast happened
