"""`evertrain train` on several files: one continuous run, exactly-once coverage, LR continuity, checkpoints."""

import dataclasses
import json
import math
import shutil
from collections import Counter

import pytest
import torch
from conftest import break_weights_at, cli, text_rows, write_jsonl

from evertrain.observe import trace
from evertrain import files
from evertrain.runs import Run
from evertrain.train import checkpoint, loop, objectives
from evertrain.train.setup import setup
from evertrain.config import TrainConfig
from evertrain.data import load_file
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


def test_learning_rate_schedules_have_their_documented_shape():
    """The multiplier for the step after `step` completed ones: linear warmup, then each schedule's shape."""
    assert [lr_factor("constant", s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("constant", 0, 0) == 1.0
    assert [lr_factor("inverse_sqrt", s, 4) for s in (0, 3, 4, 15, 63)] == [0.25, 1.0, math.sqrt(4 / 5), 0.5, 0.25]
    assert [lr_factor("inverse_sqrt", s, 0) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert lr_factor("wsd", 10 ** 6, 2) == 1.0  # no decay asked for: stable for ever
    assert [lr_factor("wsd", s, 2, 10, 4) for s in (1, 2, 9, 10, 11, 12, 13, 20)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25,
                                                                                      0.0, 0.0]
    assert lr_factor("wsd", 5, 8, 4, 4) == 6 / 8  # a decay asked for during warmup waits for its end
    assert [lr_factor("wsd", s, 0, 3, 0) for s in (2, 3, 4)] == [1.0, 0.0, 0.0]  # no decay steps: straight to 0
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        lr_factor("cosine", 5, 2)


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


def test_guards_refuse_to_call_a_file_done_without_its_steps_and_checkpoint(tmp_path, tiny_model):
    """The checks home-made systems lacked, on results that really happened, then on broken ones."""
    out = tmp_path / "run"
    session = setup(TrainConfig(model=str(tiny_model), batch_size=2, packing=False), Run.at(out))
    data = load_file(write_jsonl(tmp_path / "a.jsonl", text_rows(5)), session.tokenizer, session.config)
    result = loop.drive(loop.fit(session, data), lambda _record: None)
    assert loop.guard_problems(session, result) == []
    zero = dataclasses.replace(result, steps=0, step_after=result.step_before)
    assert any("no optimizer step" in p for p in loop.guard_problems(session, zero))
    short = dataclasses.replace(result, file_step=result.expected_steps - 1)
    assert any("expected 3" in p for p in loop.guard_problems(session, short))
    stalled = dataclasses.replace(result, step_after=result.step_before + 1)
    assert any("global step went 0 -> 1 for 3 steps" in p for p in loop.guard_problems(session, stalled))
    shutil.rmtree(checkpoint.final_path(out, 3))
    assert any("no complete checkpoint for global step 3" in p for p in loop.guard_problems(session, result))


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


# ---------------------------------------------------------------- checkpoint.py at the unit level (fast, for mutmut)
# Folders shaped like checkpoints (real `checkpoint.commit`, small files) instead of trained ones.

def saved(out, step, files=None, **state):
    """A checkpoint of `step` in `out`, committed the way the loop commits one."""
    tmp = checkpoint.temp_path(out, step)
    for rel, data in (files or {"model.safetensors": f"weights {step}".encode()}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return checkpoint.commit(tmp, dict(state, global_step=step))


def test_commit_seals_a_manifest_of_every_file_but_the_state_file(tmp_path):
    out = tmp_path / "run"
    final = saved(out, 3, {"model.safetensors": b"abc", "sub/tok.json": b"{}"}, evertrain={"k": 1})
    assert final == out / "checkpoint-3" and not checkpoint.temp_path(out, 3).exists()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["format"] == checkpoint.FORMAT and state["evertrain"] == {"k": 1} and state["global_step"] == 3
    assert state["manifest"] == {
        "model.safetensors": {"size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "sub/tok.json": {"size": 2, "sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}}
    assert checkpoint.read_state(final) == state and checkpoint.verify(checkpoint.candidates(out)[0]) is None


def test_committing_a_step_again_replaces_it_whole(tmp_path):
    out = tmp_path / "run"
    saved(out, 2, {"model.safetensors": b"old", "only-old.bin": b"x"})
    saved(out, 2, {"model.safetensors": b"older"})
    (out / "checkpoint-2").rename(out / ".old-checkpoint-2")  # a crash left the one before aside, the next in place:
    saved(out, 2, {"model.safetensors": b"old", "only-old.bin": b"x"})  # (as after the swap's rename)
    final = saved(out, 2, {"model.safetensors": b"new!"})
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "trainer_state.json"]
    assert (final / "model.safetensors").read_bytes() == b"new!"


def test_a_failure_inside_commit_leaves_the_old_checkpoint_or_the_new_one(tmp_path, monkeypatch):
    from evertrain import faults

    out = tmp_path / "run"
    saved(out, 4, {"model.safetensors": b"old"})
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("EVERTRAIN_FAULT", "enospc:old-swap")  # the old one moved aside, the new one not in place
    with pytest.raises(OSError, match="EVERTRAIN_FAULT at old-swap"):
        saved(out, 4, {"model.safetensors": b"new"})
    assert not (out / "checkpoint-4").exists()
    assert checkpoint.newest_complete(out) is None  # a reader renames nothing: it is a commit between its renames
    assert (out / ".old-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    checkpoint.remove_debris(out)  # the folder's lock holder, at start: the one left by the crash is put back
    found = checkpoint.newest_complete(out)
    assert found.step == 4 and (found.path / "model.safetensors").read_bytes() == b"old"
    monkeypatch.setenv("EVERTRAIN_FAULT", "enospc:after-rename")  # in place, the folder not yet fsync'd
    with pytest.raises(OSError, match="EVERTRAIN_FAULT at after-rename"):
        saved(out, 5, {"model.safetensors": b"five"})
    assert checkpoint.newest_complete(out).step == 5


def test_commit_syncs_every_file_and_folder_to_disk_before_it_counts(tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    tmp = checkpoint.temp_path(out, 1)
    (tmp / "sub").mkdir(parents=True)
    for rel in ("model.safetensors", "sub/tok.json"):
        (tmp / rel).write_bytes(b"x")
    opened, synced, real_open, real_fsync = {}, [], os.open, os.fsync

    def tracked_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        opened[fd] = os.path.relpath(path, tmp_path)
        return fd

    def tracked_fsync(fd):
        synced.append((opened.get(fd), (tmp / "trainer_state.json").exists(), (out / "checkpoint-1").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", tracked_open)
    monkeypatch.setattr(os, "fsync", tracked_fsync)
    checkpoint.commit(tmp, {"global_step": 1})
    before_rename = {path for path, _, renamed in synced if not renamed}
    assert {f"run/.tmp-checkpoint-1/{rel}" for rel in ("model.safetensors", "sub/tok.json", "trainer_state.json",
                                                         "sub")} | {"run/.tmp-checkpoint-1"} <= before_rename
    assert all(state_written for _path, state_written, renamed in synced if not renamed)  # the manifest is in
    assert synced[-1] == ("run", False, True)  # and the parent folder, after the rename


def test_read_state_refuses_what_is_not_a_sealed_state(tmp_path):
    for name, text in [("missing", None), ("torn", '{"global_step": 3, "mani'), ("a-list", "[1, 2]"),
                       ("no-step", '{"manifest": {}}'), ("str-step", '{"global_step": "3", "manifest": {}}'),
                       ("no-manifest", '{"global_step": 3}')]:
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "trainer_state.json").write_text(text)
        assert checkpoint.read_state(tmp_path / name) is None, name
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "trainer_state.json").write_text('{"global_step": 0, "manifest": {}}')
    assert checkpoint.read_state(tmp_path / "ok") == {"global_step": 0, "manifest": {}}


def test_verify_names_what_is_wrong(tmp_path):
    out = tmp_path / "run"
    path = saved(out, 1, {"a.bin": b"1234", "b.bin": b"5678"})
    ckpt = checkpoint.candidates(out)[0]
    (path / "b.bin").write_bytes(b"5679")  # same size, other bytes
    assert checkpoint.verify(ckpt) == "b.bin does not match its sha256"
    assert checkpoint.verify(ckpt, full=False) is None
    (path / "b.bin").write_bytes(b"56")
    assert checkpoint.verify(ckpt, full=False) == "b.bin has 2 bytes, expected 4"
    (path / "a.bin").unlink()
    assert checkpoint.verify(ckpt) == "a.bin is missing"
    (path / "a.bin").mkdir()  # a folder where the file should be is not the file
    assert checkpoint.verify(ckpt) == "a.bin is missing"


def test_candidates_are_checkpoint_folders_with_a_state_newest_step_first(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.candidates(out) == [] and not checkpoint.present(out)
    for step in (9, 10, 2):
        saved(out, step)
    (out / "checkpoint-10").rename(out / "checkpoint-1")  # the name says 1, the state says 10
    (out / "checkpoint-50").mkdir()                       # no state file
    (out / "checkpoint-60").write_text("a file")
    shutil.copytree(out / "checkpoint-9", out / "old-checkpoint-99")
    found = checkpoint.candidates(out)
    assert [(c.step, c.name) for c in found] == [(10, "checkpoint-1"), (9, "checkpoint-9"), (2, "checkpoint-2")]
    assert found[0].state == checkpoint.read_state(out / "checkpoint-1")
    assert checkpoint.unreadable(out) == [(out / "checkpoint-50", "trainer_state.json is missing or does not parse")]
    assert checkpoint.present(out)
    only_broken = tmp_path / "broken"
    (only_broken / "checkpoint-3").mkdir(parents=True)
    (only_broken / "notes").mkdir()
    assert checkpoint.present(only_broken) and checkpoint.candidates(only_broken) == []
    (tmp_path / "none" / "checkpoints").mkdir(parents=True)
    (tmp_path / "none" / "checkpoint-5").write_text("a file, not a checkpoint")
    assert not checkpoint.present(tmp_path / "none") and checkpoint.unreadable(tmp_path / "none") == []
    assert checkpoint.unreadable(tmp_path / "nowhere") == []


def test_at_step_finds_only_a_checkpoint_of_that_step_that_verifies(tmp_path):
    out = tmp_path / "run"
    for step in (4, 8):
        saved(out, step)
    assert checkpoint.at_step(out, 4).path == out / "checkpoint-4" and checkpoint.at_step(out, 4).step == 4
    assert checkpoint.at_step(out, 5) is None and checkpoint.at_step(tmp_path / "nowhere", 4) is None
    (out / "checkpoint-8").rename(out / "checkpoint-7")  # the name says 7, the state says 8
    assert checkpoint.at_step(out, 7) is None and checkpoint.at_step(out, 8) is None
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"weights 5")  # same size, other bytes
    assert checkpoint.at_step(out, 4, full=False) is not None and checkpoint.at_step(out, 4) is None
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"torn")
    assert checkpoint.at_step(out, 4, full=False) is None


def test_discard_after_deletes_every_checkpoint_beyond_the_step_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    for step in (2, 4, 6, 9):
        saved(out, step)
    (out / "checkpoint-6").rename(out / "checkpoint-1")  # found by its state's step, not its name
    checkpoint.temp_path(out, 9).mkdir()
    (checkpoint.temp_path(out, 9) / "model.safetensors").write_bytes(b"torn")  # a crashed write's debris
    assert checkpoint.discard_after(out, 4) == [out / "checkpoint-9", out / "checkpoint-1"]  # newest first
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint.discard_after(out, 4) == [] and checkpoint.discard_after(out, 0) != []
    assert list(out.iterdir()) == []


def test_a_discarded_checkpoint_the_disk_fails_to_delete_is_never_resumed_from(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for step in (2, 4, 6):
        saved(out, step)
    real = shutil.rmtree

    def stuck(path, ignore_errors=False, **kw):  # a disk that deletes nothing
        if not ignore_errors:
            raise OSError(f"cannot delete {path}")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", stuck)
    assert checkpoint.discard_after(out, 2) == [out / "checkpoint-6", out / "checkpoint-4"]
    assert [c.step for c in checkpoint.candidates(out)] == [2] and checkpoint.newest_complete(out).step == 2
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    checkpoint.remove_debris(out)  # what is left is debris
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


def test_newest_complete_passes_over_broken_newer_ones_and_says_so(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2, 3):
        saved(out, step)
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"torn")
    (out / "checkpoint-4").mkdir()
    said = []
    found = checkpoint.newest_complete(out, warn=said.append)
    assert found.step == 2 and found.path == out / "checkpoint-2"
    assert said == [f"evertrain: skipping {out / 'checkpoint-3'}: model.safetensors has 4 bytes, expected 9",
                    f"evertrain: skipping {out / 'checkpoint-4'}: trainer_state.json is missing or does not parse"]
    for damaged in ("skip", "refuse", "set-aside"):  # a good one found: nothing refused, nothing moved
        assert checkpoint.newest_complete(out, warn=said.append, damaged=damaged).step == 2
    assert (out / "checkpoint-3").is_dir() and not (out / "damaged").exists()
    assert checkpoint.newest_complete(tmp_path / "empty", damaged="refuse") is None


def test_when_no_checkpoint_verifies_newest_complete_refuses_or_sets_them_aside(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2):
        saved(out, step)
        (out / f"checkpoint-{step}" / "model.safetensors").unlink()
    (out / "checkpoint-7").mkdir()
    said = []
    assert checkpoint.newest_complete(out, warn=said.append) is None
    assert len(said) == 3 and all(s.startswith("evertrain: skipping ") for s in said)
    with pytest.raises(checkpoint.NoUsableCheckpoint) as refused:
        checkpoint.newest_complete(out, warn=said.append, damaged="refuse")
    problems = [(out / "checkpoint-2", "model.safetensors is missing"),
                (out / "checkpoint-1", "model.safetensors is missing"),
                (out / "checkpoint-7", "trainer_state.json is missing or does not parse")]
    assert refused.value.problems == problems
    assert str(refused.value) == (
        f"no checkpoint in {out} loads; nothing was trained or changed:"
        f"\n  {out}/checkpoint-2: model.safetensors is missing\n  {out}/checkpoint-1: model.safetensors is missing"
        f"\n  {out}/checkpoint-7: trainer_state.json is missing or does not parse\n"
        "Restore a checkpoint, or start the run again from the base model with --from-base "
        f"(the damaged checkpoints are then moved to {out}/damaged/)")
    assert isinstance(refused.value, checkpoint.ConfigError)
    said.clear()
    assert checkpoint.newest_complete(out, warn=said.append, damaged="set-aside") is None
    assert sorted(p.name for p in (out / "damaged").iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-7"]
    assert said[0] == (f"evertrain: moved {out / 'checkpoint-2'} to {out / 'damaged' / 'checkpoint-2'} "
                       "(model.safetensors is missing)") and len(said) == 3
    assert not checkpoint.present(out)


def test_resume_policy():
    assert checkpoint.resume_policy(from_base=False, main_process=True) == "refuse"
    assert checkpoint.resume_policy(from_base=False, main_process=False) == "refuse"
    assert checkpoint.resume_policy(from_base=True, main_process=True) == "set-aside"
    assert checkpoint.resume_policy(from_base=True, main_process=False) == "skip"


def test_set_aside_never_overwrites_what_damaged_holds(tmp_path):
    for n in range(3):
        (tmp_path / "checkpoint-4").mkdir()
        (tmp_path / "checkpoint-4" / "n").write_text(str(n))
        assert checkpoint.set_aside(tmp_path / "checkpoint-4") == tmp_path / "damaged" / ("checkpoint-4" + ".1" * 0
                                                                                          + (f".{n}" if n else ""))
    assert [(tmp_path / "damaged" / name / "n").read_text() for name in ("checkpoint-4", "checkpoint-4.1",
                                                                         "checkpoint-4.2")] == ["0", "1", "2"]


def test_a_swap_cut_by_a_crash_is_put_back_and_debris_removed(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.remove_debris(out) == [] and checkpoint.recover_swap(out) is None
    saved(out, 5)
    saved(out, 6)
    (out / "checkpoint-5").rename(out / ".old-checkpoint-5")   # moved aside, nothing in its place: the only copy
    shutil.copytree(out / "checkpoint-6", out / ".old-checkpoint-6")  # the new one is in place: stale
    (out / ".old-checkpoint-8").mkdir()                            # aside but not a checkpoint: not put back
    saved(out, 7)
    shutil.copytree(out / "checkpoint-7", checkpoint.temp_path(out, 7))
    (out / ".status.json.123.tmp").write_text("{")
    (out / ".notes.tmp").mkdir()  # a folder, not a temp file of write_text_atomic
    (out / ".keep").write_text("not a temp")
    removed = checkpoint.remove_debris(out)
    assert sorted(p.name for p in removed) == [".old-checkpoint-6", ".status.json.123.tmp", ".tmp-checkpoint-7"]
    assert all(not p.exists() for p in removed)
    assert sorted(p.name for p in out.iterdir()) == [".keep", ".notes.tmp", ".old-checkpoint-8", "checkpoint-5",
                                                     "checkpoint-6", "checkpoint-7"]
    assert checkpoint.verify(checkpoint.candidates(out)[-1]) is None
    (out / "checkpoint-6").rename(out / ".old-checkpoint-6")  # a commit of step 6 again, between its renames
    assert checkpoint.newest_complete(out).step == 7 and not (out / "checkpoint-6").exists()  # a reader renames none


def test_debris_that_cannot_be_removed_or_is_already_gone_is_no_error(tmp_path, monkeypatch):
    import pathlib

    (tmp_path / ".tmp-checkpoint-3").write_text("a file where a temporary folder should be")
    (tmp_path / ".a.json.7.tmp").write_text("{")
    real_is_file = pathlib.Path.is_file

    def is_file_then_gone(path):  # its writer renamed it into place just after the check
        found = real_is_file(path)
        if path.name == ".a.json.7.tmp":
            path.unlink()
        return found

    monkeypatch.setattr(pathlib.Path, "is_file", is_file_then_gone)
    assert sorted(p.name for p in checkpoint.remove_debris(tmp_path)) == [".a.json.7.tmp", ".tmp-checkpoint-3"]


def test_prune_keeps_the_newest_the_pinned_and_the_budget_oldest_first(tmp_path):
    out = tmp_path / "run"
    for step in range(1, 7):
        saved(out, step, {"w.bin": b"x" * 100, "sub/t.bin": b"y" * step})
    assert checkpoint.folder_size(out / "checkpoint-3") == 103 + (out / "checkpoint-3" / "trainer_state.json").stat().st_size
    checkpoint.temp_path(out, 7).mkdir()
    steps = lambda: sorted(c.step for c in checkpoint.candidates(out))  # noqa: E731
    assert checkpoint.prune(out, keep=6) == [] and steps() == [1, 2, 3, 4, 5, 6]
    assert not checkpoint.temp_path(out, 7).exists()
    assert checkpoint.prune(out, keep=5) == [out / "checkpoint-1"] and steps() == [2, 3, 4, 5, 6]
    # pinned ones count toward `keep`; the oldest unpinned goes first
    assert checkpoint.prune(out, keep=3, protected={"checkpoint-2"}) == [out / "checkpoint-3", out / "checkpoint-4"]
    assert steps() == [2, 5, 6]
    # the newest complete one is never deleted, even when a newer (broken) one is on disk
    assert checkpoint.prune(out, keep=2, newest=out / "checkpoint-5") == [out / "checkpoint-2"] and steps() == [5, 6]
    assert checkpoint.prune(out, keep=1, newest=out / "checkpoint-5") == [out / "checkpoint-6"] and steps() == [5]
    saved(out, 6, {"w.bin": b"x" * 100})
    assert checkpoint.prune(out, keep=0) == [out / "checkpoint-5"] and steps() == [6]
    for step in (7, 8, 9):
        saved(out, step, {"w.bin": b"x" * 100})
    size = checkpoint.folder_size(out / "checkpoint-7")
    # a budget of three checkpoints' bytes holds three, whatever `keep` allows
    assert checkpoint.prune(out, keep=10, budget_bytes=3 * size + 10) == [out / "checkpoint-6"] and steps() == [7, 8, 9]
    assert checkpoint.prune(out, keep=10, budget_bytes=3 * size) == [] and steps() == [7, 8, 9]
    saved(out, 10, {"w.bin": b"x" * 100})
    assert checkpoint.prune(out, keep=10, budget_bytes=2 * size + 10) == [out / "checkpoint-7", out / "checkpoint-8"]
    assert steps() == [9, 10]
    assert checkpoint.prune(out, keep=10, budget_bytes=1) == [out / "checkpoint-9"] and steps() == [10]
    assert checkpoint.prune(tmp_path / "nothing", keep=1) == []


def test_prune_beside_another_process_pruning_the_same_folder(tmp_path, monkeypatch):
    """The ranks of a launch prune the same folder: what another one just deleted is no error."""
    out = tmp_path / "run"
    for step in (1, 2, 3):
        saved(out, step)
    real = checkpoint.candidates

    def listed_then_deleted(folder):
        found = real(folder)
        shutil.rmtree(found[-1].path)
        return found

    monkeypatch.setattr(checkpoint, "candidates", listed_then_deleted)
    (out / ".tmp-checkpoint-4").write_text("a file where a temporary folder should be: passed over, no error")
    assert checkpoint.prune(out, keep=1) == [out / "checkpoint-1", out / "checkpoint-2"]
    assert sorted(p.name for p in out.iterdir()) == [".tmp-checkpoint-4", "checkpoint-3"]


def test_write_text_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "status.json"
    files.write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and "\n" in path.read_text()
    files.write_json_atomic(path, {"a": [1, 2]}, indent=None)
    assert path.read_text() == '{"a": [1, 2]}'
    real_replace = os.replace

    def crash_before_rename(src, dst):  # what a crash right here leaves is debris that remove_debris knows
        assert checkpoint.remove_debris(tmp_path) == [src] and not os.path.exists(src)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        files.write_text_atomic(path, "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_text() == '{"a": [1, 2]}' and sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "open", full_disk, raising=False)  # full before the temp even exists
    with pytest.raises(OSError) as err:
        files.write_text_atomic(path, "new")
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", full_disk)  # full after the temp was created: it is removed
    with pytest.raises(OSError):
        files.write_text_atomic(path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_read_records_passes_over_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert files.read_records(path) == []
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n\n{"step": 4')
    assert files.read_records(path) == [{"step": 1}, {"step": 3}]
    assert files.read_records(str(path)) == [{"step": 1}, {"step": 3}]
