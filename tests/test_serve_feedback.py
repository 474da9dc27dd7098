"""Feedback becomes training data: `evertrain serve --collect-feedback` keeps each answer, takes ratings and
corrections on POST /v1/feedback, and drops them as files into the inbox, where the daemon trains each once.

    pytest -q tests/test_serve_feedback.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import httpx
import pytest
from conftest import cli
from daemon_helpers import ThreadDaemon, assert_trained_once, by_name, drop, ledger_rows, make_ws, rows, wait_for
from dashboard_run import Served, Tree, chromium
from serve_helpers import ServedModel, ask

from evertrain.observe import trace


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A workspace that trained one file (a checkpoint to serve); each test takes a copy."""
    ws = make_ws(tmp_path_factory.mktemp("feedback-base"), tiny_model, "--no-watch")
    drop(ws, "first.jsonl", rows(8, "first"))
    assert cli("run", ws, "--once") == 0
    return ws


@pytest.fixture
def ws(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "ws", symlinks=True)


def post(served: ServedModel, body) -> httpx.Response:
    return httpx.post(f"{served.url}/feedback", json=body, timeout=30)


def log_rows(ws, table: str) -> list[dict]:
    db = sqlite3.connect(ws / "feedback" / "feedback.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM {table}")]
    finally:
        db.close()


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def inbox(ws) -> dict[str, list[dict]]:
    return {p.name: lines_of(p) for p in sorted((ws / "inbox").iterdir()) if not p.name.startswith(".")}


def test_answers_are_kept_and_feedback_waits_for_its_file(ws):
    with ServedModel(ws, collect_feedback=True, feedback_every=100) as s:
        client = s.client()
        chat = ask(client, "What is the capital of Peru?")
        chunks = list(client.chat.completions.create(model="ws", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=8, temperature=0, stream=True))
        streamed, stream_id = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[0].id
        text = client.completions.create(model="ws", prompt="2+2=", max_tokens=6, temperature=0)
        kept = {r["id"]: r for r in log_rows(ws, "answers")}
        assert set(kept) == {chat.id, stream_id, text.id}
        assert kept[chat.id]["answer"] == chat.choices[0].message.content
        assert json.loads(kept[chat.id]["messages"]) == [{"role": "user", "content": "What is the capital of Peru?"}]
        assert f"ws:{kept[chat.id]['version']}" == chat.model and kept[chat.id]["step"] == 2
        assert kept[text.id]["prompt"] == "2+2=" and kept[text.id]["answer"] == text.choices[0].text
        assert kept[text.id]["messages"] is None
        assert kept[stream_id]["answer"] == streamed

        first = post(s, {"id": chat.id, "rating": "good"})
        assert first.status_code == 200, first.text
        assert first.json() == {"object": "feedback", "id": chat.id, "rating": "good", "correction": False,
                                "replaced": [], "waiting": 1, "dropped": []}
        # Changed its mind while the rating waits: the newer one replaces it.
        again = post(s, {"id": chat.id, "rating": "bad"}).json()
        assert again["replaced"] == ["rating"] and again["waiting"] == 1
        assert post(s, {"id": stream_id, "correction": "Hello there."}).json()["waiting"] == 2
        assert post(s, {"id": text.id, "rating": "bad", "correction": "4"}).json()["waiting"] == 4
        assert inbox(ws) == {}, "nothing is dropped before --feedback-every records wait"
        waiting = {(r["answer_id"], r["kind"]): r for r in log_rows(ws, "records")}
        assert waiting[(chat.id, "rating")]["good"] == 0 and len(waiting) == 4
    # A server that stops drops what waits: no feedback is left behind with it.
    assert sorted(n.rsplit("-", 1)[1] for n in inbox(ws)) == ["corrections.jsonl", "ratings.jsonl"]


@pytest.mark.parametrize("body, status, param, needle", [
    ({"rating": "good"}, 400, "id", "'id' must be the id"),
    ({"id": "chatcmpl-never-given", "rating": "good"}, 404, "id", "no answer 'chatcmpl-never-given' is kept"),
    ({"id": "ANSWER"}, 400, "rating", "give a 'rating'"),
    ({"id": "ANSWER", "rating": "great"}, 400, "rating", "'rating' must be \"good\" or \"bad\", not 'great'"),
    ({"id": "ANSWER", "rating": True}, 400, "rating", "'rating' must be \"good\" or \"bad\""),
    ({"id": "ANSWER", "correction": "  "}, 400, "correction", "'correction' must be a non-empty string"),
    ({"id": "ANSWER", "correction": 4}, 400, "correction", "'correction' must be a non-empty string"),
    ({"id": "ANSWER", "rating": "good", "correction": "x"}, 400, "rating", "a correction says the answer was wrong"),
    ({"id": "ANSWER", "correction": "look: <image>"}, 400, "correction", "cannot become training data"),
])
def test_bad_feedback_is_refused_in_openais_error_shape(ws, body, status, param, needle):
    with ServedModel(ws, collect_feedback=True, feedback_every=100) as s:
        answer = ask(s.client(), "Hi")
        body = {k: answer.id if v == "ANSWER" else v for k, v in body.items()}
        r = post(s, body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and needle in error["message"], error
        assert set(error) == {"message", "type", "param", "code"}
        assert log_rows(ws, "records") == [], "a refused feedback stores nothing"


def test_feedback_already_collected_is_not_taken_again(ws):
    with ServedModel(ws, collect_feedback=True, feedback_every=1) as s:
        answer = ask(s.client(), "Hi")
        dropped = post(s, {"id": answer.id, "rating": "bad"}).json()["dropped"]
        assert len(dropped) == 1 and (ws / "inbox" / dropped[0]).is_file()
        r = post(s, {"id": answer.id, "rating": "good"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_collected"
        assert dropped[0] in r.json()["error"]["message"]
        # Its correction is another record: still welcome.
        assert post(s, {"id": answer.id, "correction": "Hello."}).status_code == 200
    assert len(inbox(ws)) == 2


def test_feedback_files_have_the_documented_shapes_and_train_once_with_kto(ws):
    daemon = ThreadDaemon(ws)
    try:
        with ServedModel(ws, collect_feedback=True, feedback_every=3) as s:
            client = s.client()
            conversation = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."},
                            {"role": "user", "content": "And of Chile?"}]
            bad = client.chat.completions.create(model="ws", messages=conversation, max_tokens=8, temperature=0)
            good = ask(client, "2+2?")
            text = client.completions.create(model="ws", prompt="The sky is", max_tokens=6, temperature=0)
            assert post(s, {"id": good.id, "rating": "good"}).json()["dropped"] == []
            dropped = post(s, {"id": bad.id, "rating": "bad", "correction": "Santiago."}).json()["dropped"]
            assert [n.rsplit("-", 1)[1] for n in dropped] == ["ratings.jsonl", "corrections.jsonl"]
            assert post(s, {"id": text.id, "rating": "bad"}).json()["waiting"] == 1
        # The server stopped: the last rating went into a file of its own, batch 2.
        c1, r1, r2 = [f["name"] for f in sorted(log_rows(ws, "files"), key=lambda f: (f["batch"], f["name"]))]
        assert re.fullmatch(r"feedback-\d{8}T\d{6}Z-0001-corrections\.jsonl", c1) and "-0002-ratings" in r2
        wait_for(lambda: all(by_name(ws).get(n, {}).get("state") == "done" for n in (c1, r1, r2)), timeout=120,
                 what="the feedback files to be trained")
    finally:
        assert daemon.stop() == 0
    done = {p.name.split("-", 1)[1]: lines_of(p) for p in (ws / "done").iterdir()}
    assert done[r1] == [
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": good.choices[0].message.content}], "label": True, "id": good.id},
        {"messages": conversation + [{"role": "assistant", "content": bad.choices[0].message.content}],
         "label": False, "id": bad.id}]
    # The correction alone is trained: the conversation's earlier answer is context (weight 0).
    assert done[c1] == [{"messages": [conversation[0], {**conversation[1], "weight": 0}, conversation[2],
                                      {"role": "assistant", "content": "Santiago."}], "id": bad.id}]
    assert done[r2] == [{"prompt": "The sky is", "completion": text.choices[0].text, "label": False, "id": text.id}]
    assert_trained_once(ws, {"first.jsonl": 8, r1: 2, c1: 1, r2: 1})
    files = by_name(ws)
    assert "feedback" in files[r1]["format"] and "feedback" in files[r2]["format"], files[r1]["format"]
    assert "feedback" not in files[c1]["format"], files[c1]["format"]
    kto = [m for m in map(json.loads, (ws / "logs" / "metrics.jsonl").read_text().splitlines())
           if m.get("file_name") in (r1, r2)]
    assert kto and all("kl" in (m.get("objective") or {}) for m in kto), kto


def db_bytes(ws) -> int:
    return (ws / "feedback" / "feedback.sqlite").stat().st_size


def log_bytes(ws) -> int:
    return sum(p.stat().st_size for p in (ws / "feedback").glob("feedback.sqlite*") if not p.name.endswith("-shm"))


def test_the_log_keeps_within_its_bounds_and_never_drops_waiting_feedback(ws):
    cap = 64 << 10
    with ServedModel(ws, collect_feedback=True, feedback_every=100, feedback_max_bytes=cap) as s:
        client = s.client()
        rated = ask(client, "keep me " + "x" * 700, max_tokens=2)
        assert post(s, {"id": rated.id, "rating": "bad"}).status_code == 200
        ids = [ask(client, f"answer {i} " + "y" * 700, max_tokens=2).id for i in range(70)]
        kept = {r["id"] for r in log_rows(ws, "answers")}
        # The oldest answers went, save the one whose rating still waits for its file.
        assert rated.id in kept and ids[-1] in kept and ids[0] not in kept
        assert 20 < len(kept) < 60, len(kept)
        # The database within the cap (and a page); its write-ahead log within a few pages (an eighth of a
        # larger cap) and the transaction after it.
        db, wal = db_bytes(ws), log_bytes(ws) - db_bytes(ws)
        assert db <= cap + 4096 and wal <= 32 << 10, (db, wal)
        expired = post(s, {"id": ids[0], "rating": "good"})
        assert expired.status_code == 404 and "expired" in expired.json()["error"]["message"]
    [ratings] = inbox(ws).values()
    assert [r["id"] for r in ratings] == [rated.id]
    assert db_bytes(ws) <= cap + 4096 and log_bytes(ws) == db_bytes(ws)  # the write-ahead log emptied at the end

    with ServedModel(ws, collect_feedback=True, feedback_max_answers=5) as s:
        ids = [ask(s.client(), f"count {i}", max_tokens=2).id for i in range(8)]
        assert {r["id"] for r in log_rows(ws, "answers")} == set(ids[-5:])


@pytest.mark.parametrize("point", ["feedback-assigned", "feedback-dropped"])
def test_a_crash_while_dropping_drops_the_same_bytes_again_and_they_train_once(ws, point):
    """Killed (-9) after a file's records were assigned and before it was renamed into the inbox, or after the
    rename and before it was marked: the next start drops the same bytes; the daemon trains them once."""
    proc = subprocess.Popen([sys.executable, "-m", "evertrain", "serve", ws, "--port", "0", "--collect-feedback",
                             "--feedback-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "EVERTRAIN_FAULT": point})
    try:
        url = next(m.group(1) for line in proc.stdout if (m := re.search(r" at (http://\S+/v1)$", line.strip())))
        import openai

        answer = ask(openai.OpenAI(base_url=url, api_key="-", max_retries=0), "Capital of Peru?")
        with pytest.raises(httpx.TransportError):  # the server died answering it
            httpx.post(f"{url}/feedback", json={"id": answer.id, "rating": "bad"}, timeout=60)
        assert proc.wait(60) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [assigned] = log_rows(ws, "files")
    name = assigned["name"]
    assert assigned["dropped_at"] is None and set(inbox(ws)) == ({name} if point == "feedback-dropped" else set())
    daemon = ThreadDaemon(ws)
    try:
        if point == "feedback-dropped":  # the first copy is trained before the second arrives
            wait_for(lambda: by_name(ws).get(name, {}).get("state") == "done", timeout=120, what="the first copy")
        with ServedModel(ws, collect_feedback=True, feedback_every=1):
            [again] = log_rows(ws, "files")
            assert again["dropped_at"] is not None
        expected = ["done", "duplicate"] if point == "feedback-dropped" else ["done"]
        wait_for(lambda: [r["state"] for r in ledger_rows(ws) if r["original_name"] == name] == expected,
                 timeout=120, what="the copy dropped again to be taken")
    finally:
        assert daemon.stop() == 0
    taken = [r for r in ledger_rows(ws) if r["original_name"] == name]
    assert {r["sha256"] for r in taken} == {assigned["sha256"]}
    # The duplicate is by_name's row of that name: its first copy's training is checked in the trace itself.
    assert_trained_once(ws, {"first.jsonl": 8, **({name: 1} if point == "feedback-assigned" else {})})
    assert trace.coverage(ws / "current_model" / "trace.jsonl")[assigned["sha256"]] == {0: 1}

    with Served(ws) as d:  # the dashboard's view of it
        fb = httpx.get(f"http://127.0.0.1:{d.port}/api/feedback", timeout=30).json()
    assert fb["kept"] and fb["answers"] == 1 and fb["ratings"] == {"good": 0, "bad": 1} and fb["corrections"] == 0
    assert fb["waiting"] == {"ratings": 0, "corrections": 0}
    [shown] = fb["files"]
    assert fb["files_total"] == 1
    assert shown["name"] == name and shown["state"] == "done" and shown["records"] == 1
    assert [r["state"] for r in shown["ledger"]] == expected


def test_collect_feedback_needs_a_workspace_and_one_server(ws, capsys):
    run_dir = ws / "current_model"  # a run folder, as `evertrain train --output-dir` makes
    assert cli("serve", run_dir, "--collect-feedback", "--port", "0") == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is not a workspace" in err and "leave out --collect-feedback" in err, err
    assert not (run_dir / "feedback").exists()
    for bad in (("--feedback-every", "0"), ("--feedback-minutes", "0"), ("--feedback-max-mb", "-1")):
        assert cli("serve", ws, "--collect-feedback", *bad) == 2
        assert bad[0] in capsys.readouterr().err
    with ServedModel(ws, collect_feedback=True):
        assert cli("serve", ws, "--collect-feedback", "--port", "0") == 2
        assert "another evertrain server collecting feedback" in capsys.readouterr().err
    log = ws / "feedback" / "feedback.sqlite"
    log.rename(ws / "feedback.sqlite.kept")
    log.write_bytes(b"not a database" * 100)
    assert cli("serve", ws, "--collect-feedback", "--port", "0") == 2
    assert f"{log}: the feedback log cannot be opened (file is not a database)" in capsys.readouterr().err
    (ws / "feedback.sqlite.kept").rename(log)
    for root in (ws, run_dir):  # no feedback log in a run folder; an empty one in the workspace
        with Served(root) as d:
            fb = httpx.get(f"http://127.0.0.1:{d.port}/api/feedback", timeout=30).json()
        assert fb["kept"] is (root == ws) and (root == run_dir or fb["answers"] == 0), fb


def test_feedback_is_collected_after_its_minutes_without_more_records(ws):
    with ServedModel(ws, collect_feedback=True, feedback_every=100, feedback_minutes=0.01) as s:
        answer = ask(s.client(), "Hi")
        assert post(s, {"id": answer.id, "correction": "Hello."}).json()["dropped"] == []
        wait_for(lambda: inbox(ws), timeout=30, what="the timer to drop the waiting correction")
    [(name, lines)] = inbox(ws).items()
    assert name.endswith("-0001-corrections.jsonl") and lines[0]["id"] == answer.id


def test_the_page_shows_the_feedback_and_where_it_went(browser, ws, tmp_path):
    with ServedModel(ws, collect_feedback=True, feedback_every=1) as s:
        answer = ask(s.client(), "Hi")
        [name] = post(s, {"id": answer.id, "rating": "good"}).json()["dropped"]
    assert cli("run", ws, "--once") == 0
    with Served(ws) as d:
        dom = Tree(chromium(browser, tmp_path / "profile", f"http://127.0.0.1:{d.port}/", "--dump-dom")).root
    card = dom.find(id="feedback-card")
    assert card.attrs.get("hidden") is None
    numbers = dict(zip([n.text() for n in card.find_all("dt")], [n.text() for n in card.find_all("dd")]))
    assert numbers["answers kept"] == "1" and numbers["rated good"] == "1" and numbers["rated bad"] == "0"
    row = card.find(tag="tr", data_name=name)
    assert row.attrs["data-state"] == "done" and row.find(class_="chip").text() == "done"
