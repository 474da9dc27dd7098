"""Soak: a real daemon fed files at random moments while faults strike at random moments; nothing lost, nothing doubled.

Good files, poison files (invalid JSON lines, a line nested too deeply, an empty file, a binary file) and slow
writers (pieces into a hidden name then a rename; appends in place over seconds) drop into the inbox, while the
daemon is killed (-9, then restarted), stopped by SIGTERM (restarted), starved of disk (a filler file on the
workspace's own small tmpfs, or where mounting is not permitted EVERTRAIN_FAULT=enospc:checkpoint-write) and
has its newest checkpoint corrupted (bytes flipped in model.safetensors while it is down: it must fall back to
the previous one). At the end: every good file trained exactly once (trace.jsonl), every poison file in failed/
with its reason, the daemon up, no temp debris. Seeded: the same --seed makes the same choices.

    .venv/bin/python bench/soak.py --minutes 30 --seed 1     # figures on stdout; exit 1 if anything was lost
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny import make_model_dir  # noqa: E402

from evertrain.observe import trace  # noqa: E402
from evertrain.train import checkpoint

SETTINGS = ("--batch-size", "4", "--no-packing", "--trace", "--held-out-fraction", "0", "--stable-seconds", "2",
            "--poll-seconds", "0.1", "--disk-margin-bytes", "0", "--status-interval", "0.2", "--save-steps", "3",
            "--keep-checkpoints", "2", "--learning-rate", "1e-3", "--warmup-steps", "0", "--max-length", "128",
            # A poison file that does not end in a clean line looks like one still being written: it is validated
            # (and failed) after incomplete_timeout; 10 s instead of 10 minutes keeps the soak's drain short.
            "--incomplete-timeout", "10")
# What happens next, and how often (weights).
ACTIONS = {"good": 40, "poison": 14, "slow-rename": 8, "slow-append": 8, "kill-9": 9, "sigterm": 7,
           "disk-full": 7, "corrupt-newest": 7}
POISON = ("invalid-json", "nested", "empty", "binary")


def fill(disk: Path, leave: int, name: str = "filler") -> Path:
    """Take the room of `disk` but `leave` bytes (all of it, if the daemon writes meanwhile) with a new file."""
    filler = disk / name
    want = max(0, shutil.disk_usage(disk).free - leave)
    try:
        with open(filler, "wb", buffering=0) as f:  # unbuffered: no flush at close to fail
            while want > 0:
                want -= f.write(b"\0" * min(want, 1 << 20))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    return filler


def lines_of(tag: str, n: int) -> str:
    return "".join(json.dumps({"text": f"{tag} line {i}: " + "ab " * (i % 5 + 1)}) + "\n" for i in range(n))


class Soak:
    def __init__(self, work: Path, seed: int, minutes: float):
        self.work, self.rng, self.minutes = work, random.Random(seed), minutes
        self.disk = work / "disk"
        self.ws = self.disk / "ws"
        self.log = work / "daemon.log"
        self.good: dict[str, int] = {}      # original name -> lines
        self.poison: dict[str, str] = {}    # original name -> kind
        self.faults: Counter = Counter()    # every event, files and faults, by kind
        self.writers: list[threading.Thread] = []
        self.proc: subprocess.Popen | None = None
        self.real_disk = False
        self.serial = 0

    # ------------------------------------------------------------------------------------- the daemon
    def evertrain(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evertrain", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    def start(self, fault: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "EVERTRAIN_FAULT"}
        if fault:
            env["EVERTRAIN_FAULT"] = fault
        with open(self.log, "a") as out:
            out.write(f"--- soak: daemon start{' with ' + fault if fault else ''}\n")
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "evertrain", "run", str(self.ws)], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict:
        try:
            return json.loads((self.ws / "status" / "training_status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def started(self, timeout: float = 180) -> None:
        """Until the daemon of this life has written its status (it loaded a checkpoint and reconciled)."""
        end = time.monotonic() + timeout
        while self.status().get("pid") != self.proc.pid:
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: the daemon exited by itself with {self.proc.returncode}; see {self.log}")
            if time.monotonic() > end:
                raise SystemExit(f"soak: the daemon did not start within {timeout} s; see {self.log}")
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------- the files
    def name(self, kind: str) -> str:
        self.serial += 1
        return f"{self.serial:05d}-{kind}.jsonl"

    def put(self, name: str, data: bytes) -> None:
        """The documented safe way: write beside the inbox, then rename into it."""
        staged = self.ws / f".staging-{name}"
        staged.write_bytes(data)
        os.rename(staged, self.ws / "inbox" / name)

    def drop_good(self) -> None:
        name, n = self.name("good"), self.rng.randint(3, 40)
        self.put(name, lines_of(name, n).encode())
        self.good[name] = n

    def drop_poison(self) -> None:
        kind = self.rng.choice(POISON)
        name = self.name(kind)
        data = {"invalid-json": lines_of(name, 5) + '{"text": broken\n',
                "nested": '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
                "empty": "",
                "binary": None}[kind]
        self.put(name, self.rng.randbytes(4096) if data is None else data.encode())
        self.poison[name] = kind

    def slow(self, kind: str) -> None:
        """A writer in a thread: pieces over seconds, into a hidden name then a rename, or appended in place with
        pauses shorter than stable_seconds."""
        name, n = self.name(kind), self.rng.randint(10, 60)
        text, pieces, pause = lines_of(name, n), self.rng.randint(3, 8), self.rng.uniform(0.05, 0.3)
        cut = sorted(self.rng.sample(range(1, len(text)), pieces - 1))
        parts = [text[a:b] for a, b in zip([0, *cut], [*cut, len(text)])]
        self.good[name] = n

        def write():
            target = self.ws / "inbox" / (f".{name}" if kind == "slow-rename" else name)
            with open(target, "a") as f:
                for part in parts:
                    f.write(part)
                    f.flush()
                    time.sleep(pause)
            if kind == "slow-rename":
                os.rename(target, self.ws / "inbox" / name)

        t = threading.Thread(target=write, daemon=True)
        t.start()
        self.writers.append(t)

    def writers_done(self) -> None:
        for t in self.writers:
            t.join()
        self.writers.clear()

    # ------------------------------------------------------------------------------------- the faults
    def kill_9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.start()
        self.started()

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(300)
        if rc != 0:
            raise SystemExit(f"soak: SIGTERM: the daemon exited with {rc}; see {self.log}")
        self.start()
        self.started()

    def disk_full(self) -> None:
        self.writers_done()  # the writers' files live on the same disk
        if not self.real_disk:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.start(fault="enospc:checkpoint-write")
            self.started()
            return
        self.drop_good()  # a file to train while the room goes: the disk fills under a step or a checkpoint
        end = time.monotonic() + 30
        while self.status().get("state") not in ("preparing", "training") and time.monotonic() < end:
            time.sleep(0.02)
        filler = fill(self.disk, self.rng.randint(0, 96 << 10))
        time.sleep(self.rng.uniform(2, 8))  # the disk stays full for a while: whatever the daemon was doing
        filler.unlink()

    def corrupt_newest(self) -> bool:
        """While the daemon is down, flip bytes inside the newest checkpoint's weights (never the last good one)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        model_dir = self.ws / "current_model"
        good = [c for c in checkpoint.candidates(model_dir) if checkpoint.verify(c) is None]
        flipped = len(good) >= 2
        if flipped:
            weights = good[0].path / "model.safetensors"
            with open(weights, "r+b") as f:
                size = weights.stat().st_size
                f.seek(self.rng.randint(size // 2, size - 16))
                f.write(self.rng.randbytes(8))
        self.start()
        self.started()
        return flipped

    # ------------------------------------------------------------------------------------- the run
    def setup(self, model: Path) -> None:
        self.disk.mkdir(parents=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(self.disk)],
                                 capture_output=True)
        self.real_disk = mounted.returncode == 0
        done = self.evertrain("init", self.ws, "--model", model, *SETTINGS)
        if done.returncode:
            raise SystemExit(f"soak: init failed: {done.stderr}")
        self.start()
        self.started()

    def run(self) -> None:
        end = time.monotonic() + self.minutes * 60
        kinds, weights = list(ACTIONS), list(ACTIONS.values())
        while time.monotonic() < end:
            time.sleep(self.rng.uniform(0.5, 5))
            action = self.rng.choices(kinds, weights)[0]
            if not self.up():
                raise SystemExit(f"soak: the daemon exited by itself with {self.proc.returncode}; see {self.log}")
            if action == "good":
                self.drop_good()
            elif action == "poison":
                self.drop_poison()
            elif action.startswith("slow"):
                self.slow(action)
            elif action == "kill-9":
                self.kill_9()
            elif action == "sigterm":
                self.sigterm()
            elif action == "disk-full":
                self.disk_full()
            elif action == "corrupt-newest":
                if not self.corrupt_newest():
                    action = "kill-9"  # fewer than two good checkpoints: a kill all the same, nothing flipped
            self.faults[action] += 1

    def drain(self, timeout: float) -> None:
        """Until every dropped file has ended (done or failed) and the daemon is idle with an empty inbox."""
        self.writers_done()
        names = set(self.good) | set(self.poison)
        end = time.monotonic() + timeout
        while True:
            if not self.up():
                raise SystemExit(f"soak: the daemon exited by itself with {self.proc.returncode}; see {self.log}")
            rows = self.rows()
            ended = {n for n, r in rows.items() if r["state"] in ("done", "failed")}
            if names <= ended and not any(r["state"] in ("queued", "training") for r in rows.values()) \
                    and self.status().get("state") == "idle" and not list((self.ws / "inbox").iterdir()):
                return
            if time.monotonic() > end:
                left = sorted(names - ended)
                where = "; ".join(f"{n}: " + (f"{rows[n]['state']} ({rows[n].get('error')})" if n in rows else
                                              "no ledger row") for n in left[:5])
                raise SystemExit(f"soak: {len(left)} file(s) never ended within {timeout} s: {where}\n"
                                 f"inbox: {sorted(p.name for p in (self.ws / 'inbox').iterdir())}\n"
                                 f"status: {self.status()}\nthe daemon's log ends:\n"
                                 + "\n".join(self.log.read_text(errors="replace").splitlines()[-60:]))
            time.sleep(0.2)

    def rows(self) -> dict[str, dict]:
        db = sqlite3.connect(self.ws / "ledger.sqlite", timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return {r["original_name"]: dict(r) for r in db.execute("SELECT * FROM files")}
        finally:
            db.close()

    def verdict(self) -> dict:
        rows, model_dir = self.rows(), self.ws / "current_model"
        tr = model_dir / "trace.jsonl"
        coverage = trace.coverage(tr)
        steps = [r["step"] for r in trace.read(tr) if "step" in r]
        lost = doubled = 0
        for name, n in self.good.items():
            row = rows.get(name)
            counts = coverage.get(row["sha256"], Counter()) if row else Counter()
            if not row or row["state"] != "done":
                lost += n
                continue
            lost += sum(1 for i in range(n) if counts[i] == 0)
            doubled += sum(c - 1 for c in counts.values() if c > 1)
        poison_ok = sum(1 for name in self.poison if rows.get(name, {}).get("state") == "failed"
                        and (self.ws / "failed" / f"{rows[name]['name']}.error.txt").read_text().strip())
        debris = [p.name for folder in (model_dir, self.ws / "status", self.ws / "queue")
                  for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-", ".copying-"))
                  or (p.name.startswith(".") and p.name.endswith(".tmp"))]
        log = self.log.read_text()
        return {"good_files": len(self.good), "good_lines": sum(self.good.values()), "poison_files": len(self.poison),
                "poison_failed_with_reason": poison_ok, "lost_lines": lost, "doubled_lines": doubled,
                "trace_steps_unbroken": steps == list(range(1, len(steps) + 1)), "global_steps": len(steps),
                "daemon_up": self.up(), "debris": debris, "tracebacks": log.count("Traceback"),
                "files_sent_back_by_a_full_disk": log.count("it goes back to the queue at its last checkpoint"),
                "files_held_by_a_low_disk": log.count("evertrain: disk low:"),
                "starts_past_a_damaged_checkpoint": log.count("evertrain: skipping ")}

    def close(self) -> int:
        rc = None
        if self.up():
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(300)
        if self.real_disk:
            subprocess.run(["umount", "-l", str(self.disk)])
        return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long files and faults keep coming")
    ap.add_argument("--seed", type=int, default=None, help="the choices' seed (default: a random one, printed)")
    ap.add_argument("--drain-minutes", type=float, default=15.0, help="the most the queue may take to empty after")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"soak: seed {seed}, {args.minutes:g} minutes", flush=True)
    work = Path(tempfile.mkdtemp(prefix="evertrain-soak-"))
    soak = Soak(work, seed, args.minutes)
    t0 = time.monotonic()
    try:
        soak.setup(make_model_dir(work / "model"))
        how = ("a 96 MB tmpfs: real full disks" if soak.real_disk
               else "no tmpfs: full disks by EVERTRAIN_FAULT=enospc:checkpoint-write")
        print(f"soak: workspace {soak.ws} ({how})", flush=True)
        soak.run()
        fed = time.monotonic() - t0
        soak.drain(args.drain_minutes * 60)
        figures = soak.verdict()
    finally:
        rc = soak.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures.update(seed=seed, minutes_fed=round(fed / 60, 1), minutes_total=round((time.monotonic() - t0) / 60, 1),
                   events=dict(sorted(soak.faults.items())), last_stop_exit=rc,
                   real_disk_full=soak.real_disk)
    print(json.dumps(figures, indent=1))
    ok = (figures["lost_lines"] == 0 and figures["doubled_lines"] == 0 and figures["trace_steps_unbroken"]
          and figures["daemon_up"] and not figures["debris"] and figures["tracebacks"] == 0 and rc == 0
          and figures["poison_failed_with_reason"] == figures["poison_files"])
    print(f"soak: {'PASS' if ok else 'FAIL'}" + ("" if not args.keep else f" (work folder {work})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
