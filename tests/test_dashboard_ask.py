"""The dashboard's "Ask the model" box: POST /api/ask streams two checkpoints' answers; who may ask; a full
queue; the answers in a real browser.

    pytest -q tests/test_dashboard_ask.py
"""

import http.client
import json
import threading
import time

import pytest
from dashboard_run import TOKEN, Served, Tree, chromium, trained_run

from evertrain.train import checkpoint
from evertrain.dashboard import ask

PROMPT = "The capital of Peru is"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    return trained_run(tmp_path_factory, tiny_model)


@pytest.fixture(scope="module")
def expected(run_dir):
    """What the base model and the newest checkpoint answer, computed without the dashboard."""
    from evertrain.export import chat

    settings = chat.Settings(max_new_tokens=8)
    out = {}
    for which in ("base", None):
        who = chat.speaker(run_dir, which)
        out[which or "newest"] = (who.label, "".join(chat.stream(who, [{"role": "user", "content": PROMPT}],
                                                                settings)))
    assert out["base"][1] != out["newest"][1], "both answer alike: the page could show either in either place"
    return out


def post(port: int, body, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/api/ask", body=json.dumps(body) if not isinstance(body, bytes) else body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def events(body: bytes) -> list[dict]:
    return [json.loads(chunk[len("data: "):]) for chunk in body.decode().split("\n\n") if chunk]


def own(port: int) -> dict:
    return {"Origin": f"http://127.0.0.1:{port}"}


def test_ask_streams_both_answers(run_dir, expected):
    newest = checkpoint.newest_complete(run_dir)
    with Served(run_dir) as s:
        status, headers, body = post(s.port, {"prompt": PROMPT, "a": "base", "b": "newest", "max_new_tokens": 8},
                                     own(s.port))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    got = events(body)
    assert got[-1] == {"type": "end"}
    starts = [e for e in got if e["type"] == "start"]
    assert [(e["side"], e["label"], e["step"]) for e in starts] == [
        (0, expected["base"][0], None), (1, expected["newest"][0], newest.step)]
    for side, key in ((0, "base"), (1, "newest")):
        tokens = [e["text"] for e in got if e["type"] == "token" and e["side"] == side]
        assert len(tokens) > 1, "the answer came in one piece: not streamed"
        assert "".join(tokens) == expected[key][1]
    assert sum(e["type"] == "done" for e in got) == 2


def test_bad_questions_are_a_400_and_a_missing_step_an_error_event(run_dir):
    with Served(run_dir) as s:
        for body in (b"not json", {"prompt": ""}, {"prompt": "x", "a": "yesterday"},
                     {"prompt": "x", "max_new_tokens": 10_000}, {"prompt": "x" * 5000}):
            status, _h, answer = post(s.port, body, own(s.port))
            assert status == 400 and json.loads(answer)["error"], body
        status, _h, answer = post(s.port, {"prompt": "x", "a": 999, "b": "base", "max_new_tokens": 2}, own(s.port))
    got = events(answer)
    assert status == 200 and got[0]["type"] == "error" and "no checkpoint of global step 999" in got[0]["message"]
    assert any(e["type"] == "done" and e["side"] == 1 for e in got)


def test_asking_needs_the_token_and_the_pages_own_origin(run_dir):
    question = {"prompt": PROMPT, "max_new_tokens": 1}
    with Served(run_dir) as s:  # loopback, no token: the Origin rule alone
        assert post(s.port, question)[0] == 403
        assert post(s.port, question, {"Origin": "http://evil.example"})[0] == 403
        assert post(s.port, question, {"Origin": f"http://localhost:{s.port + 1}"})[0] == 403
    with Served(run_dir, token=TOKEN) as s:
        assert post(s.port, question, own(s.port))[0] == 401
        assert post(s.port, question, {"Authorization": "Bearer wrong-token-of-twenty"} | own(s.port))[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert post(s.port, question, bearer | {"Origin": "http://evil.example"})[0] == 403
        status, _h, body = post(s.port, question, bearer | own(s.port))
        assert status == 200 and events(body)[-1] == {"type": "end"}


def test_one_question_at_a_time_and_a_full_queue_is_a_429(run_dir, monkeypatch):
    monkeypatch.setattr(ask, "QUEUE", 1)
    entered, release = threading.Event(), threading.Event()
    real = ask.Asker.speaker

    def held(self, which):  # the first answer takes as long as the test wants
        entered.set()
        release.wait(30)
        return real(self, which)

    monkeypatch.setattr(ask.Asker, "speaker", held)
    askers = []
    real_submit = ask.Asker.submit
    monkeypatch.setattr(ask.Asker, "submit", lambda self, q: askers.append(self) or real_submit(self, q))
    answers = []
    with Served(run_dir) as s:
        question = {"prompt": PROMPT, "max_new_tokens": 2}
        first = threading.Thread(target=lambda: answers.append(post(s.port, question, own(s.port))))
        first.start()
        assert entered.wait(30)
        second = threading.Thread(target=lambda: answers.append(post(s.port, question, own(s.port))))
        second.start()
        deadline = time.monotonic() + 60
        while not askers[-1].waiting.full() and time.monotonic() < deadline:  # the second is in the queue
            time.sleep(0.05)
        assert askers[-1].waiting.full(), "the second question never reached the queue"
        status, headers, body = post(s.port, question, own(s.port))
        assert status == 429 and headers["Retry-After"] and "busy: 1 questions" in json.loads(body)["error"]
        release.set()
        first.join(60)
        second.join(60)
    assert [a[0] for a in answers] == [200, 200]
    assert all(events(a[2])[-1] == {"type": "end"} for a in answers)


def test_answers_appear_side_by_side_in_the_browser(browser, run_dir, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(ask, "MAX_NEW_TOKENS", 8)  # the page asks with the server's limit
    newest = checkpoint.newest_complete(run_dir)
    with Served(run_dir) as s:
        # The page's answer streams in real time while the browser's clock is virtual (its budget can run out
        # while a loaded machine loads two models): the same question asked first loads them, so the page's own
        # ask only generates.
        status, _h, body = post(s.port, {"prompt": PROMPT, "a": "base", "b": newest.step}, own(s.port))
        assert status == 200 and [e["type"] for e in events(body)].count("done") == 2, body
        url = f"http://127.0.0.1:{s.port}/#ask={PROMPT.replace(' ', '%20')}&a=base&b={newest.step}"
        dom = Tree(chromium(browser, tmp_path / "profile", url, "--dump-dom")).root
    assert dom.find(id="ask").attrs.get("data-asked") == "1", "the question never finished"
    assert dom.find(id="ask-error").attrs.get("hidden") is not None, dom.find(id="ask-error").text()
    left, right = dom.find(id="answer-a"), dom.find(id="answer-b")
    assert left.attrs["data-state"] == right.attrs["data-state"] == "done"
    assert left.find(class_="who").text() == expected["base"][0]
    assert right.attrs["data-step"] == str(newest.step)
    assert left.find(class_="text").text() == expected["base"][1]
    assert right.find(class_="text").text() == expected["newest"][1]
