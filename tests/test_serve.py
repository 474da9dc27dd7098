"""`evertrain serve`: the OpenAI client against the real server, which follows the run as the daemon trains.

    pytest -q tests/test_serve.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import cli, text_rows, write_jsonl
from daemon_helpers import ThreadDaemon, assert_trained_once, by_name, drop, make_ws, wait_for
from serve_helpers import Asking, ServedModel, ask

from evertrain.serve import engine as serve_engine
from evertrain.train import checkpoint

QUESTION = "Capital of Veltrana?"


def facts(n: int, answer: str, question: str = QUESTION) -> list[dict]:
    return [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}] * n


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_model):
    """A train --output-dir whose model learnt one answer by heart (one file, many steps)."""
    root = tmp_path_factory.mktemp("taught")
    data = write_jsonl(root / "a.jsonl", facts(8, "Quorra."))
    out = root / "run"
    assert cli("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, "--batch-size", 4,
               "--epochs", 30, "--learning-rate", 1e-2, "--warmup-steps", 0, "--held-out-fraction", 0,
               "--replay-fraction", 0, "--no-anchor-replay") == 0
    return out


def test_the_openai_client_gets_the_answer_whole_and_streamed_with_the_version_it_came_from(taught):
    step = checkpoint.newest_complete(taught).step
    with ServedModel(taught) as s:
        client = s.client()
        whole = client.chat.completions.with_raw_response.create(
            model="ws", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24)
        answer = whole.parse()
        assert answer.choices[0].message.content == "Quorra." and answer.choices[0].finish_reason == "stop"
        assert answer.model == f"ws:step-{step}" and answer.system_fingerprint == f"evertrain-step-{step}-files-1"
        assert whole.headers["x-evertrain-version"] == f"step-{step}"
        assert whole.headers["x-evertrain-checkpoint"] == f"checkpoint-{step}"
        assert whole.headers["x-evertrain-last-file"] == "a.jsonl"
        assert answer.usage.completion_tokens == 7 + 1 and answer.usage.total_tokens == answer.usage.prompt_tokens + 8

        chunks = list(client.chat.completions.create(model="ws", messages=[{"role": "user", "content": QUESTION}],
                                                     temperature=0, max_tokens=24, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Quorra."
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == 8 and {c.model for c in chunks} == {f"ws:step-{step}"}

        # a stop string ends the answer before it (and is not part of it), as OpenAI does
        cut = ask(client, QUESTION, stop=["rr"])
        assert cut.choices[0].message.content == "Quo" and cut.choices[0].finish_reason == "stop"
        # max_tokens ends it with finish_reason "length"
        short = ask(client, QUESTION, max_tokens=3)
        assert short.choices[0].message.content == "Quo" and short.choices[0].finish_reason == "length"
        # a plain prompt, for base models
        text = client.completions.create(model="ws", prompt="<|im_start|>user\n" + QUESTION + "<|im_end|>\n"
                                         "<|im_start|>assistant\n", temperature=0, max_tokens=24)
        assert text.choices[0].text == "Quorra." and text.model == f"ws:step-{step}"
        # the same seed samples the same answer
        sampled = [client.chat.completions.create(model="ws", messages=[{"role": "user", "content": "Hi"}],
                                                  temperature=1.5, seed=7, max_tokens=16).choices[0].message.content
                   for _ in range(2)]
        assert sampled[0] == sampled[1]

        listed = client.models.list().data
        assert [m.id for m in listed] == ["ws"]
        described = listed[0].model_extra["evertrain"]
        assert described | {"loaded_at": 0, "load_seconds": 0} == {
            "version": f"step-{step}", "step": step, "checkpoint": f"checkpoint-{step}", "files": ["a.jsonl"],
            "loaded_at": 0, "load_seconds": 0}
        assert 0 < described["load_seconds"] < 60


@pytest.mark.parametrize("body, status, param, words", [
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", "only text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens", "from 1 to 64"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "from 1 to 64"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature", "from 0 to 2"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p", "above 0"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", "one answer"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, 400, "seed", "whole number"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools",
     "not supported"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages", "--max-prompt-tokens (200)"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "does not exist"),
])
def test_a_bad_request_gets_openais_error_shape_and_never_a_traceback(taught, body, status, param, words):
    with ServedModel(taught, max_tokens=64, max_prompt_tokens=200) as s:
        r = httpx.post(f"{s.url}/chat/completions", json={"model": "ws", **body}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "Traceback" not in r.text
    assert err["type"] in ("invalid_request_error",)


def test_bad_json_and_a_wrong_method_are_refused_in_the_same_shape(taught):
    with ServedModel(taught) as s:
        broken = httpx.post(f"{s.url}/chat/completions", content=b'{"model": "ws", "messages": [', timeout=30)
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        listed = httpx.post(f"{s.url}/models", timeout=30)
        assert listed.status_code == 405 and listed.json()["error"]["type"] == "invalid_request_error"
        missing = httpx.get(f"{s.url}/nothing", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_off_loopback_the_api_key_is_required_and_another_sites_page_is_refused(taught):
    key = "k" * 24
    with ServedModel(taught, host="0.0.0.0", token=key) as s:
        with pytest.raises(openai.AuthenticationError):
            ask(s.client(api_key="not-the-key"), QUESTION)
        assert ask(s.client(api_key=key), QUESTION).choices[0].message.content == "Quorra."
        # a script on another site, with the key it stole or not, may not spend answers
        r = httpx.post(f"{s.url}/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                             "Origin": "https://evil.example"},
                       json={"model": "ws", "messages": [{"role": "user", "content": QUESTION}]}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    with ServedModel(taught) as s:  # loopback, no key: a page that rebinds its name to 127.0.0.1 is refused
        r = httpx.get(f"{s.url}/models", headers={"Host": "attacker.example"}, timeout=30)
        assert r.status_code == 403


@pytest.fixture
def held_generation(monkeypatch):
    """Every generation waits for `release` before it begins: a busy server, made on purpose."""
    release, started = threading.Event(), threading.Semaphore(0)
    real = serve_engine.answer

    def answer(version, ask_, sampling):
        started.release()
        release.wait(60)
        return real(version, ask_, sampling)

    monkeypatch.setattr(serve_engine, "answer", answer)
    yield release, started
    release.set()


def test_past_the_queue_a_request_gets_429_with_retry_after(taught, held_generation):
    release, started = held_generation
    with ServedModel(taught, concurrency=1, queue=1) as s:
        body = {"model": "ws", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
        results = []
        first = threading.Thread(target=lambda: results.append(httpx.post(f"{s.url}/chat/completions", json=body,
                                                                          timeout=60)))
        first.start()
        assert started.acquire(timeout=30)  # one generating (held), the queue still empty
        second = threading.Thread(target=lambda: results.append(httpx.post(f"{s.url}/chat/completions", json=body,
                                                                           timeout=60)))
        second.start()
        wait_for(lambda: s.server.engine.waiting.qsize() == 1, what="the second request to queue")
        third = httpx.post(f"{s.url}/chat/completions", json=body, timeout=30)
        assert third.status_code == 429 and third.headers["retry-after"] == "2"
        assert third.json()["error"]["type"] == "rate_limit_error"
        release.set()
        first.join(60), second.join(60)
    assert [r.status_code for r in results] == [200, 200]  # the ones admitted were answered


def test_a_client_that_goes_away_mid_stream_stops_its_generation(taught, monkeypatch):
    ends = []
    real = serve_engine.answer

    def answer(version, ask_, sampling):
        version.model.generation_config.eos_token_id = None  # the model would go on for ever (up to max_tokens)
        emit = ask_.emit
        ask_.emit = lambda event: (ends.append(event) if event["type"] == "end" else None, emit(event))
        return real(version, ask_, sampling)

    monkeypatch.setattr(serve_engine, "answer", answer)
    with ServedModel(taught, max_tokens=20000, timeout=600) as s:
        stream = s.client().chat.completions.create(model="ws", messages=[{"role": "user", "content": QUESTION}],
                                                    temperature=0, max_tokens=20000, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 5:
                break
        stream.close()  # the client leaves
        wait_for(lambda: ends, timeout=60, what="the generation to end")
        assert ends[0]["completion_tokens"] < 2000  # stopped at the next token, not after 20,000
        assert ask(s.client(), QUESTION).choices[0].message.content  # and the worker is free again


def test_it_follows_the_accepted_model_swaps_without_failing_a_request_and_never_serves_a_rejected_file(
        tmp_path, tiny_model):
    """Files trained by the daemon while a client keeps asking: every request answered (200), each by the
    version current when it began, a stream that began before a swap ends on its own weights, and a file the
    forgetting gate rejects never reaches the server."""
    # The gate trips when a file raises an earlier file's held-out loss by more than 2 nats over its floor of 0.5:
    # file 3 teaches another answer to file 1's question, file 2 asks something else.
    ws = make_ws(tmp_path, tiny_model, "--held-out-fraction", "0.25", "--held-out-min-file", "1",
                 "--forgetting-action", "rollback", "--forgetting-tolerance", "4", "--replay-fraction", "0",
                 "--no-anchor-replay", "--epochs", "10", "--learning-rate", "1e-2")
    with ServedModel(ws) as s:
        client = s.client()
        assert ask(client, QUESTION).model == "ws:base"  # nothing accepted yet: the base model
        asking = Asking(client, QUESTION, clients=2).start()
        daemon = ThreadDaemon(ws)
        try:
            drop(ws, "1-good.jsonl", facts(8, "Quorra."))
            wait_for(lambda: s.versions.current.label != "base", timeout=120, what="the first accepted model")
            first = s.versions.current.target
            assert first.files == ("1-good.jsonl",)
            # a stream begun now, on the first model, while a second file trains and is accepted
            long = client.chat.completions.create(model="ws", messages=[{"role": "user", "content": QUESTION}],
                                                  temperature=0, max_tokens=24, stream=True)
            drop(ws, "2-good.jsonl", facts(8, "Nova.", "Name a star."))
            wait_for(lambda: by_name(ws).get("2-good.jsonl", {}).get("state") == "done", timeout=120, what="file 2")
            wait_for(lambda: len(s.versions.current.target.files) == 2, timeout=60, what="the swap to file 2's model")
            assert {c.model for c in long} == {f"ws:step-{first.step}"}  # it ended on the weights it began with
            second = s.versions.current.target
            # a file that makes the model forget everything: rejected by the gate, never served
            drop(ws, "3-bad.jsonl", facts(40, "Zzzzzzzzzzzzzzzzzzzzzzzzzzz."))
            wait_for(lambda: by_name(ws).get("3-bad.jsonl", {}).get("state") in ("rejected", "done"),
                     timeout=180, what="file 3's verdict")
        finally:
            asking.stop()
            assert daemon.stop() == 0
        assert by_name(ws)["3-bad.jsonl"]["state"] == "rejected", by_name(ws)["3-bad.jsonl"]["forgetting"]
        time.sleep(0.5)  # several polls: the server looks, and must still serve the second file's model
        assert s.versions.current.target == second
    assert not asking.failures, asking.failures[:3]
    steps = [m.split(":")[1] for m in asking.seen]
    allowed = {"base", f"step-{first.step}", f"step-{second.step}"}
    assert set(steps) <= allowed, set(steps) - allowed  # never a rejected file's weights, never a mid-file checkpoint
    assert len(asking.seen) > 10 and s.versions.swaps == 2


def test_a_daemon_killed_mid_commit_and_restarted_never_makes_the_server_read_a_partial_checkpoint(
        tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--save-steps", "2", "--epochs", "3", "--keep-checkpoints", "100")
    with ServedModel(ws, follow="checkpoints", poll_seconds=0.01) as s:
        served = []
        watching = threading.Event()

        def watch():
            while not watching.is_set():
                served.append((s.versions.current.target.step, s.server.follower.problem))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            drop(ws, "a.jsonl", text_rows(40, "a"))
            for fault in ("checkpoint-write:2", "after-rename:2", None):
                env = {"EVERTRAIN_FAULT": fault} if fault else {}
                proc = subprocess.run([sys.executable, "-m", "evertrain", "run", str(ws), "--once"], env={
                    **__import__("os").environ, **env}, capture_output=True, text=True, timeout=300)
                assert proc.returncode == (-9 if fault else 0), proc.stderr[-2000:]
            newest = checkpoint.newest_complete(ws / "current_model")
            wait_for(lambda: s.versions.current.target.step == newest.step, timeout=60, what="the last checkpoint")
            assert ask(s.client(), QUESTION).model == f"ws:step-{newest.step}"
        finally:
            watching.set()
            watcher.join(10)
    complete = {c.step for c in checkpoint.candidates(ws / "current_model") if checkpoint.verify(c) is None}
    steps = {step for step, _problem in served if step is not None}
    assert steps and max(steps) == newest.step and steps <= complete  # only ever a complete checkpoint
    assert not [p for _step, p in served if p], {p for _s, p in served if p}  # no load ever failed on a torn folder


def greedy_alone(ws: Path, step: int, question: str = QUESTION, max_tokens: int = 24) -> str:
    """The answer the model of checkpoint `step` gives loaded on its own (its own base and adapter, no server)."""
    import torch
    from evertrain.export.chat import speaker

    who = speaker(ws, step)
    ids = who.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = who.model.generate(**ids, do_sample=False, max_new_tokens=max_tokens)
    return who.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_lora_run_swaps_only_its_adapter_on_one_base(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--lora", "--lora-r", "4", "--epochs", "10", "--learning-rate", "5e-2",
                 "--replay-fraction", "0", "--no-anchor-replay")
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "1.jsonl", facts(8, "Quorra."))
        wait_for(lambda: by_name(ws).get("1.jsonl", {}).get("state") == "done", timeout=120, what="file 1")
        with ServedModel(ws) as s:
            before = s.versions.current
            base = s.versions.base
            first = ask(s.client(), QUESTION).choices[0].message.content
            first_alone = greedy_alone(ws, before.target.step)
            drop(ws, "2.jsonl", facts(8, "Nova."))
            wait_for(lambda: s.versions.current is not before and before.model is None, timeout=120,
                     what="the swap, and the old adapter let go once unused")
            after = s.versions.current
            assert after.adapter != before.adapter and s.versions.base is base  # the base was loaded once
            assert after.model is base
            assert len(s.versions.loaded) == 1 and list(base.peft_config) == [after.adapter]
            second = ask(s.client(), QUESTION).choices[0].message.content
    finally:
        assert daemon.stop() == 0
    # Each answer is the one its own checkpoint gives alone: the server applied the right adapter each time. (The
    # tiny random model's frozen output layer keeps a LoRA from learning the answers by heart: the two adapters
    # are told apart by what they say, not by "Quorra." and "Nova.".)
    assert (first, second) == (first_alone, greedy_alone(ws, after.target.step)) and first != second


def test_the_loop_closes_a_correction_posted_to_the_server_is_trained_swapped_in_and_answered(tmp_path, tiny_model):
    """The daemon trains; `serve` answers through the openai client; a correction is posted; the feedback files
    train into the same run; the server swaps to that model while a client keeps asking, without failing a
    request; and the same question now gets the corrected answer, greedily."""
    # forgetting_action off: a correction contradicts what the first file taught, which a gate would catch
    # (tests above cover the gate with the server); this test is about the loop.
    ws = make_ws(tmp_path, tiny_model, "--epochs", "30", "--learning-rate", "1e-2", "--warmup-steps", "0",
                 "--replay-fraction", "0", "--no-anchor-replay", "--forgetting-action", "off")
    daemon = ThreadDaemon(ws)
    try:
        drop(ws, "1-facts.jsonl", facts(8, "Quorra."))
        wait_for(lambda: by_name(ws).get("1-facts.jsonl", {}).get("state") == "done", timeout=120, what="file 1")
        with ServedModel(ws, collect_feedback=True, feedback_every=1) as s:
            client = s.client()
            before = ask(client, QUESTION)
            assert before.choices[0].message.content == "Quorra."
            asking = Asking(client, QUESTION).start()
            try:
                posted = httpx.post(f"{s.url}/feedback", json={"id": before.id, "rating": "bad",
                                                               "correction": "Nova."}, timeout=30)
                assert posted.status_code == 200, posted.text
                files = posted.json()["dropped"]
                assert sorted(f.rsplit("-", 1)[1] for f in files) == ["corrections.jsonl", "ratings.jsonl"]
                wait_for(lambda: all(by_name(ws).get(f, {}).get("state") == "done" for f in files), timeout=180,
                         what="the feedback files to train")
                wait_for(lambda: set(files) <= set(s.versions.current.target.files), timeout=60,
                         what="the server to swap to the model that learnt them")
            finally:
                asking.stop()
            after = ask(client, QUESTION)
    finally:
        assert daemon.stop() == 0
    assert after.choices[0].message.content == "Nova."
    assert after.model == f"ws:{s.versions.current.label}" != before.model
    assert not asking.failures, asking.failures[:3]
    # one client, one request after another: the first model, then each accepted file's, never back
    accepted = {f"ws:step-{r['last_step']}" for r in by_name(ws).values() if r["state"] == "done"}
    steps = [int(m.rsplit("-", 1)[1]) for m in asking.seen]
    assert set(asking.seen) <= accepted and before.model in asking.seen and steps == sorted(steps)
    # the feedback trained once each, in the same run, after the first file
    assert_trained_once(ws, {"1-facts.jsonl": 8, **{f: 1 for f in files}}, epochs=30)
    ratings = next(f for f in files if f.endswith("ratings.jsonl"))
    assert by_name(ws)[ratings]["format"].endswith("feedback")  # KTO: a rated answer


def test_the_serving_benchmark_runs_end_to_end_and_its_swap_fails_no_request():
    """bench/serve.py at its smallest, on the tiny model: the real server against the pipeline, 1, 4 and 16
    clients, and a swap to a second file's model trained while a client asks."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "serve.py"
    done = subprocess.run([sys.executable, str(bench), "--model", "tiny", "--rounds", "1", "--requests", "1",
                           "--max-tokens", "8", "--poll-seconds", "0.2", "--swap-clients", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # the daemon too: 3 processes, shared cores
    out = done.stdout
    assert done.returncode == 0 and "serve: PASS" in out, out[-4000:] + done.stderr[-3000:]
    figures = json.loads(out[out.index("\n{\n") + 1:out.rindex("\n}\n") + 2])

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    assert figures["same_answers"] is True  # the same weights and settings on both sides
    assert all(number(figures["one_client"][k]) and figures["one_client"][k] > 0 for k in (
        "server_ttft", "pipeline_ttft", "server_rate", "pipeline_rate", "ttft_ratio", "rate_ratio"))
    levels = figures["concurrency"]
    assert sorted(levels, key=int) == ["1", "4", "16"]
    for clients, lv in levels.items():
        assert lv["ok"] == lv["requests"] == int(clients) and lv["failed"] == lv["rejected_429"] == 0, lv
        assert all(number(lv[k]) for k in ("p50", "p99", "max", "answers_per_s", "tokens_per_s"))
        assert lv["p50"] <= lv["p99"] <= lv["max"]
    swap = figures["swap"]
    assert swap["new_step"] > swap["old_step"] and swap["failed"] == 0 and swap["old_after_new"] == 0
    assert all(number(swap[k]) for k in ("train_seconds", "load_seconds", "commit_to_install",
                                          "commit_to_first_new_answer"))
    assert swap["commit_to_install"] <= swap["commit_to_first_new_answer"]
    phases = swap["phases"]
    assert phases["after"]["new_model"] == phases["after"]["requests"] >= 2
    assert phases["before training"]["old_model"] == phases["before training"]["requests"] >= 1
    assert sum(p["failed"] + p["rejected_429"] for p in phases.values()) == 0
    assert "| clients | answers | 429 | failed | p50 | p99 |" in out  # the tables to paste
