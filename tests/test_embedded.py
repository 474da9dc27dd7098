"""The embedded default model end to end: GGUF -> safetensors cache -> `evertrain train` without --model.

    pytest -q tests/test_embedded.py      # about a minute on 2 CPU cores, most of it the one-time conversion
"""

import json

import pytest
import torch
from safetensors import safe_open

from evertrain import cli, exits, models
from evertrain.train import checkpoint


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    # A fresh cache, so the conversion itself is tested even where ~/.cache already holds it.
    return tmp_path_factory.mktemp("evertrain-cache")


def test_default_model_trains_and_checkpoint_loads(embedded_cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("EVERTRAIN_CACHE", str(embedded_cache))
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]})
                              for q, a in [("Capital of Veltrana?", "Quorra."), ("Moons of Veltrana?", "Seven."),
                                           ("Sky of Veltrana?", "Green.")]) + "\n")
    out = tmp_path / "run"

    # 3 examples, one per row, 2 rows per step: 2 optimizer steps.
    code = cli.main(["train", "--dataset", str(data), "--output-dir", str(out), "--no-packing", "--batch-size", "2",
                     "--max-length", "64", "--learning-rate", "1e-4", "--warmup-steps", "0"])
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
