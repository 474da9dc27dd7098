"""Evolution at every file's end, always: the budget governs only the snapshots in between; `snapshot_every`
forces a rhythm; the page's API counts each file's snapshots and skips, and follows one example across files.

    pytest -q tests/test_evolution.py
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from cdp import Page
from conftest import cli, write_jsonl
from dashboard_run import Served

from evertrain.observe.snapshots import snapshot_budget
from evertrain.train import checkpoint


def qa(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "completion": f" {tag} answer {i}."} for i in range(n)]


def snapshot_steps(out) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (out / "snapshots" / "evolution").glob("step-*.json"))


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def test_every_file_ends_with_a_snapshot_whatever_the_budget_and_snapshot_every_forces_a_rhythm(tmp_path,
                                                                                               tiny_model):
    opts = ("--model", tiny_model, "--batch-size", 2, "--no-packing", "--held-out-fraction", 0,
            "--snapshot-per-file", 2)
    out = tmp_path / "none"
    for tag, n in (("a", 6), ("b", 10)):  # 3 steps, then 5
        assert cli("train", "--dataset", write_jsonl(tmp_path / f"{tag}.jsonl", qa(tag, n)), "--output-dir", out,
                   *opts, "--snapshot-budget", 0) == 0
    assert snapshot_steps(out) == [3, 8]
    last = json.loads((out / "snapshots" / "evolution" / "step-00000008.json").read_text())
    assert last["file_name"] == "b.jsonl" and {e["file"] for e in last["examples"]} >= {
        checkpoint.newest_complete(out).state["files"][1]["sha256"]}
    assert any(e["generation"] is not None for e in last["examples"])

    out = tmp_path / "every"
    assert cli("train", "--dataset", tmp_path / "b.jsonl", "--output-dir", out, *opts, "--snapshot-budget", 0,
               "--snapshot-every", 2) == 0
    assert snapshot_steps(out) == [2, 4, 5]


def test_the_page_counts_each_files_snapshots_and_follows_an_example_across_files(tmp_path, tiny_model,
                                                                                 browser):
    out = tmp_path / "run"
    write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "Probe?", "completion": " Yes."}])
    out.mkdir()
    (tmp_path / "probes.jsonl").rename(out / "probes.jsonl")
    opts = ("--model", tiny_model, "--batch-size", 1, "--no-packing", "--held-out-fraction", 0,
            "--snapshot-per-file", 1, "--snapshot-budget", 1e-9)  # the budget allows almost nothing in between
    for tag, n in (("a", 12), ("b", 5)):
        assert cli("train", "--dataset", write_jsonl(tmp_path / f"{tag}.jsonl", qa(tag, n)), "--output-dir", out,
                   *opts) == 0
    state = checkpoint.newest_complete(out).state
    sha = {f["name"]: f["sha256"] for f in state["evertrain"]["files"]}
    budget = snapshot_budget(state)
    skipped = budget["skipped_by_file"]
    assert skipped.get(sha["a.jsonl"], 0) >= 1 and sum(skipped.values()) == budget["skipped"]
    assert {12, 17} <= set(snapshot_steps(out))

    with Served(out) as s:
        files = {f["original_name"]: f for f in get(s.port, "/api/state")["files"]}
        taken = {name: sum(json.loads(p.read_text())["file"] == sha[name]
                           for p in (out / "snapshots" / "evolution").glob("step-*.json")) for name in sha}
        for name in sha:
            assert files[name]["snapshots"] == {"taken": taken[name], "skipped": skipped.get(sha[name], 0)}

        tracked = json.loads((out / "snapshots" / "tracked.json").read_text())
        first = next(t for t in tracked if t["file"] == sha["a.jsonl"])
        evo = get(s.port, f"/api/evolution/{first['id']}")
        assert evo["file_name"] == "a.jsonl"
        assert [(g["file_name"], g["own"]) for g in evo["files"]] == [("a.jsonl", True), ("b.jsonl", False)]
        own, later = evo["files"]
        assert own["snapshots"][-1]["step"] == 12 and later["snapshots"][-1]["step"] == 17
        snap = json.loads((out / "snapshots" / "evolution" / "step-00000017.json").read_text())
        ex = next(e for e in snap["examples"] if e["id"] == first["id"])
        assert later["snapshots"][-1]["loss"] == ex["loss"] and later["snapshots"][-1]["prediction"] == ex["prediction"]
        # The page: the files table counts them, the example's history is grouped by the file in training.
        with Page(browser, tmp_path / "profile", f"http://127.0.0.1:{s.port}/#example={first['id']}") as page:
            page.wait("document.querySelectorAll('#ev-history tr.group').length === 2", 60, "the grouped history")
            groups = page.eval("[...document.querySelectorAll('#ev-history tr.group')].map(r => r.textContent)")
            assert groups[0].startswith("while a later file trained: b.jsonl")  # newest first
            assert groups[1].startswith(f"while its own file trained: a.jsonl · {len(own['snapshots'])} snapshot(s)")
            cells = page.eval("Object.fromEntries([...document.querySelectorAll('#files tbody tr')].map(r => "
                              "[r.querySelector('.name').textContent, r.querySelector('.snaps').textContent]))")
        assert cells["a.jsonl"] == f"{taken['a.jsonl']} ({skipped[sha['a.jsonl']]} skipped by the budget)"
        probe = get(s.port, "/api/evolution/probe-0")
        assert probe["file_name"] == "probes.jsonl" and not any(g["own"] for g in probe["files"])
        try:
            get(s.port, "/api/evolution/nope")
            raise AssertionError("an unknown example must be a 404")
        except urllib.error.HTTPError as e:
            assert e.code == 404
