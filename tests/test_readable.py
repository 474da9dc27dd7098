"""Readable examples: each tracked example is labelled by what tells it apart (its last user turn, never the
system prompt every record shares); a tiny file gets one held-out example, a smaller one says it has none; a run
begun before that rule keeps its old held-out choice.

    pytest -q tests/test_readable.py
"""

from __future__ import annotations

import json

from cdp import Page
from conftest import cli, settings_saved_without, write_jsonl
from dashboard_run import Served

from evertrain.train import checkpoint
from evertrain.dashboard import sources

SYSTEM = "You are a helpful assistant. Answer briefly and kindly, in one sentence, and never make things up."


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(n)]


def files(out) -> dict:
    return {f["name"]: f for f in checkpoint.newest_complete(out).state["evertrain"]["files"]}


def test_examples_are_labelled_by_their_user_turn_and_tiny_files_get_a_held_out_example(tmp_path, tiny_model,
                                                                                        browser):
    out = tmp_path / "run"
    opts = ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--snapshot-per-file", 3)
    assert cli("train", "--dataset", write_jsonl(tmp_path / "chat.jsonl", chats(12)), "--output-dir", out,
               *opts) == 0
    assert cli("train", "--dataset", write_jsonl(tmp_path / "few.jsonl", chats(5)[1:]), "--output-dir", out,
               *opts) == 0
    held = {name: f["held_out"] for name, f in files(out).items()}
    assert len(held["chat.jsonl"]) == 1 and held["few.jsonl"] == []  # 12 >= held_out_min_file (10); 4 < 10

    run = sources.open_view(out)
    labels = [e["label"] for e in sources.snapshots_index(run)["examples"]]
    chat_labels = [x for x in labels if x.startswith("chat.jsonl line ")]
    assert len(chat_labels) == 3 and len(set(chat_labels)) == 3
    for text in chat_labels:
        line = int(text.split()[2].rstrip(":"))
        assert text == f"chat.jsonl line {line}: What is {line - 1} plus {line - 1}?"
    assert not any("helpful assistant" in x for x in labels)

    fm = sources.state(run)["forgetting"]
    assert [f["file_name"] for f in fm["files"]] == ["chat.jsonl"]
    assert fm["no_slice"] == [{"file": files(out)["few.jsonl"]["sha256"], "file_name": "few.jsonl", "examples": 4}]

    with Served(out) as s, Page(browser, tmp_path / "profile", f"http://127.0.0.1:{s.port}/") as page:
        page.wait("document.querySelectorAll('#example option').length > 0", 60, "the example picker")
        options = page.eval("[...document.querySelectorAll('#example option')].map(o => o.textContent)")
        cells = page.eval("[...document.querySelectorAll('#forgetting td.no-slice')].map(c => c.dataset.colFile)")
        note = page.eval("document.getElementById('no-slice').textContent")
    assert sorted(x for x in options if x.startswith("chat.jsonl")) == sorted(chat_labels)
    assert cells and set(cells) == {"few.jsonl"}  # its column, in every row, says it has no slice
    assert note == "few.jsonl (4 examples) is too small for a held-out slice: its forgetting is not measured."


def test_a_run_begun_before_the_tiny_file_rule_keeps_its_held_out_choice(tmp_path, tiny_model):
    out = tmp_path / "run"
    opts = ("--model", tiny_model, "--batch-size", 4, "--no-packing")
    with settings_saved_without("held_out_min_file"):
        assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", chats(100)), "--output-dir", out,
                   *opts) == 0
    assert cli("train", "--dataset", write_jsonl(tmp_path / "b.jsonl", chats(12)), "--output-dir", out,
               *opts) == 0
    assert files(out)["b.jsonl"]["held_out"] == []  # as the older version chose
    saved = json.loads((checkpoint.newest_complete(out).path / "evertrain_config.json").read_text())
    assert saved["held_out_min_file"] == 0  # and the run now says so

    fresh = tmp_path / "fresh"
    assert cli("train", "--dataset", tmp_path / "b.jsonl", "--output-dir", fresh, *opts) == 0
    assert len(files(fresh)["b.jsonl"]["held_out"]) == 1
