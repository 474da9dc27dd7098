"""The token store: built once, reused by every later load, resume and run; a damaged or partial one is rebuilt,
never trained from; pruning keeps what is still needed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import cli, text_rows, write_jsonl

from evertrain.train import checkpoint
from evertrain.config import TrainConfig
from evertrain.data import load_file
from evertrain.data import prepare as prepare_module
from evertrain.data import store as stores


@pytest.fixture
def builds(monkeypatch):
    """The files whose store was built (not found on disk) in this test."""
    seen = []
    real = prepare_module.build_store

    def build_store(path, *args, **kwargs):
        seen.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "build_store", build_store)
    return seen


def examples(data):
    return [(e.line, e.input_ids, e.labels) for e in data.examples] + [(e.line, e.input_ids, e.labels)
                                                                        for e in data.held_out]


def test_a_store_is_built_once_and_reused(tmp_path, tok, tiny_model, builds):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(40))
    cfg = TrainConfig(model=str(tiny_model), held_out_fraction=0.1)
    first = load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    again = load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    assert builds == ["a.jsonl"] and examples(again) == examples(first) and len(first.held_out) == 4
    assert list(again.rows) == list(first.rows) and again.tokens == first.tokens
    # Anything that changes tokens is another store; the same content under another name is the same one.
    load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=64), store_dir=tmp_path / "tokens")
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes(f.read_bytes())
    load_file(copy, tok, cfg, store_dir=tmp_path / "tokens")
    assert builds == ["a.jsonl", "a.jsonl"]
    assert len([p for p in (tmp_path / "tokens").iterdir()]) == 2


def test_a_store_from_before_windows_keeps_its_key_and_reads_as_whole_examples(tmp_path, tok, tiny_model, builds):
    import hashlib

    f = write_jsonl(tmp_path / "a.jsonl", text_rows(20))
    cfg = TrainConfig(model=str(tiny_model), long_text="truncate")   # a run from before windows truncates
    first = load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    (store,) = (tmp_path / "tokens").iterdir()
    settings = json.dumps([2, first.sha256, stores.tokenizer_fingerprint(tok), cfg.max_length, cfg.columns])
    assert store.name == f"{first.sha256[:16]}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"  # as before
    meta = json.loads((store / "meta.json").read_text())   # as the version before windows wrote it: no parts
    (store / "parts.npy").unlink()
    del meta["files"]["parts.npy"]
    (store / "meta.json").write_text(json.dumps(meta))
    again = load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    assert builds == ["a.jsonl"] and examples(again) == examples(first)
    assert {e.part for e in again.examples} == {None} and again.records == 19 and len(again.held_out) == 1


@pytest.mark.parametrize("damage", ["flipped_token", "truncated_ids", "bad_meta", "missing_index"])
def test_a_damaged_store_is_rebuilt_never_trained_from(tmp_path, tok, tiny_model, builds, damage, capsys):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(30))
    cfg = TrainConfig(model=str(tiny_model))
    good = examples(load_file(f, tok, cfg, store_dir=tmp_path / "tokens"))
    (store,) = (tmp_path / "tokens").iterdir()
    if damage == "flipped_token":
        raw = bytearray((store / "ids.bin").read_bytes())
        raw[20] ^= 0x01
        (store / "ids.bin").write_bytes(bytes(raw))
    elif damage == "truncated_ids":
        with open(store / "ids.bin", "r+b") as fh:
            fh.truncate(os.path.getsize(store / "ids.bin") // 2)
    elif damage == "bad_meta":
        (store / "meta.json").write_text("{not json")
    else:
        (store / "offsets.npy").unlink()
    again = load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    assert builds == ["a.jsonl", "a.jsonl"] and examples(again) == good
    assert "damaged" in capsys.readouterr().out


def test_a_partial_store_is_never_taken_for_a_complete_one(tmp_path, tok, tiny_model, builds, monkeypatch):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(30))
    cfg = TrainConfig(model=str(tiny_model), held_out_fraction=0.0)  # all 30 are examples to train

    def crash(self, meta):
        raise KeyboardInterrupt("killed while committing")

    with monkeypatch.context() as m:
        m.setattr(stores.StoreWriter, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    assert not list((tmp_path / "tokens").iterdir())  # the temporary folder went with the failure
    # A temporary folder left by a process that died (kill -9) is neither used nor kept.
    debris = tmp_path / "tokens" / ".tmp-0000000000000000-0000000000000000-999999999"
    debris.mkdir()
    (debris / "ids.bin").write_bytes(b"\0" * 16)
    data = load_file(f, tok, cfg, store_dir=tmp_path / "tokens")
    assert builds == ["a.jsonl", "a.jsonl"] and len(data.examples) == 30
    stores.prune(tmp_path / "tokens", keep=set())
    assert not debris.exists()


def test_train_resumes_from_the_store_and_prunes_finished_ones(tmp_path, tiny_model, builds):
    out = tmp_path / "run"
    files = [write_jsonl(tmp_path / f"f{i}.jsonl", text_rows(12, f"f{i}")) for i in range(4)]
    for f in files:
        assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--batch-size", "4") == 0
    assert builds == [f.name for f in files]
    kept = sorted(p.name.split("-")[0] for p in (out / "tokens").iterdir())
    assert len(kept) == 2  # the most recent two: a file dropped again finds its tokens; the rest are gone
    state = checkpoint.newest_complete(out).state
    assert [f["name"] for f in state["files"]] == [f.name for f in files]


def test_memory_cost_of_examples_is_on_disk(tmp_path, tok, tiny_model):
    """The examples are views on memory-mapped arrays, not Python lists of tokens."""
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(200))
    data = load_file(f, tok, TrainConfig(model=str(tiny_model)), store_dir=tmp_path / "tokens")
    assert isinstance(data.store.ids, np.memmap) and isinstance(data.store.mask, np.memmap)
    assert isinstance(data.rows.items, np.ndarray)
    meta = json.loads((data.store.path / "meta.json").read_text())
    assert meta["examples"] == 200 and meta["tokens"] == int(data.store.offsets[-1])
