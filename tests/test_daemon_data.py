"""The daemon while it prepares data: progress in the status, controls that act during preparation, the next
file prepared in the background, and bad files still failed before any of them trains."""

from __future__ import annotations

import threading

from conftest import cli
from daemon_helpers import ThreadDaemon, assert_exactly_once, by_name, drop, make_ws, rows, slow_steps, status, wait_for

from evertrain.data import prepare as prepare_module
from evertrain.data.render import Renderer


def gate_preparation(monkeypatch, batch: int = 10) -> threading.Semaphore:
    """Small batches, each waiting for the test's go: preparation advances exactly as far as the test lets it."""
    gate = threading.Semaphore(0)
    real = Renderer.tokenize

    def tokenize(self, rendered):
        gate.acquire()
        return real(self, rendered)

    monkeypatch.setattr(prepare_module, "BATCH_RECORDS", batch)
    monkeypatch.setattr(Renderer, "tokenize", tokenize)
    return gate


def test_status_shows_preparation_and_pause_and_stop_act_during_it(tmp_path, tiny_model, monkeypatch, capsys):
    gate = gate_preparation(monkeypatch)
    ws = make_ws(tmp_path, tiny_model)
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "big.jsonl", rows(100, "big"))
        wait_for(lambda: status(ws).get("state") == "preparing", what="preparation to start")
        assert status(ws)["current_file"] == "big.jsonl"
        for _ in range(4):
            gate.release()
        capsys.readouterr()
        assert cli("status", ws) == 0
        assert "preparing big.jsonl" in capsys.readouterr().out
        assert cli("pause", ws) == 0
        for _ in range(200):  # nothing may wait on the gate any more once the pause is seen
            gate.release()
        wait_for(lambda: status(ws).get("state") == "paused", what="the pause to act during preparation")
        row = by_name(ws)["big.jsonl"]
        assert row["state"] == "queued" and row["steps_trained"] == 0 and status(ws)["global_step"] == 0
        assert not [p for p in (ws / "current_model" / "tokens").glob("*") if p.is_dir()]  # nothing half-built
        assert cli("resume", ws) == 0
        wait_for(lambda: by_name(ws)["big.jsonl"]["state"] == "done", what="the file to train after resume")
        assert daemon.stop() == 0
    finally:
        for _ in range(200):
            gate.release()
        daemon.stop()
    assert_exactly_once(ws, by_name(ws)["big.jsonl"], 100)


def test_stop_during_preparation_leaves_the_file_queued(tmp_path, tiny_model, monkeypatch):
    gate = gate_preparation(monkeypatch)
    ws = make_ws(tmp_path, tiny_model)
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "big.jsonl", rows(100, "big"))
        wait_for(lambda: status(ws).get("state") == "preparing", what="preparation to start")
        assert cli("stop", ws) == 0
        for _ in range(200):
            gate.release()
        daemon.thread.join(60)
        assert daemon.rc == 0
    finally:
        for _ in range(200):
            gate.release()
        daemon.stop()
    assert by_name(ws)["big.jsonl"]["state"] == "queued"
    model = ws / "current_model"  # stopped inside preparation: no step, no checkpoint, no half-built store
    assert not list(model.glob("checkpoint-*")) and not [p for p in (model / "tokens").glob("*") if p.is_dir()]
    assert cli("run", ws, "--once") == 0
    assert_exactly_once(ws, by_name(ws)["big.jsonl"], 100)


def test_the_next_file_is_prepared_while_the_current_one_trains(tmp_path, tiny_model, monkeypatch):
    slow_steps(monkeypatch)
    builds = []
    real = prepare_module.build_store

    def build_store(path, *args, **kwargs):
        builds.append((path.name, threading.current_thread().name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "build_store", build_store)
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    drop(ws, "first.jsonl", rows(30, "first"))
    drop(ws, "second.jsonl", rows(20, "second"))
    drop(ws, "third-bad.jsonl", '{"text": "fine"}\n{"text": 7}\n')
    assert cli("run", ws, "--once") == 5  # third-bad failed
    files = by_name(ws)
    assert files["first.jsonl"]["state"] == files["second.jsonl"]["state"] == "done"
    assert files["third-bad.jsonl"]["state"] == "failed" and "line 2" in files["third-bad.jsonl"]["error"]
    assert files["third-bad.jsonl"]["first_step"] is None  # failed before any of it trained
    second = [who for name, who in builds if name.endswith("second.jsonl")]
    assert second == ["evertrain-prefetch"]  # built once, in the background; the daemon found it ready
    assert_exactly_once(ws, files["second.jsonl"], 20)
    log = (ws / "logs" / "evertrain.log").read_text()
    assert "prepared the next file" in log and "second.jsonl" in log


def test_every_container_trains_through_the_daemon_and_train(tmp_path, tiny_model):
    """Each container, dropped in the inbox or given to train, trains every record once; a damaged one fails whole."""
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    ws = make_ws(tmp_path, tiny_model)
    records = {
        "a.jsonl.gz": [{"text": f"gz {i}", "id": i} for i in range(9)],
        "b.jsonl.zst": [{"prompt": f"zst {i}?", "completion": " yes"} for i in range(7)],
        "c.json": [{"instruction": f"json {i}", "output": "ok"} for i in range(6)],
        "d.parquet": [{"messages": [{"role": "user", "content": f"pq {i}"}, {"role": "assistant", "content": "ok"}]}
                      for i in range(8)],
        "e.csv": [{"question": f"csv {i}", "answer": "fine"} for i in range(5)],
    }
    staging = tmp_path / "staging"
    staging.mkdir()
    lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()  # noqa: E731
    (staging / "a.jsonl.gz").write_bytes(gzip.compress(lines(records["a.jsonl.gz"])))
    (staging / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(records["b.jsonl.zst"])))
    (staging / "c.json").write_text(json.dumps(records["c.json"]))
    pq.write_table(pa.Table.from_pylist(records["d.parquet"]), staging / "d.parquet")
    (staging / "e.csv").write_text("question,answer\n" + "".join(f"csv {i},fine\n" for i in range(5)))
    whole = gzip.compress(lines([{"text": f"cut {i}"} for i in range(200)]))
    (staging / "f-cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    for p in sorted(staging.iterdir()):
        p.rename(ws / "inbox" / p.name)
    # CSV columns are mapped like any other keys: the workspace maps question/answer onto prompt/completion.
    toml = (ws / "evertrain.toml").read_text()
    (ws / "evertrain.toml").write_text(toml.replace("[data.columns]\n", '[data.columns]\nquestion = "prompt"\n'
                                                                       'answer = "completion"\n'))
    assert cli("run", ws, "--once") == 5  # the cut .gz failed
    files = by_name(ws)
    for name, rs in records.items():
        assert files[name]["state"] == "done", (name, files[name]["error"])
        assert_exactly_once(ws, files[name], len(rs))
    cut = files["f-cut.jsonl.gz"]
    assert cut["state"] == "failed" and "truncated" in cut["error"] and cut["first_step"] is None

    out = tmp_path / "run"
    assert cli("train", "--dataset", ws / "done" / files["d.parquet"]["name"], "--output-dir", out,
               "--model", tiny_model, "--trace") == 0
    assert cli("train", "--dataset", tmp_path / "missing.parquet", "--output-dir", out) == 2
