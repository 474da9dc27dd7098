"""Taking the model out: `evertrain export` (full, LoRA, merged, GGUF), `evertrain lineage`, `evertrain chat`.

    pytest -q tests/test_export.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, text_rows, write_jsonl
from dashboard_run import trained_workspace

from evertrain import exits
from evertrain.train import checkpoint
from evertrain.observe.evals import forgetting_matrix, read_evals
from evertrain.runs import open_run
from evertrain.train.state import TrainingProgress

IDS = [[256, 84, 82, 68, 81, 198, 39, 68, 10, 11]]


def train_two(tmp_path_factory, tiny_model, name, *extra) -> Path:
    root = tmp_path_factory.mktemp(name)
    qa = write_jsonl(root / "qa.jsonl", [{"prompt": f"Question {i}?", "completion": f" Answer {i}."}
                                         for i in range(20)])
    text = write_jsonl(root / "notes.jsonl", text_rows(20))
    for f in (qa, text):
        assert cli("train", "--dataset", f, "--output-dir", root / "run", "--model", tiny_model, "--batch-size", 4,
                   "--held-out-fraction", 0.2, "--warmup-steps", 2, "--learning-rate", 3e-3, "--save-steps", 2,
                   "--keep-checkpoints", 5, *extra) == exits.OK
    return root / "run"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model):
    return train_two(tmp_path_factory, tiny_model, "full")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    return train_two(tmp_path_factory, tiny_model, "lora", "--lora", "--lora-r", 4, "--lora-alpha", 8)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def test_full_export_is_a_clean_folder_that_loads_without_evertrain(full_run, tmp_path, capsys):
    newest = checkpoint.newest_complete(full_run)
    out = tmp_path / "model"
    assert cli("export", full_run, out) == exits.OK
    assert f"exported {newest.name} (global step {newest.step})" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "evertrain_lineage.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.json", "trainer_state.json", "evertrain_config.json"}
    assert not any(n.startswith("rng_state") for n in names)
    assert not list(tmp_path.glob(".model.export-*")), "the temporary folder was left behind"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True

    # A fresh interpreter that never imports evertrain: the folder is all it needs.
    code = ("import json, sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()\n"
            f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"l = m(torch.tensor({IDS})).logits[0, -1].tolist()\n"
            "p = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False, add_generation_prompt=True)\n"
            "print(json.dumps({'logits': l, 'prompt': p, 'evertrain': 'evertrain' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["evertrain"] is False
    assert got["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    torch.testing.assert_close(torch.tensor(got["logits"]), logits(load(newest.path))[0, -1])


def test_export_refuses_a_used_folder_a_missing_step_and_a_damaged_checkpoint(full_run, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert cli("export", full_run, out) == exits.BAD_INPUT
    assert "pass --force" in capsys.readouterr().err and (out / "mine.txt").exists()
    # --force replaces it; a small --max-shard-size splits the weights, and they load as one model again.
    assert cli("export", full_run, out, "--force", "--max-shard-size", "40KB") == exits.OK
    assert not (out / "mine.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    torch.testing.assert_close(logits(load(out)), logits(load(checkpoint.newest_complete(full_run).path)))

    assert cli("export", full_run, tmp_path / "x", "--step", 999) == exits.BAD_INPUT
    assert "no checkpoint of global step 999" in capsys.readouterr().err

    # A copy of the run whose oldest checkpoint lost bytes: asked for by step, it is refused, named.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    oldest = checkpoint.candidates(copy)[-1]
    weights = oldest.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert cli("export", copy, tmp_path / "y", "--step", oldest.step) == exits.BAD_INPUT
    err = capsys.readouterr().err
    assert f"{oldest.path}: incomplete or damaged checkpoint (model.safetensors has" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "y").exists()


def test_export_beside_a_training_process_takes_the_newest_complete_checkpoint(full_run, tmp_path, capsys):
    """What a daemon leaves while it trains: its lock held, a checkpoint half written, a newer one not complete."""
    import shutil

    from evertrain import locks

    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    newest = checkpoint.newest_complete(copy)
    lock = locks.hold(copy / locks.LOCK_NAME, "train", "wait")
    try:
        (copy / ".tmp-checkpoint-99").mkdir()
        (copy / ".tmp-checkpoint-99" / "model.safetensors").write_bytes(b"half")
        shutil.copytree(newest.path, copy / "checkpoint-100")
        state = json.loads((copy / "checkpoint-100" / checkpoint.STATE_FILE).read_text())
        (copy / "checkpoint-100" / checkpoint.STATE_FILE).write_text(json.dumps(dict(state, global_step=100)))
        (copy / "checkpoint-100" / "model.safetensors").unlink()
        assert cli("export", copy, tmp_path / "model") == exits.OK
    finally:
        os.close(lock)
    captured = capsys.readouterr()
    assert f"exported {newest.name} (global step {newest.step})" in captured.out
    assert "checkpoint-100: model.safetensors is missing" in captured.err
    assert json.loads((tmp_path / "model" / "evertrain_lineage.json").read_text())["global_step"] == newest.step


def test_lora_export_is_portable_and_merge_equals_the_adapter(lora_run, tiny_model, tmp_path, capsys):
    from peft import PeftModel

    assert cli("export", lora_run, tmp_path / "a") == exits.BAD_INPUT
    assert "pass --base-id" in capsys.readouterr().err and not (tmp_path / "a").exists()

    assert cli("export", lora_run, tmp_path / "a", "--base-id", "someone/tiny-llama") == exits.OK
    adapter = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "someone/tiny-llama" and adapter["r"] == 4
    assert not (tmp_path / "a" / "model.safetensors").exists()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model: someone/tiny-llama" in card
    assert f"Base model: `someone/tiny-llama` (trained from its copy in the local folder `{tiny_model}`)" in card
    assert "Q4_1" not in card  # only a run on the embedded model began from weights other than its base's

    assert cli("export", lora_run, tmp_path / "m", "--merge", "--base-id", "someone/tiny-llama") == exits.OK
    merged = load(tmp_path / "m")
    assert not any("lora" in k for k in merged.state_dict())
    applied = PeftModel.from_pretrained(load(tiny_model), tmp_path / "a").eval()
    base = logits(load(tiny_model))
    assert not torch.allclose(logits(applied), base, atol=1e-4), "the adapter changed nothing: a useless test"
    torch.testing.assert_close(logits(merged), logits(applied), atol=1e-5, rtol=1e-5)
    assert merged.config.dtype == load(tiny_model).config.dtype


def test_merge_of_a_local_base_needs_no_hub_id_and_the_card_names_the_folder(lora_run, tiny_model, tmp_path):
    from peft import PeftModel

    out = tmp_path / "m"
    assert cli("export", lora_run, out, "--merge") == exits.OK  # a merged model stands alone: no --base-id
    assert not (out / "adapter_config.json").exists()
    newest = checkpoint.newest_complete(lora_run)
    applied = PeftModel.from_pretrained(load(tiny_model), newest.path).eval()
    torch.testing.assert_close(logits(load(out)), logits(applied), atol=1e-5, rtol=1e-5)
    facts = json.loads((out / "evertrain_lineage.json").read_text())
    assert facts["base_model"] is None and facts["base_model_local_folder"] == str(tiny_model)
    assert facts["export"]["kind"] == "merged"
    card = (out / "README.md").read_text()
    assert "base_model:" not in card  # the hub's front matter takes hub ids only
    assert f"Base model: the local folder `{tiny_model}`" in card and "no hub id is known" in card


@pytest.mark.parametrize("quant,tolerance", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_reads_back_with_the_same_logits(full_run, tmp_path, quant, tolerance):
    from transformers import AutoTokenizer

    out = tmp_path / "model"
    assert cli("export", full_run, out, "--gguf", "--quant", quant) == exits.OK
    name = f"model-{quant}.gguf"
    assert json.loads((out / "evertrain_lineage.json").read_text())["export"]["gguf"] == name
    exported = logits(load(out))
    back = logits(load(out, gguf_file=name))
    assert (back - exported).abs().max() < tolerance
    assert (back - exported).abs().max() > 0 or quant == "f32"  # it really went through the file's types
    text = "<|im_start|>user\nHello wörld<|im_end|>"
    tok, tok_back = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out, gguf_file=name)
    assert tok_back(text).input_ids == tok(text).input_ids
    import gguf

    # transformers' reader prefers the folder's own template; llama.cpp reads the file's.
    fields = gguf.GGUFReader(out / name).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["general.architecture"].contents() == "llama"


def test_gguf_of_a_lora_run_needs_merge(lora_run, tmp_path, capsys):
    assert cli("export", lora_run, tmp_path / "g", "--gguf", "--base-id", "a/b") == exits.BAD_INPUT
    assert "add --merge" in capsys.readouterr().err


def test_card_and_lineage_facts_are_the_checkpoints(full_run, tmp_path, capsys):
    newest = checkpoint.newest_complete(full_run)
    progress = TrainingProgress.from_state_dict(newest.state["evertrain"])
    assert cli("lineage", full_run, "--json") == exits.OK
    facts = json.loads(capsys.readouterr().out)
    assert facts["global_step"] == newest.step == progress.global_step
    assert [(f["name"], f["sha256"], f["steps"], f["tokens"], f["examples"]) for f in facts["files"]] == [
        (f.name, f.sha256, f.steps, f.tokens, f.examples) for f in progress.files]
    assert facts["tokens_seen"] == progress.tokens_seen
    metrics = [json.loads(line) for line in (full_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert facts["final_train_loss"] == metrics[-1]["loss"] and metrics[-1]["step"] == newest.step
    assert facts["forgetting_matrix"] == forgetting_matrix(read_evals(open_run(full_run)))
    assert facts["training"]["kind"] == "full" and facts["learning_rate"]["peak"] == 3e-3

    # An older checkpoint's lineage stops at its step: one file, and only the evaluations up to then.
    older = next(c for c in checkpoint.candidates(full_run)
                 if len(c.state["evertrain"]["files"]) == 1 and not c.state["evertrain"]["cursors"])
    assert cli("lineage", full_run, "--step", older.step, "--json") == exits.OK
    old = json.loads(capsys.readouterr().out)
    assert [f["name"] for f in old["files"]] == ["qa.jsonl"]
    assert [r["after_file_name"] for r in old["forgetting_matrix"]["rows"]] == ["qa.jsonl"]

    out = tmp_path / "model"
    assert cli("export", full_run, out) == exits.OK
    card = (out / "README.md").read_text()
    saved = json.loads((out / "evertrain_lineage.json").read_text())
    assert saved["export"]["command"] == f"evertrain export {full_run} {out}"
    assert f"evertrain export {full_run} {out}" in card
    for f in progress.files:
        assert f"| {f.name} | `{f.sha256}` | done | {f.examples} | {f.tokens} | {f.steps} |" in card
    assert "## Forgetting matrix" in card and "base_model:" not in card  # a local base is no hub id


def test_lineage_of_a_workspace_matches_its_ledger(tmp_path_factory, tiny_model, capsys):
    from evertrain.daemon import workspace
    from evertrain.daemon.ledger import Ledger

    ws = trained_workspace(tmp_path_factory, tiny_model)
    capsys.readouterr()
    assert cli("lineage", ws, "--json") == exits.OK
    facts = json.loads(capsys.readouterr().out)
    ledger = Ledger.open(workspace.load(ws)[0])
    try:
        rows = [r for r in ledger.files() if r["state"] == "done"]
    finally:
        ledger.close()
    assert len(rows) == 2
    assert [(f["sha256"], f["steps"], f["first_step"], f["last_step"]) for f in facts["files"]] == [
        (r["sha256"], r["steps_trained"], r["first_step"], r["last_step"]) for r in rows]


def greedy(model, tokenizer, text: str, n: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_prompt_answers_as_the_checkpoint_and_compares_with_base(full_run, tiny_model, capsys):
    from transformers import AutoTokenizer

    newest = checkpoint.newest_complete(full_run)
    tok = AutoTokenizer.from_pretrained(newest.path)
    want = greedy(load(newest.path), tok, "Question 3?", 12)
    base = greedy(load(tiny_model), tok, "Question 3?", 12)
    assert want != base, "the checkpoint answers like the base: the comparison would prove nothing"

    assert cli("chat", full_run, "--prompt", "Question 3?", "--max-new-tokens", 12) == exits.OK
    out = capsys.readouterr().out
    assert f"talking to {newest.name} (step {newest.step})" in out and "max_new_tokens 12" in out
    assert out.endswith(want + "\n")

    assert cli("chat", full_run, "--prompt", "Question 3?", "--max-new-tokens", 12, "--compare", "base") == exits.OK
    out = capsys.readouterr().out
    assert f"[{newest.name} (step {newest.step})]\n{want}\n[base (" in out and out.endswith(base + "\n")

    assert cli("chat", full_run, "--prompt", "x", "--step", 999) == exits.BAD_INPUT
    assert cli("chat", full_run, "--prompt", "x", "--compare", "yesterday") == exits.BAD_INPUT
    assert "'yesterday'" in capsys.readouterr().err


def test_interactive_chat_from_piped_stdin(full_run):
    first = checkpoint.candidates(full_run)[-1]
    lines = ["Question 1?", "/set temperature 0.7", "/set top_k 3", "/settings", f"/step {first.step}",
             "/reset", "Question 2?", "/quit"]
    done = subprocess.run([sys.executable, "-m", "evertrain", "chat", str(full_run), "--max-new-tokens", "4"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "temperature 0.7, top_p 1, max_new_tokens 4" in out
    assert "no setting 'top_k'" in out
    assert f"now talking to {first.name} (step {first.step})" in out
    assert "conversation forgotten" in out
    assert out.count("you> ") == 8  # every line was read, /quit last


def test_chat_in_a_terminal(full_run, tmp_path):
    """The interactive path in a real terminal (tmux): the prompt, a streamed answer, /settings, /quit."""
    import shutil
    import time

    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is required under CI")
        pytest.skip("no tmux to drive a terminal")
    newest = checkpoint.newest_complete(full_run)
    session = f"evertrain-chat-{os.getpid()}"
    socket = ["-S", str(tmp_path / "tmux.sock")]
    cmd = f"{sys.executable} -m evertrain chat {full_run} --max-new-tokens 6; echo EXITED $?; sleep 30"
    subprocess.run(["tmux", *socket, "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", *socket, "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def wait_for(text: str, times: int = 1) -> str:
        deadline = time.time() + 90
        while time.time() < deadline:
            if (shown := screen()).count(text) >= times:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared {times} time(s):\n{screen()}")

    try:
        wait_for("you>")  # tmux drops the prompt's trailing space
        assert f"talking to {newest.name} (step {newest.step})" in screen()
        subprocess.run(["tmux", *socket, "send-keys", "-t", session, "Question 1?", "Enter"], check=True)
        shown = wait_for("you>", 2)  # the answer came, and the next prompt after it
        assert "you> Question 1?\n" in shown
        for keys in ("/settings", "/quit"):
            subprocess.run(["tmux", *socket, "send-keys", "-t", session, keys, "Enter"], check=True)
        shown = wait_for("EXITED")
        assert "max_new_tokens 6" in shown and "EXITED 0" in shown
    finally:
        subprocess.run(["tmux", *socket, "kill-server"], capture_output=True)
