"""The same command under `accelerate launch` with 2 CPU processes (gloo): same global batch, same model."""

import subprocess
import sys
from pathlib import Path

import torch
from conftest import clean_env, cli, free_port, text_rows, write_jsonl
from reference_loop import reference_weights
from safetensors.torch import load_file as load_tensors

from evertrain.observe import trace
from evertrain.train import checkpoint
from evertrain.config import TrainConfig


# The plain reference loop trains each file's own rows only, without the default replay of earlier files and the
# anchor set.
NO_REPLAY = ("--replay-fraction", "0", "--no-anchor-replay")


def test_two_processes_split_each_global_batch_and_checkpoint_once(tmp_path, tiny_model):
    files = [write_jsonl(tmp_path / "a.jsonl", text_rows(13, "a")), write_jsonl(tmp_path / "b.jsonl", text_rows(5, "b"))]
    accelerate = Path(sys.executable).with_name("accelerate")
    two, one = tmp_path / "two", tmp_path / "one"
    env = clean_env()
    for f in files:
        proc = subprocess.run(
            [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
             "-m", "evertrain", "train", "--dataset", str(f), "--output-dir", str(two), "--model", str(tiny_model),
             "--batch-size", "2", "--gradient-accumulation", "2", "--no-packing", "--trace",
             "--learning-rate", "1e-3", "--held-out-fraction", "0"], capture_output=True, text=True, env=env,
            timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(" done: ") == 1  # only the main process reports
    # global batch = 2 rows x 2 processes x 2 micro-batches = 8: 13 rows -> 2 steps, 5 rows -> 1 step
    assert [c.step for c in checkpoint.candidates(two)] == [3, 2]
    newest = checkpoint.newest_complete(two)
    assert {p.name for p in newest.path.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    cov = trace.coverage(two / "trace.jsonl")
    assert sorted(sorted(c.items()) for c in cov.values()) == sorted(
        [sorted((i, 1) for i in range(13)), sorted((i, 1) for i in range(5))])
    # The evidence comes from both processes, each micro-batch as it reached its forward pass.
    first = trace.read(two / "trace.jsonl")[0]
    assert sorted((mb["rank"], mb["index"]) for mb in first["micro_batches"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(mb["examples"]) == 2 and mb["tokens"] > 0 for mb in first["micro_batches"])

    # One process with the same global batch (4 rows x 2 micro-batches) must land on the same weights, with the
    # default replay of the anchor set and the first file: proof that the two ranks together trained every row of
    # every step, replayed ones included, each weighted once.
    def one_process(out, *extra):
        for f in files:
            assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--batch-size", 4,
                       "--gradient-accumulation", 2, "--no-packing", "--learning-rate", 1e-3, "--held-out-fraction",
                       0, *extra) == 0
        return load_tensors(checkpoint.final_path(out, 3) / "model.safetensors")

    a, b = one_process(one), load_tensors(newest.path / "model.safetensors")
    assert any(r.get("replay") for r in trace.read(two / "trace.jsonl"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # ... and one process without replay trains as a plain PyTorch loop that runs every example alone.
    plain = one_process(tmp_path / "plain", *NO_REPLAY)
    config = TrainConfig(model=str(tiny_model), batch_size=2, gradient_accumulation=2, packing=False,
                         learning_rate=1e-3, held_out_fraction=0.0)
    _before, reference = reference_weights(tiny_model, files, config, global_batch=8)
    for k in plain:
        torch.testing.assert_close(plain[k], reference[k], rtol=1e-4, atol=2e-6)
