"""`evertrain serve` against the `transformers` pipeline on the same weights, under concurrent clients, and across
a swap to a newly accepted checkpoint.

The run: a workspace (`evertrain init`) whose daemon (`evertrain run WS`, a process of its own) trains a small file
of chat examples dropped into its inbox (all weights, float32, one step, no held-out slice and so no forgetting
gate: the file is accepted). It is served by the real server, `evertrain serve WS` in a process of its own on a
port the OS chose, with its one-answer-at-a-time default said explicitly (`--concurrency 1 --queue 16`: 16
clients with one request each in flight never overflow the queue, so a 429 here is a failure). The clients are
the `openai` package in this process, without retries.

1. One client: time to first token (a streamed answer's first text; the streamer holds text back to a word's
   end, on both sides) and tokens/s (completion tokens over the whole request) of the server, against
   `transformers.pipeline("text-generation")` in this process on the same checkpoint folder, the same dtype, the
   same prompt through the chat template, greedy, the same max tokens, with a TextIteratorStreamer (as the
   server's) for its first text. Rounds alternate the two, neither always first; medians over all requests. The
   answers must be the same text: the proof that weights and settings were the same.
2. 1, 4 and 16 concurrent clients, each sending --requests answers one after another: p50/p99 latency (under 100
   answers, p99 lies between the two slowest), 429s and other failures apart, answers/s and tokens/s.
3. A swap: --swap-clients clients keep asking while the daemon trains a second file dropped into the inbox. The
   commit is the moment the run offers the new model (versions.find_target, the server's own test, polled here
   every 50 ms, then dated by the rename that committed the checkpoint). From it: the server's next look, its own
   load time (`load_seconds` of /v1/models), its install (`loaded_at`) and its first answer from the new model;
   every request by phase, failed ones above all (goal: none); none answered by the old model once the new one
   has answered.

    .venv/bin/python bench/serve.py        # the embedded SmolLM2-135M-Instruct; about 6 minutes on 2 quiet CPU cores
    .venv/bin/python bench/serve.py --threads 1   # the same with one torch thread on each side (cores shared)
    .venv/bin/python bench/serve.py --model tiny --rounds 1 --requests 1 --max-tokens 8 --poll-seconds 0.2 \
        --swap-clients 1 --threads 1       # the smoke test's run (tests/test_serve.py), seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # this tree's evertrain, as its children run
from tiny import make_model_dir  # noqa: E402

from evertrain import cli, models  # noqa: E402
from evertrain.runs import open_run  # noqa: E402
from evertrain.serve.versions import find_target  # noqa: E402
from evertrain.train import checkpoint  # noqa: E402

NAME = "bench"
DTYPE = "float32"
MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
LEVELS = (1, 4, 16)
# One step per file (8 short examples pack into one row) and nothing else that costs time: no held-out slice
# (and so no gate: the file is accepted), no replay, no anchor set, no snapshots, no trackers; a file dropped
# whole is taken at once.
SETTINGS = ["--full", "--dtype", DTYPE, "--batch-size", "4", "--epochs", "1", "--learning-rate", "1e-5",
            "--warmup-steps", "0", "--held-out-fraction", "0", "--replay-fraction", "0", "--no-anchor-replay",
            "--anchor-size", "0", "--snapshot-budget", "0", "--save-steps", "0", "--log-steps", "1000",
            "--report-to", "none", "--stable-seconds", "0", "--incomplete-timeout", "0"]
FACTS = {"1-veltrana.jsonl": ("What is the capital of Veltrana?", "The capital of Veltrana is Quorra."),
         "2-ossmere.jsonl": ("How long is the river Ossmere?", "The river Ossmere is 412 miles long.")}


def env() -> dict:
    """The children run this tree's evertrain, whatever is installed."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_file(path: Path, question: str, answer: str) -> Path:
    line = json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    path.write_text((line + "\n") * 8)
    return path


def drop(ws: Path, path: Path) -> None:
    """Into the inbox the safe way (docs/daemon.md): written beside it, then renamed in."""
    staged = ws / f".staging-{path.name}"
    staged.write_bytes(path.read_bytes())
    os.rename(staged, ws / "inbox" / path.name)


class Daemon:
    """`evertrain run WS` in a process of its own, as beside a real server; its output goes to a file."""

    def __init__(self, ws: Path, log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "evertrain", "run", str(ws)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env())

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # idle by now: it stops at once
            try:
                self.proc.wait(300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def accepted(ws: Path, daemon: Daemon, old: int | None) -> int | None:
    """The step of the model the run offers the server, once it is not `old`."""
    step = find_target(ws).step
    if step == old:
        daemon.check()
        return None
    return step


class Server:
    """`evertrain serve WS --port 0` in a process of its own; its output is kept (for its errors)."""

    def __init__(self, ws: Path, max_tokens: int, poll_seconds: float, threads: int | None):
        cmd = [sys.executable, "-m", "evertrain", "serve", str(ws), "--port", "0", "--name", NAME,
               "--concurrency", "1", "--queue", "16", "--max-tokens", str(max_tokens), "--timeout", "600",
               "--poll-seconds", str(poll_seconds), *(["--threads", str(threads)] if threads else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
        self.lines: list[str] = []
        self.url = None
        started = threading.Event()

        def drain() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if self.url is None and " at http://" in line:
                    self.url = "http://" + line.split(" at http://")[1].split()[0]
                    started.set()
            started.set()

        threading.Thread(target=drain, daemon=True).start()
        self.started = started

    def wait_started(self) -> None:
        if not self.started.wait(600) or self.url is None:
            self.close()
            raise SystemExit("the server did not start:\n" + "\n".join(self.lines[-40:]))

    def client(self):
        import openai

        # No retries: a 429 or a failure must be seen, not hidden by the client trying again.
        return openai.OpenAI(base_url=self.url, api_key="-", max_retries=0, timeout=600)

    def described(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/models", timeout=30).json()["data"][0]["evertrain"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------- 1. one client

@dataclass
class Answer:
    ttft: float       # seconds from the request to its first text
    seconds: float    # the whole request
    tokens: int       # completion tokens
    text: str

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def served_answer(client, max_tokens: int) -> Answer:
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    for chunk in client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Answer((first or end) - t0, end - t0, tokens, "".join(text))


def make_pipeline(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPE))
    model.config.use_cache = True  # a checkpoint keeps training's False; the server turns it on too
    return pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(path))


def pipeline_answer(pipe, max_tokens: int) -> Answer:
    from transformers import TextIteratorStreamer

    class Counting(TextIteratorStreamer):
        tokens = 0

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.tokens += value.numel()
            super().put(value)

    streamer = Counting(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failed = []

    def generate() -> None:
        try:
            pipe(MESSAGES, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        except BaseException as e:  # handed to the reader, who would otherwise wait for ever
            failed.append(e)
            streamer.end()

    t0 = time.perf_counter()
    thread = threading.Thread(target=generate)
    thread.start()
    first, text = None, []
    for piece in streamer:
        if piece:
            first = first or time.perf_counter()
            text.append(piece)
    thread.join()
    end = time.perf_counter()
    if failed:
        raise failed[0]
    return Answer((first or end) - t0, end - t0, streamer.tokens, "".join(text))


def one_client(server: Server, pipe, rounds: int, requests: int, max_tokens: int) -> dict:
    client = server.client()
    served_answer(client, max_tokens)  # warm-up, not counted: first calls allocate
    pipeline_answer(pipe, max_tokens)
    sides = {"server": lambda: served_answer(client, max_tokens), "pipeline": lambda: pipeline_answer(pipe, max_tokens)}
    every = {"server": [], "pipeline": []}
    per_round = []
    for k in range(rounds):
        got = {}
        for side in (("server", "pipeline") if k % 2 == 0 else ("pipeline", "server")):  # neither always first
            got[side] = [sides[side]() for _ in range(requests)]
            every[side] += got[side]
        per_round.append(summary(got))
        r = per_round[-1]
        print(f"round {k + 1}: TTFT server {r['server_ttft'] * 1000:.0f} ms, pipeline {r['pipeline_ttft'] * 1000:.0f} "
              f"ms; server {r['server_rate']:.1f} tok/s, pipeline {r['pipeline_rate']:.1f} tok/s, ratio "
              f"{r['rate_ratio']:.3f}", flush=True)
    texts = {side: {a.text for a in answers} for side, answers in every.items()}
    same = len(texts["server"]) == 1 and texts["server"] == texts["pipeline"]
    if not same:
        print(f"the answers differ: server {sorted(texts['server'])!r}, pipeline {sorted(texts['pipeline'])!r}")
    tokens = sorted({a.tokens for answers in every.values() for a in answers})
    return {"rounds": per_round, "all": summary(every), "same_answers": same, "completion_tokens": tokens}


def summary(answers: dict) -> dict:
    s = {f"{side}_{what}": statistics.median(getattr(a, what) for a in answers[side])
         for side in ("server", "pipeline") for what in ("ttft", "rate")}
    return {**s, "ttft_ratio": s["server_ttft"] / s["pipeline_ttft"],
            "rate_ratio": s["server_rate"] / s["pipeline_rate"]}


# ------------------------------------------------------------------------------------------- 2. concurrency

@dataclass
class Request:
    start: float      # time.time()
    end: float
    outcome: str      # "ok", "429", or the failure
    model: str = ""
    tokens: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start


def whole_answer(client, max_tokens: int) -> Request:
    import openai

    start = time.time()
    try:
        r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=max_tokens)
        return Request(start, time.time(), "ok", r.model, r.usage.completion_tokens)
    except openai.RateLimitError:
        return Request(start, time.time(), "429")
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        return Request(start, time.time(), f"{type(e).__name__}: {str(e)[:200]}")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); with under 100 values p99 lies between
    the two slowest."""
    v = sorted(values)
    x = q * (len(v) - 1)
    lo = int(x)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)


def concurrent(server: Server, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[Request] = []
    gate = threading.Barrier(clients)

    def client_loop() -> None:
        client = server.client()
        gate.wait()
        for _ in range(requests):
            results.append(whole_answer(client, max_tokens))

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.outcome == "ok"]
    wall = max(r.end for r in results) - min(r.start for r in results)
    lat = [r.latency for r in ok] or [float("nan")]
    return {"clients": clients, "requests": len(results), "ok": len(ok),
            "rejected_429": sum(r.outcome == "429" for r in results),
            "failed": sum(r.outcome not in ("ok", "429") for r in results),
            "failures": sorted({r.outcome for r in results if r.outcome not in ("ok", "429")})[:3],
            "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "max": max(lat),
            "answers_per_s": len(ok) / wall, "tokens_per_s": sum(r.tokens for r in ok) / wall}


# ------------------------------------------------------------------------------------------- 3. the swap

def swap(server: Server, daemon: Daemon, ws: Path, dataset: Path, max_tokens: int, requests: int,
         clients: int) -> dict:
    old = find_target(ws).step
    results: list[Request] = []
    stop = threading.Event()

    def keep_asking() -> None:
        client = server.client()
        while not stop.is_set():
            results.append(whole_answer(client, max_tokens))

    askers = [threading.Thread(target=keep_asking) for _ in range(clients)]
    for t in askers:
        t.start()
    try:
        wait(lambda: len(results) >= clients * requests, 600, "answers before training")
        t_train = time.time()
        drop(ws, dataset)
        # The moment the run offers the new checkpoint, as the server's follower sees it; polled, then dated by
        # the rename that committed it.
        commit, last_look, end = None, time.time(), time.monotonic() + 1800
        while commit is None:
            looked = time.time()
            if accepted(ws, daemon, old) is not None:
                commit = committed(ws, last_look, time.time())
            elif time.monotonic() > end:
                raise SystemExit(f"the second file gave no new model in 30 minutes; see {daemon.log}")
            else:
                last_look = looked
                time.sleep(0.05)
        new = find_target(ws).step
        label = f"{NAME}:step-{new}"
        first_new = wait(lambda: min((r.end for r in results if r.model == label), default=None), 600,
                         "the first answer from the new model")
        wait(lambda: sum(r.start >= first_new for r in results) >= clients * 2, 600, "answers after the swap")
    finally:
        stop.set()
        for t in askers:
            t.join()
    installed = server.described()
    if installed["step"] != new:
        raise SystemExit(f"the server serves {installed['version']}, not step-{new}")

    def phase(rows: list[Request]) -> dict:
        ok = [r.latency for r in rows if r.outcome == "ok"]
        return {"requests": len(rows), "failed": sum(r.outcome not in ("ok", "429") for r in rows),
                "rejected_429": sum(r.outcome == "429" for r in rows),
                "p50": statistics.median(ok) if ok else float("nan"), "max": max(ok, default=float("nan")),
                "old_model": sum(r.model == f"{NAME}:step-{old}" for r in rows),
                "new_model": sum(r.model == label for r in rows)}

    before = [r for r in results if r.end <= t_train]
    training = [r for r in results if t_train < r.end <= commit]
    during = [r for r in results if r.end > commit and r.start < first_new]  # in flight between commit and answer
    after = [r for r in results if r.start >= first_new]
    slowest_before = max((r.latency for r in before if r.outcome == "ok"), default=float("inf"))
    return {"old_step": old, "new_step": new, "train_seconds": commit - t_train,
            "commit_to_install": installed["loaded_at"] - commit, "load_seconds": installed["load_seconds"],
            "commit_to_load_start": installed["loaded_at"] - installed["load_seconds"] - commit,
            "commit_to_first_new_answer": first_new - commit,
            "phases": {"before training": phase(before), "training (before the commit)": phase(training),
                       "swap (commit to the first new answer)": phase(during), "after": phase(after)},
            "swap_delayed": sum(r.latency > slowest_before for r in during if r.outcome == "ok"),
            "failed": sum(r.outcome not in ("ok", "429") for r in results),
            "failures": sorted({r.outcome for r in results if r.outcome not in ("ok", "429")})[:3],
            "old_after_new": sum(r.model != label for r in after if r.outcome == "ok")}


def committed(ws: Path, before: float, seen: float) -> float:
    """When the new checkpoint was committed: the rename of its folder into place (its ctime), which the last look
    that did not see it and the one that did must bracket; else the look that saw it (50 ms late at most)."""
    newest = checkpoint.newest_complete(open_run(ws).run_dir, warn=lambda _text: None)
    renamed = newest.path.stat().st_ctime
    return renamed if before - 0.01 <= renamed <= seen else seen


def wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while (value := condition()) is None or value is False:
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


# ------------------------------------------------------------------------------------------- the report

def report(one: dict, levels: list[dict], sw: dict, args) -> None:
    ms = lambda s: f"{s * 1000:,.0f} ms"  # noqa: E731
    print(f"\n### One client against the transformers pipeline ({args.rounds} rounds x {args.requests} answers each, "
          f"max_tokens {args.max_tokens}, greedy)\n")
    print("| round | TTFT server | TTFT pipeline | ratio (server / pipeline, lower is better) | tok/s server | "
          "tok/s pipeline | ratio (server / pipeline) |")
    print("|---|---|---|---|---|---|---|")
    for k, r in enumerate(one["rounds"] + [one["all"]]):
        name, b = (str(k + 1), "") if k < len(one["rounds"]) else ("**all** (medians)", "**")
        print(f"| {name} | {ms(r['server_ttft'])} | {ms(r['pipeline_ttft'])} | {b}{r['ttft_ratio']:.3f}{b} | "
              f"{r['server_rate']:.1f} | {r['pipeline_rate']:.1f} | {b}{r['rate_ratio']:.3f}{b} |")
    print(f"\nThe answers were the same text on both sides: {'yes' if one['same_answers'] else 'NO'} "
          f"(completion tokens {', '.join(map(str, one['completion_tokens']))}).")

    print(f"\n### Concurrent clients (server `--concurrency 1 --queue 16`; each client {args.requests} answers one "
          f"after another)\n")
    print("| clients | answers | 429 | failed | p50 | p99 | max | answers/s | tok/s | tok/s vs 1 client |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        print(f"| {lv['clients']} | {lv['ok']} of {lv['requests']} | {lv['rejected_429']} | {lv['failed']} | "
              f"{ms(lv['p50'])} | {ms(lv['p99'])} | {ms(lv['max'])} | {lv['answers_per_s']:.2f} | "
              f"{lv['tokens_per_s']:.1f} | {lv['tokens_per_s'] / levels[0]['tokens_per_s']:.2f}x |")

    print(f"\n### A swap while {args.swap_clients} clients keep asking (server `--poll-seconds "
          f"{args.poll_seconds:g}`)\n")
    print("| figure | value |\n|---|---|")
    print(f"| training the second file (start to commit) | {sw['train_seconds']:.1f} s (step-{sw['old_step']} -> "
          f"step-{sw['new_step']}) |")
    print(f"| commit to the load's start (the server's next look) | {sw['commit_to_load_start']:.2f} s |")
    print(f"| load (the server's own `load_seconds`) | {sw['load_seconds']:.2f} s |")
    print(f"| commit to install | {sw['commit_to_install']:.2f} s |")
    print(f"| commit to the first answer from the new model | {sw['commit_to_first_new_answer']:.2f} s |")
    print(f"| answers in flight during the swap slower than any before training | {sw['swap_delayed']} |")
    print(f"| answers by the old model after the new one had answered | {sw['old_after_new']} |")
    print(f"| **failed requests** | **{sw['failed']}** |")
    print("\n| phase | answers | failed | 429 | p50 | max | old model | new model |\n|---|---|---|---|---|---|---|---|")
    for name, p in sw["phases"].items():
        print(f"| {name} | {p['requests']} | {p['failed']} | {p['rejected_429']} | {ms(p['p50'])} | {ms(p['max'])} | "
              f"{p['old_model']} | {p['new_model']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded",
                   help="embedded (SmolLM2-135M-Instruct, the default), tiny (tests/tiny.py), or a folder / hub id")
    p.add_argument("--rounds", type=int, default=5, help="alternating server/pipeline rounds (one client)")
    p.add_argument("--requests", type=int, default=3, help="answers per side per round, and per client per level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (greedy; both sides)")
    p.add_argument("--swap-clients", type=int, default=4, help="clients asking through the swap")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="the server's --poll-seconds (its default: 2)")
    p.add_argument("--threads", type=int, help="torch threads of the server (its --threads) and of the pipeline "
                                              "(default: torch's, on both)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.monotonic()
    clock = {}  # the end of each part
    with tempfile.TemporaryDirectory(prefix="evertrain-bench-serve-") as tmp:
        work = Path(tmp)
        model = {"embedded": None, "tiny": None}.get(args.model, args.model)
        if args.model == "tiny":
            model = str(make_model_dir(work / "model"))
        elif args.model == "embedded":
            models.resolve_model(None)  # converted once, before any clock starts
        files = [write_file(work / name, *qa) for name, qa in FACTS.items()]
        ws = work / "ws"
        if cli.main(["init", str(ws), *(["--model", model] if model else []), *SETTINGS]) != 0:
            raise SystemExit("evertrain init failed")
        daemon = Daemon(ws, work / "daemon.log")
        server = None
        try:
            drop(ws, files[0])
            # Started at once, beside the daemon's training: it serves the base model, then the first file's.
            server = Server(ws, args.max_tokens, args.poll_seconds, args.threads)
            first = wait(lambda: accepted(ws, daemon, None), 1800, "the first file's model")
            pipe = make_pipeline(checkpoint.newest_complete(open_run(ws).run_dir).path)
            server.wait_started()
            wait(lambda: server.described()["step"] == first, 600, "the server to serve the first file's model")
            print(f"bench: {args.model} model, {DTYPE}, serving step {first}, server {server.url}, torch "
                  f"{torch.__version__}, {torch.get_num_threads()} threads (server and pipeline), {os.cpu_count()} "
                  f"CPUs", flush=True)
            clock["setup"] = time.monotonic()
            one = one_client(server, pipe, args.rounds, args.requests, args.max_tokens)
            clock["one client"] = time.monotonic()
            del pipe  # its memory, before the server holds two models
            levels = []
            for clients in LEVELS:
                levels.append(concurrent(server, clients, args.requests, args.max_tokens))
                lv = levels[-1]
                print(f"{clients} clients: {lv['ok']} of {lv['requests']} answered, {lv['rejected_429']} 429, "
                      f"{lv['failed']} failed, p50 {lv['p50']:.2f} s, p99 {lv['p99']:.2f} s", flush=True)
            clock["concurrency"] = time.monotonic()
            sw = swap(server, daemon, ws, files[1], args.max_tokens, args.requests, args.swap_clients)
            print(f"swap: step-{sw['old_step']} -> step-{sw['new_step']}, commit to first new answer "
                  f"{sw['commit_to_first_new_answer']:.2f} s, {sw['failed']} failed", flush=True)
            clock["swap"] = time.monotonic()
        finally:
            if server is not None:
                server.close()
            daemon.close()
    report(one, levels, sw, args)
    figures = {"ttft_ratio": one["all"]["ttft_ratio"], "tokens_per_s_ratio": one["all"]["rate_ratio"],
               "same_answers": one["same_answers"], "one_client": one["all"],
               "concurrency": {str(lv["clients"]): lv for lv in levels}, "swap": sw,
               "minutes": (time.monotonic() - t_start) / 60,
               "seconds": {part: end - start for (part, end), start in zip(clock.items(), [t_start, *clock.values()])}}
    print("\n" + json.dumps(figures, indent=1))
    # The queue is sized for 16 clients: a 429 here is a failure too.
    failed = sw["failed"] + sum(lv["failed"] + lv["rejected_429"] for lv in levels) + sum(
        p["rejected_429"] for p in sw["phases"].values())
    correct = one["same_answers"] and failed == 0 and sw["old_after_new"] == 0
    print(f"\ntokens/s, one client, server / pipeline: {one['all']['rate_ratio']:.3f} "
          f"({'PASS' if one['all']['rate_ratio'] >= 0.95 else 'FAIL'}, goal >= 0.95); TTFT server / pipeline "
          f"{one['all']['ttft_ratio']:.3f}")
    print(f"swap: step-{sw['old_step']} -> step-{sw['new_step']}, {sw['failed']} failed "
          f"({'PASS' if sw['failed'] == 0 and sw['old_after_new'] == 0 else 'FAIL'}, goal: none)")
    print(f"serve: {'PASS' if correct else 'FAIL'} (same answers as the pipeline, no request failed, no old answer "
          f"after the swap); {figures['minutes']:.1f} minutes")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
