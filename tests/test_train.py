"""`evertrain train` on several files: one continuous run, exactly-once coverage, LR continuity, checkpoints."""

import json
import math
from collections import Counter

import pytest
import torch
from conftest import break_weights_at, cli, text_rows, write_jsonl

from evertrain.observe import trace
from evertrain.runs import Run
from evertrain.train import checkpoint, objectives
from evertrain.train.setup import setup
from evertrain.config import TrainConfig
from evertrain.train.schedule import lr_factor


def metrics(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def train(out, f, *extra):
    return cli("train", "--dataset", f, "--output-dir", out, *extra)


@pytest.mark.parametrize("epochs,accum", [(1, 2), (2, 1)])
def test_three_awkward_files_train_every_example_exactly_once_per_epoch(tmp_path, tiny_model, epochs, accum):
    sizes = {"a": 13, "b": 3, "c": 21}  # batch 4 x accumulation: none is a multiple of the global batch
    out, G = tmp_path / "run", 4 * accum
    files = {k: write_jsonl(tmp_path / f"{k}.jsonl", text_rows(n, k)) for k, n in sizes.items()}
    common = ("--model", tiny_model, "--batch-size", 4, "--gradient-accumulation", accum, "--epochs", epochs,
              "--no-packing", "--trace", "--save-steps", 3, "--held-out-fraction", 0)  # every line trains
    for f in files.values():
        assert train(out, f, *common) == 0
    cov = trace.coverage(out / "trace.jsonl")
    assert len(cov) == 3
    for k, n in sizes.items():
        sha = checkpoint.newest_complete(out).state["evertrain"]["files"][list(sizes).index(k)]["sha256"]
        assert cov[sha] == Counter({line: epochs for line in range(n)})
    steps = [r["step"] for r in trace.read(out / "trace.jsonl")]
    expected = sum(math.ceil(n / G) * epochs for n in sizes.values())
    assert steps == list(range(1, expected + 1))
    newest = checkpoint.newest_complete(out)
    assert newest.step == expected and newest.state["global_step"] == expected
    assert [f["steps"] for f in newest.state["files"]] == [math.ceil(n / G) * epochs for n in sizes.values()]


def test_file_smaller_than_a_batch_trains_one_step(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "one.jsonl", text_rows(1)), "--model", tiny_model,
                 "--batch-size", 8, "--trace") == 0
    assert [r["examples"] for r in trace.read(out / "trace.jsonl")] == [[0]]
    assert checkpoint.newest_complete(out).step == 1


@pytest.mark.parametrize("schedule", ["constant", "inverse_sqrt", "wsd"])
def test_learning_rate_is_continuous_across_files(tmp_path, tiny_model, schedule):
    out = tmp_path / "run"
    opts = ("--model", tiny_model, "--batch-size", 2, "--no-packing", "--learning-rate", 1e-3,
            "--warmup-steps", 6, "--lr-schedule", schedule)
    assert train(out, write_jsonl(tmp_path / "1.jsonl", text_rows(7, "p")), *opts) == 0  # 4 steps: mid-warmup
    assert train(out, write_jsonl(tmp_path / "2.jsonl", text_rows(9, "q"))) == 0          # 5 steps
    extra = ("--decay-steps", 4) if schedule == "wsd" else ()
    assert train(out, write_jsonl(tmp_path / "3.jsonl", text_rows(5, "r")), *extra) == 0  # 3 steps
    lrs = [(m["step"], m["lr"]) for m in metrics(out)]
    assert [s for s, _ in lrs] == list(range(1, 13))
    decay_start = 9 if schedule == "wsd" else None
    for step, lr in lrs:
        assert lr == pytest.approx(1e-3 * lr_factor(schedule, step - 1, 6, decay_start, 4))
    if schedule == "wsd":
        assert lrs[-1][1] < lrs[-2][1] < lrs[-3][1] < 1e-3  # decaying through the last file only
    else:
        assert lrs[4][1] > lrs[3][1]  # warmup carried on into file 2 instead of restarting


def test_same_content_is_not_trained_twice_unless_allowed(tmp_path, tiny_model, capsys):
    out, f = tmp_path / "run", write_jsonl(tmp_path / "f.jsonl", text_rows(5))
    assert train(out, f, "--model", tiny_model) == 0
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes(f.read_bytes())
    assert train(out, copy) == 3
    assert "already trained" in capsys.readouterr().err
    assert checkpoint.newest_complete(out).step == 1
    assert train(out, copy, "--allow-repeat") == 0
    assert checkpoint.newest_complete(out).step == 2


def test_changing_the_run_identity_is_refused(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(3)), "--model", tiny_model) == 0
    assert train(out, write_jsonl(tmp_path / "b.jsonl", text_rows(3, "b")), "--lora") == 2
    err = capsys.readouterr().err
    assert "lora" in err and "new output folder" in err
    assert checkpoint.newest_complete(out).step == 1


def test_checkpoint_loads_with_from_pretrained(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(6)), "--model", tiny_model) == 0
    ckpt = checkpoint.final_path(out, 1)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # it did train
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["files"][0]["steps"] == 1
    assert tok.decode(tok("hi")["input_ids"]) == "hi"
    assert json.loads((ckpt / "evertrain_config.json").read_text())["model"] == str(tiny_model)


def test_lora_run_continues_and_its_adapter_loads(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    opts = ("--model", tiny_model, "--lora", "--lora-r", 4, "--learning-rate", 1e-2, "--batch-size", 2)
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(5)), *opts) == 0
    assert train(out, write_jsonl(tmp_path / "b.jsonl", text_rows(3, "b"))) == 0
    ckpt = checkpoint.newest_complete(out)
    assert ckpt.step == 2 and (ckpt.path / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ckpt.path)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained
    # transformers' own PEFT loading gives the same model as PeftModel's
    direct = AutoModelForCausalLM.from_pretrained(ckpt.path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(direct(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("damage", ["flip_weights_byte", "truncate_state", "delete_optimizer"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, tiny_model, damage, capsys):
    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(9)), "--model", tiny_model,
                 "--batch-size", 2, "--save-steps", 2, "--keep-checkpoints", 5, "--no-packing") == 0
    newest = checkpoint.final_path(out, 5)
    if damage == "flip_weights_byte":
        blob = bytearray((newest / "model.safetensors").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(blob))
    elif damage == "truncate_state":
        (newest / "trainer_state.json").write_text('{"global_step": 5, "evert')
    else:
        (newest / "optimizer.pt").unlink()
    assert checkpoint.newest_complete(out).step == 4
    capsys.readouterr()
    assert train(out, write_jsonl(tmp_path / "b.jsonl", text_rows(2, "b"))) == 0
    assert "resumed" in capsys.readouterr().out and checkpoint.newest_complete(out).step == 5
    # Resumed at step 4, file a at its step 4 of 5: a is not done, its cursor waits for a later run of a.
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [f["name"] for f in state["files"]] == ["b.jsonl"] and "a.jsonl" in [c["name"] for c in
                                                                                  state["cursors"].values()]


def test_old_checkpoints_are_pruned_but_never_the_newest(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(12)), "--model", tiny_model,
                 "--batch-size", 2, "--save-steps", 1, "--keep-checkpoints", 2, "--no-packing") == 0
    assert sorted(c.step for c in checkpoint.candidates(out)) == [5, 6]
    assert not list(out.glob(".tmp-*"))


def test_checkpoints_are_ordered_by_recorded_step_not_name(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(20)), "--model", tiny_model,
                 "--batch-size", 2, "--save-steps", 9, "--keep-checkpoints", 5, "--no-packing") == 0
    # checkpoint-9 sorts after checkpoint-10 as a string; the newest is the one with the higher step
    assert [c.step for c in checkpoint.candidates(out)] == [10, 9]
    assert checkpoint.newest_complete(out).path.name == "checkpoint-10"


def test_a_save_cut_short_by_a_crash_is_never_resumed(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert train(out, write_jsonl(tmp_path / "a.jsonl", text_rows(4)), "--model", tiny_model) == 0
    # what a crash mid-save leaves: a temporary folder, even one with a plausible state file
    half = checkpoint.temp_path(out, 99)
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 99, "manifest": {}}')
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert checkpoint.newest_complete(out).step == 1
    assert train(out, write_jsonl(tmp_path / "b.jsonl", text_rows(3, "b"))) == 0
    assert checkpoint.newest_complete(out).step == 2 and not half.exists()


@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_model, mode):
    from safetensors.torch import load_file as load_tensors

    f = write_jsonl(tmp_path / "a.jsonl", text_rows(9))
    opts = ("--model", tiny_model, mode, "--batch-size", 3, "--learning-rate", 1e-2, "--no-packing")
    assert train(tmp_path / "plain", f, *opts) == 0
    assert train(tmp_path / "ckpt", f, *opts, "--gradient-checkpointing") == 0
    name = "adapter_model.safetensors" if mode == "--lora" else "model.safetensors"
    a = load_tensors(checkpoint.final_path(tmp_path / "plain", 3) / name)
    b = load_tensors(checkpoint.final_path(tmp_path / "ckpt", 3) / name)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    resumed = setup(TrainConfig.from_dict(json.loads(
        (checkpoint.final_path(tmp_path / "ckpt", 3) / "evertrain_config.json").read_text())), Run.at(tmp_path / "ckpt"))
    assert resumed.accelerator.unwrap_model(resumed.model).is_gradient_checkpointing  # it really recomputes


def test_train_in_process_gives_the_signal_handlers_back(tmp_path, tiny_model):
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert train(tmp_path / "run", write_jsonl(tmp_path / "a.jsonl", text_rows(3)), "--model", tiny_model) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_non_finite_loss_in_train_rolls_back_marks_the_file_failed_and_exits_4(tmp_path, tiny_model, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "run"
    common = ("--model", tiny_model, "--batch-size", 2, "--no-packing", "--save-steps", 2, "--trace",
              "--held-out-fraction", 0)
    assert train(out, write_jsonl(tmp_path / "good.jsonl", text_rows(4, "good")), *common) == 0  # steps 1-2
    poison = write_jsonl(tmp_path / "poison.jsonl", text_rows(20, "poison"))
    real_collate = objectives.collate
    sessions = break_weights_at(monkeypatch, 3)  # the weights break in the file's 4th step
    assert train(out, poison, *common) == 4
    err = capsys.readouterr().err
    assert "loss is nan at global step 6" in err and "rolled back to checkpoint-4 (global step 4)" in err
    assert "Traceback" not in err and len(sessions) == 2  # the rollback reloaded the newest good checkpoint
    state = checkpoint.newest_complete(out).state["evertrain"]
    assert [(f["name"], f["status"], f["steps"]) for f in state["files"]] == [
        ("good.jsonl", "done", 2), ("poison.jsonl", "failed", 2)]
    assert not state["cursors"] and state["global_step"] == 4
    assert [r["step"] for r in trace.read(out / "trace.jsonl") if "step" in r] == [1, 2, 3, 4]
    monkeypatch.setattr(objectives, "collate", real_collate)
    # the broken weights were thrown away: the next file trains with finite losses from the good checkpoint
    assert train(out, write_jsonl(tmp_path / "after.jsonl", text_rows(4, "after")), *common) == 0
    assert all(math.isfinite(m["loss"]) for m in metrics(out) if m["file_name"] == "after.jsonl")


def test_sharding_evertrain_cannot_honour_is_refused_never_dropped(tmp_path, tiny_model, monkeypatch, capsys):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(4))
    cases = [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed was asked for"),
             ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1 (evertrain shards with FSDP2: add --fsdp_version 2)"),
             ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
              "sharding strategy SHARD_GRAD_OP"),
             ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "one process holds it whole")]
    for i, (env, message) in enumerate(cases):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert train(tmp_path / str(i), f, "--model", tiny_model) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert checkpoint.newest_complete(tmp_path / str(i)) is None
