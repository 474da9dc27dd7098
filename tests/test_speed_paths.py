"""The faster paths a GPU wants, each proven equal to the plain path on CPU: attention kernels on packed rows,
fused AdamW, deterministic algorithms; and the settings that cannot be honoured here are refused, not dropped."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import cli, random_examples, text_rows, write_jsonl
from safetensors.torch import load_file as load_tensors

from evertrain import models
from evertrain.train import checkpoint
from evertrain.data.packing import collate


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_has_the_loss_of_its_examples_alone_with_every_attention_kernel(tiny_model, attention):
    model = models.load_model(str(tiny_model), "float32", attention)
    assert model.config._attn_implementation == attention
    exs = random_examples(3)
    n = sum(e.target_tokens for e in exs)
    with torch.no_grad():
        packed = model(**collate([exs], 0, "cpu"), use_cache=False, num_items_in_batch=n).loss * n
        alone = sum(model(**collate([[e]], 0, "cpu"), use_cache=False,
                          num_items_in_batch=e.target_tokens).loss * e.target_tokens for e in exs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def assert_same_weights(tmp_path, tiny_model, *fast) -> None:
    """Train one file plainly and with `fast` options: the weights must agree, and must have moved."""
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(12))
    opts = ("--model", tiny_model, "--batch-size", 4, "--learning-rate", 1e-2, "--warmup-steps", 0)
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "plain", *opts, "--no-fused-optimizer") == 0
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "fast", *opts, *fast) == 0
    a = load_tensors(checkpoint.newest_complete(tmp_path / "plain").path / "model.safetensors")
    b = load_tensors(checkpoint.newest_complete(tmp_path / "fast").path / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    base = load_tensors(tiny_model / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # both really trained


def test_fused_adamw_trains_the_same_weights_as_the_plain_one(tmp_path, tiny_model):
    assert_same_weights(tmp_path, tiny_model, "--fused-optimizer")


def test_deterministic_runs_turn_on_deterministic_algorithms(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(4))
    try:
        assert cli("train", "--dataset", f, "--output-dir", tmp_path / "run", "--model", tiny_model,
                   "--deterministic") == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_qlora_is_refused_without_lora_or_without_bitsandbytes(tmp_path, tiny_model, capsys, monkeypatch):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(4))
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "full", "--model", tiny_model,
               "--load-in-4bit") == 2
    assert "load_in_4bit (QLoRA) trains a LoRA adapter" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed (tests/test_qlora.py trains it)
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "q", "--model", tiny_model, "--lora",
               "--load-in-4bit") == 2
    err = capsys.readouterr().err
    assert "load_in_4bit needs the bitsandbytes package" in err and "evertrain[qlora]" in err
    assert "Traceback" not in err and checkpoint.newest_complete(tmp_path / "q") is None


def test_the_precision_is_part_of_the_run_and_a_change_is_refused(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(4)), "--output-dir", out,
               "--model", tiny_model) == 0
    run = checkpoint.newest_complete(out).state["run"]
    assert run["precision"] == ("no" if not torch.cuda.is_available() else run["precision"])
    # a process of its own: accelerate fixes the precision once per process
    other = subprocess.run([sys.executable, "-m", "evertrain", "train", "--dataset",
                            str(write_jsonl(tmp_path / "b.jsonl", text_rows(4, "b"))), "--output-dir", str(out),
                            "--precision", "bf16"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "precision: run has 'no', asked 'bf16'" in other.stderr
    assert checkpoint.newest_complete(out).step == 1


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_three_contenders_on_tiny_shapes(tmp_path):
    """bench/gpu.py is measured on a GPU machine; here it must at least run end to end, the same code."""
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
    proc = subprocess.run([sys.executable, str(bench), "--model", "tiny", "--steps", "4"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if "tok/s" in line}
    assert set(lines) == {"trainer", "bare", "evertrain"}
    assert "checkpoint stall" in lines["evertrain"] and "1.00x the Trainer" in lines["trainer"]


@pytest.mark.slow
def test_the_guard_benchmark_prints_each_configuration_and_what_it_replayed():
    """bench/guard.py is measured on the embedded SmolLM2 (BENCHMARKS.md); here the same code on the tiny model:
    the defaults replay (the anchor set, in the padding of the rows), the guard turned off replays nothing."""
    import re
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "guard.py"
    proc = subprocess.run([sys.executable, str(bench), "--model", "tiny", "--chats", "12", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| ")]
    head, rows = table[0], {row[0]: dict(zip(table[0], row)) for row in table[1:]}
    assert set(rows) == {"defaults", "off"} and all(len(row) == len(head) for row in table)

    def number(cell: str) -> float:
        return float(re.match(r"[+-]?[\d,.]+", cell).group().replace(",", ""))

    for name, row in rows.items():
        for key in ("steps", "median step", "step ratio", "whole run (before step 1's end / after the last step)",
                    "wall ratio", "file tokens", "peak RSS"):
            assert number(row[key]) > 0, (name, key, row[key])
    replayed = {name: number(row["replayed tokens (examples)"]) for name, row in rows.items()}
    assert replayed["off"] == 0 < replayed["defaults"]
    assert number(rows["off"]["dose"]) == 0 < number(rows["defaults"]["dose"])
    for goal in ("goal: cost <= dose + 3%", "per step: step ratio - 1 <= dose + 3%"):
        assert rows["off"][goal] == "baseline"
        assert rows["defaults"][goal].startswith(("PASS (", "FAIL ("))
    # the baseline trains the whole file; the defaults hold a slice out
    assert number(rows["off"]["file tokens"]) > number(rows["defaults"]["file tokens"])


@pytest.mark.slow
def test_a_compiled_model_trains_the_same_weights(tmp_path, tiny_model):
    assert_same_weights(tmp_path, tiny_model, "--compile")


def test_the_chunked_loss_trains_the_same_weights(tmp_path, tiny_model):
    assert_same_weights(tmp_path, tiny_model, "--chunked-loss")


def test_the_chunked_loss_is_refused_where_the_logits_are_more_than_the_output_layer(tmp_path, tiny_model, capsys):
    from evertrain.train import chunked_loss
    from evertrain.config import ConfigError

    model = models.load_model(str(tiny_model), "float32", "sdpa")
    with pytest.raises(ConfigError, match="under FSDP it is sharded"):
        chunked_loss.refuse_unsupported(model, sharded=True)
    model.config.model_type = "gemma2"  # its logits are soft-capped after the output layer
    with pytest.raises(ConfigError, match="'gemma2' model's logits"):
        chunked_loss.refuse_unsupported(model, sharded=False)

    f = write_jsonl(tmp_path / "a.jsonl", text_rows(4))  # and a LoRA on the output layer itself
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "run", "--model", tiny_model, "--chunked-loss",
               "--lora", "--lora-target-modules", "q_proj,lm_head") == 2
    err = capsys.readouterr().err
    assert "chunked_loss needs a plain output layer" in err and not checkpoint.present(tmp_path / "run"), err
