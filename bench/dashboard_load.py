"""The dashboard under load: many clients at once, and many connections that send half a request and wait.

The real server (`evertrain dashboard DIR --port 0`, a subprocess, bound to 127.0.0.1) on a synthetic daemon
workspace (a 5,000-step metrics log, a 20-file ledger, evaluations, 10 snapshots). All traffic goes to
127.0.0.1, every loop is bounded in count and time, and the whole run takes about a minute.

  baseline  one client, one connection: REQUESTS_ALONE requests to /api/state, one after the other.
  idle      IDLE connections that send a request line and one header, never the blank line after them: the
            server's threads, RSS and open files (from /proc/PID) before and with all of them open, a normal
            request meanwhile, and how many the server has closed HEAD_TIMEOUT seconds later.
  clients   CLIENTS clients at once (httpx.AsyncClient each, its own connection), each EACH requests to
            /api/state: failed requests (an error or any status but 200; goal 0) and latency percentiles,
            also as ratios to the baseline's median.

    .venv/bin/python bench/dashboard_load.py
    .venv/bin/python bench/dashboard_load.py --before main    # the same, also for server.py as of git main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from evertrain.daemon import ledger  # noqa: E402
from evertrain.dashboard import sources  # noqa: E402
from evertrain.web.listener import HEAD_TIMEOUT  # noqa: E402

CLIENTS, EACH, REQUESTS_ALONE, IDLE = 500, 4, 200, 1000
CLIENT_TIMEOUT = 20  # seconds: a request not answered by then counts as failed
OPEN_WITHIN = 30     # seconds to open the idle connections; those not connected by then are counted
HALF_REQUEST = b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n"
# One TLS context for every client (unused over http, but each client would load the CA store again: 500
# times the benchmark's own CPU, on the cores the server needs).
TLS = ssl.create_default_context()


def workspace(root: Path) -> Path:
    """A daemon workspace with what /api/state reads: status, ledger, metrics, evaluations, snapshots."""
    root.mkdir(parents=True)
    (root / "evertrain.toml").write_text("")
    (root / "status").mkdir()
    (root / "status" / "training_status.json").write_text(json.dumps(
        {"state": "training", "global_step": 5000, "current_file": "f19.jsonl", "loss": 1.25}))
    files = [(f"{i:064x}", f"f{i}.jsonl") for i in range(20)]
    (root / "logs").mkdir()
    with open(root / "logs" / "metrics.jsonl", "w") as f:
        for step in range(1, 5001):
            sha, name = files[min(step // 250, 19)]
            f.write(json.dumps({"step": step, "loss": 3 / (1 + step / 500), "lr": 1e-4, "grad_norm": 1.0,
                                "tokens_per_second": 900.0, "file": sha, "file_name": name, "file_step": step % 250,
                                "file_total_steps": 250, "time": time.time()}) + "\n")
    with open(root / "logs" / "evals.jsonl", "w") as f:
        for after in range(5):
            for evaluated in range(after + 1):
                f.write(json.dumps({"step": 250 * (after + 1), "after_file": files[after][0],
                                    "after_file_name": files[after][1], "file": files[evaluated][0],
                                    "file_name": files[evaluated][1], "loss": 1.0 + evaluated / 10}) + "\n")
    db = sqlite3.connect(root / "ledger.sqlite")
    db.execute(f"CREATE TABLE files ({', '.join(ledger.columns())})")
    db.executemany(f"INSERT INTO files (id, original_name, sha256, state, steps_trained, expected_steps) "
                   f"VALUES (?, ?, ?, ?, ?, 250)", [(i + 1, n, s, "done" if i < 19 else "training", 250)
                                                    for i, (s, n) in enumerate(files)])
    db.commit()
    db.close()
    evolution = root / "snapshots" / "evolution"
    evolution.mkdir(parents=True)
    for k in range(10):
        examples = [{"id": f"probe-{j}", "source": "probe", "file": None, "line": j, "input": "The capital of Peru is",
                     "expected": " Lima.", "prediction": " Lima.", "generation": " Lima, the city of kings.",
                     "loss": 1.0 / (k + 1), "token_accuracy": 0.5, "tokens": []} for j in range(8)]
        (evolution / f"step-{500 * (k + 1):08d}.json").write_text(json.dumps(
            {"step": 500 * (k + 1), "file_name": files[k][1], "time": time.time(), "examples": examples}))
    return root


def start(root: Path, before: str | None) -> tuple[subprocess.Popen, int]:
    """`evertrain dashboard ROOT --port 0`, or the server.py of git BEFORE, on the same workspace."""
    if before is None:
        cmd = [sys.executable, "-m", "evertrain", "dashboard", str(root), "--port", "0"]
    else:
        old = root.parent / "before"
        old.mkdir(exist_ok=True)
        (old / "old_server.py").write_bytes(subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{before}:src/evertrain/dashboard/server.py"],
            check=True, capture_output=True).stdout)
        static = ROOT / "src" / "evertrain" / "dashboard" / "static"
        code = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(old)!r}); import old_server; "
                f"old_server.STATIC_DIR = Path({str(static)!r}); "
                f"sys.exit(old_server.serve({str(root)!r}, '127.0.0.1', 0))")
        cmd = [sys.executable, "-c", code]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"the dashboard did not start: {line!r}")
    return proc, int(line.split(" at http://")[1].split("/")[0].rsplit(":", 1)[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> tuple[int, float, int]:
    """Threads, RSS (MB) and open files (its sockets among them) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def timed_get(client: httpx.AsyncClient, url: str) -> float | None:
    """Seconds to a 200 answer, or None (failed)."""
    t0 = time.perf_counter()
    try:
        r = await client.get(url)
    except httpx.HTTPError:
        return None
    return time.perf_counter() - t0 if r.status_code == 200 else None


async def baseline(port: int) -> list[float]:
    url = f"http://127.0.0.1:{port}/api/state"
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, verify=TLS) as client:
        await timed_get(client, url)  # warm: the readers' first pass over the logs
        return [await timed_get(client, url) for _ in range(REQUESTS_ALONE)]


async def many_clients(port: int) -> tuple[list[float | None], float]:
    url = f"http://127.0.0.1:{port}/api/state"

    async def one_client() -> list[float | None]:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, verify=TLS,
                                     limits=httpx.Limits(max_connections=1)) as client:
            return [await timed_get(client, url) for _ in range(EACH)]

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return [t for r in results for t in r], time.perf_counter() - t0


def idle_connections(port: int, pid: int, alone_median: float) -> dict:
    before = proc_status(pid)
    held, unconnected = [], 0
    deadline = time.monotonic() + OPEN_WITHIN
    try:
        for _ in range(IDLE):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=max(0.1, deadline - time.monotonic()))
                s.sendall(HALF_REQUEST)
            except OSError:  # not accepted in time: the server's queue was full
                unconnected += 1
                continue
            held.append(s)
        time.sleep(1)  # let the server take them all in
        during = proc_status(pid)
        t0 = time.perf_counter()
        try:
            ok = httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=CLIENT_TIMEOUT, verify=TLS).status_code == 200
        except httpx.HTTPError:
            ok = False
        normal = time.perf_counter() - t0
        time.sleep(HEAD_TIMEOUT + 1)
        closed = 0
        for s in held:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass  # still open, nothing sent
            except ConnectionError:
                closed += 1
        after = proc_status(pid)
    finally:
        for s in held:
            s.close()
    return {"before": before, "during": during, "after": after, "normal_ok": ok, "normal_s": normal,
            "normal_ratio": normal / alone_median, "closed": closed, "held": len(held), "unconnected": unconnected}


def measure(root: Path, before: str | None) -> None:
    proc, port = start(root, before)
    name = "evertrain dashboard (uvicorn)" if before is None else f"server.py of {before}"
    try:
        alone = sorted(asyncio.run(baseline(port)))
        median = percentile(alone, 0.5)
        print(f"\n== {name}, pid {proc.pid}, port {port}")
        print(f"baseline  1 client, {REQUESTS_ALONE} requests to /api/state: p50 {median * 1000:.1f} ms, "
              f"p95 {percentile(alone, 0.95) * 1000:.1f} ms")
        # Idle connections first: the RSS they add is not hidden in memory the 500 clients left behind.
        idle = idle_connections(port, proc.pid, median)
        (t0, m0, f0), (t1, m1, f1), (t2, m2, f2) = idle["before"], idle["during"], idle["after"]
        print(f"idle      {IDLE} half-sent requests ({idle['unconnected']} could not connect): threads {t0} -> {t1}, "
              f"RSS {m0:.0f} -> {m1:.0f} MB (+{m1 - m0:.0f} MB), open files {f0} -> {f1}")
        print(f"          a normal request meanwhile: {'200' if idle['normal_ok'] else 'FAILED'} in "
              f"{idle['normal_s'] * 1000:.0f} ms ({idle['normal_ratio']:.1f}x baseline p50)")
        print(f"          {HEAD_TIMEOUT + 1} s later: {idle['closed']} of {idle['held']} closed by the server; "
              f"threads {t2}, RSS {m2:.0f} MB, open files {f2}")
        cpu0 = cpu_seconds(proc.pid)
        times, wall = asyncio.run(many_clients(port))
        cpu = cpu_seconds(proc.pid) - cpu0
        ok = sorted(t for t in times if t is not None)
        failed = len(times) - len(ok)
        print(f"clients   {CLIENTS} at once x {EACH} requests: {failed} failed of {len(times)} "
              f"({100 * failed / len(times):.1f}%), {len(times) / wall:.0f} req/s over {wall:.1f} s "
              f"({len(times) / wall * median:.1f}x one client's), "
              f"server CPU {cpu:.1f} s ({1000 * cpu / len(times):.1f} ms a request)")
        if ok:
            print("          latency " + ", ".join(
                f"p{int(q * 100)} {percentile(ok, q) * 1000:.0f} ms ({percentile(ok, q) / median:.0f}x)"
                for q in (0.5, 0.95, 0.99)) + f", max {ok[-1]:.2f} s ({ok[-1] / median:.0f}x)  (x: of baseline p50)")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="also measure src/evertrain/dashboard/server.py as of this git ref")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = CLIENTS + IDLE + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    # The machine may be shared: what else ran says how far to trust the figures.
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        root = workspace(Path(tmp) / "ws")
        measure(root, None)
        if args.before:
            measure(root, args.before)


if __name__ == "__main__":
    main()
