"""On CUDA: training, packing, LoRA, QLoRA, resume (bitwise with deterministic = true) and the daemon, on a model large
enough for the GPU's fast paths (bf16, flash or flex attention, fused AdamW).

    make test-gpu        # on a machine with CUDA; elsewhere every test here is skipped with the reason
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import cli, text_rows, write_jsonl
from daemon_helpers import by_name, drop, make_ws
from safetensors.torch import load_file as load_tensors
from tiny import make_model_dir

from evertrain import models
from evertrain.observe import trace
from evertrain.train import checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    # ~30M parameters: big enough that bf16 matmuls, the attention kernel and fused AdamW do real work
    return make_model_dir(tmp_path_factory.mktemp("gpu-model"), hidden=512, layers=6)


def long_rows(n: int, tag: str) -> list[dict]:
    return [{"text": f"{tag} {i}: " + "the quick brown fox jumps " * (5 + i % 40)} for i in range(n)]


def train(out, f, model, *extra):
    return cli("train", "--dataset", f, "--output-dir", out, "--model", model, "--batch-size", 4,
               "--max-length", 512, "--trace", "--held-out-fraction", 0, *extra)


def test_bf16_packing_and_the_fast_attention_train_every_example_once(tmp_path, gpu_model):
    f = write_jsonl(tmp_path / "a.jsonl", long_rows(200, "a"))
    assert train(tmp_path / "run", f, gpu_model) == 0
    ckpt = checkpoint.newest_complete(tmp_path / "run")
    assert ckpt.state["run"]["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert models.attention_implementation("auto") in ("flash_attention_2", "flex_attention")
    assert set(next(iter(trace.coverage(tmp_path / "run" / "trace.jsonl").values())).values()) == {1}


@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_a_kill_9_and_resume_with_deterministic_is_bitwise_equal(tmp_path, gpu_model, mode):
    f = write_jsonl(tmp_path / "a.jsonl", long_rows(160, "a"))
    opts = (mode, "--deterministic", "--save-steps", 3, "--precision", "bf16" if torch.cuda.is_bf16_supported()
            else "fp16")
    assert train(tmp_path / "whole", f, gpu_model, *opts) == 0
    cmd = [sys.executable, "-m", "evertrain", "train", "--dataset", str(f), "--output-dir", str(tmp_path / "cut"),
           "--model", str(gpu_model), "--batch-size", "4", "--max-length", "512", "--trace",
           "--held-out-fraction", "0", *map(str, opts)]
    env = dict(os.environ, EVERTRAIN_FAULT="mid-step:7")
    killed = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    name = "adapter_model.safetensors" if mode == "--lora" else "model.safetensors"
    a = load_tensors(checkpoint.newest_complete(tmp_path / "whole").path / name)
    b = load_tensors(checkpoint.newest_complete(tmp_path / "cut").path / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_daemon_trains_dropped_files_on_the_gpu(tmp_path, gpu_model):
    ws = make_ws(tmp_path, gpu_model, "--max-length", "512")
    drop(ws, "a.jsonl", long_rows(40, "a"))
    drop(ws, "b.jsonl", long_rows(30, "b"))
    assert cli("run", ws, "--once") == 0
    assert {r["state"] for r in by_name(ws).values()} == {"done"}


def test_collate_on_cuda_gives_the_cpu_tensors_on_the_device():
    from evertrain.data import Example
    from evertrain.data.packing import collate

    rows = [[Example(line=0, format="", input_ids=[5, 6, 7], labels=[-100, 6, 7])],
            [Example(line=1, format="", input_ids=[4], labels=[4])]]
    on_cpu, on_gpu = collate(rows, 0, "cpu"), collate(rows, 0, "cuda")
    torch.cuda.synchronize()  # the copy is non-blocking
    assert set(on_gpu) == set(on_cpu)
    for k, v in on_gpu.items():
        assert v.device.type == "cuda" and v.dtype == torch.long and torch.equal(v.cpu(), on_cpu[k])


def test_overlapped_checkpoints_on_the_gpu_hold_what_checkpoints_written_in_step_hold(tmp_path, gpu_model):
    """On CUDA `auto` overlaps (the copy is device to host); the kill -9 test above resumes from such writes."""
    f = write_jsonl(tmp_path / "a.jsonl", long_rows(120, "a"))
    for mode in ("off", "auto"):
        assert train(tmp_path / mode, f, gpu_model, "--deterministic", "--save-steps", 2, "--keep-checkpoints", 20,
                     "--overlap-checkpoints", mode) == 0
    steps = sorted(c.step for c in checkpoint.candidates(tmp_path / "off"))
    assert len(steps) > 2 and steps == sorted(c.step for c in checkpoint.candidates(tmp_path / "auto"))
    for step in steps:
        a, b = (load_tensors(checkpoint.final_path(tmp_path / m, step) / "model.safetensors") for m in ("off", "auto"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def test_qlora_trains_on_the_gpu_and_resumes_after_kill_9(tmp_path, gpu_model):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the qlora extra)")
    f = write_jsonl(tmp_path / "a.jsonl", long_rows(160, "a"))
    opts = ("--lora", "--load-in-4bit", "--deterministic", "--save-steps", 3)
    assert train(tmp_path / "whole", f, gpu_model, *opts) == 0
    cmd = [sys.executable, "-m", "evertrain", "train", "--dataset", str(f), "--output-dir", str(tmp_path / "cut"),
           "--model", str(gpu_model), "--batch-size", "4", "--max-length", "512", "--trace",
           "--held-out-fraction", "0", *map(str, opts)]
    killed = subprocess.run(cmd, env=dict(os.environ, EVERTRAIN_FAULT="mid-step:7"), capture_output=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    whole, cut = (checkpoint.newest_complete(tmp_path / run) for run in ("whole", "cut"))
    assert whole.step == cut.step and whole.state["run"]["load_in_4bit"] is True
    a, b = (load_tensors(c.path / "adapter_model.safetensors") for c in (whole, cut))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:  # bitsandbytes' kernels are outside what --deterministic promises: close, not bitwise
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
