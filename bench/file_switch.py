"""How long from one file's last optimizer step to the next file's first step: the daemon vs. a fresh process.

The daemon (`evertrain run DIR --once`) keeps model, optimizer and schedule in memory between files; the old way
runs `evertrain train` once per file, so each file pays for Python start-up, imports and a model reload. Both
are read from metrics.jsonl (one record with a wall-clock time after every optimizer step), so both gaps include
the end-of-file checkpoint of the previous file and the compute of the next file's first step.

    python bench/file_switch.py                  # tiny model (5 files) and the embedded SmolLM2 (LoRA, 3 files)
    python bench/file_switch.py --only tiny --files 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def make_files(folder: Path, n_files: int, examples: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n_files):
        p = folder / f"day{k:02d}.jsonl"
        p.write_text("".join(json.dumps({"text": f"day {k} note {i}: " + "the quick brown fox " * (i % 4 + 1)}) + "\n"
                             for i in range(examples)))
        out.append(p)
    return out


def gaps(metrics: Path) -> tuple[list[float], float]:
    """Seconds between the last step of each file and the first step of the file after it; and the median
    seconds of one step inside a file (the part of a gap that is the next file's first step, not the switch)."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    switch, inside = [], []
    for a, b in zip(recs, recs[1:]):
        (switch if a["file"] != b["file"] else inside).append(b["time"] - a["time"])
    return switch, statistics.median(inside)


def run_daemon(files: list[Path], work: Path, options: list[str]):
    ws = work / "ws"
    subprocess.run([sys.executable, "-m", "evertrain", "init", str(ws), *options, "--stable-seconds", "0",
                    "--disk-margin-bytes", "0"], check=True, capture_output=True)
    for f in files:
        (ws / "inbox" / f.name).write_bytes(f.read_bytes())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evertrain", "run", str(ws), "--once"], check=True, capture_output=True)
    return gaps(ws / "logs" / "metrics.jsonl"), time.perf_counter() - t0


def run_fresh(files: list[Path], work: Path, options: list[str]):
    out = work / "run"
    t0 = time.perf_counter()
    for f in files:
        subprocess.run([sys.executable, "-m", "evertrain", "train", "--dataset", str(f), "--output-dir", str(out),
                        *options], check=True, capture_output=True)
    return gaps(out / "logs" / "metrics.jsonl"), time.perf_counter() - t0


def bench(label: str, options: list[str], n_files: int, examples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="evertrain-bench-") as tmp:
        tmp = Path(tmp)
        files = make_files(tmp / "data", n_files, examples)
        (d_gaps, d_step), d_total = run_daemon(files, tmp / "daemon", options)
        (f_gaps, f_step), f_total = run_fresh(files, tmp / "fresh", options)
    row = {"model": label, "files": n_files, "daemon_gap_s": statistics.median(d_gaps),
           "fresh_gap_s": statistics.median(f_gaps), "step_s": statistics.median([d_step, f_step]),
           "daemon_total_s": d_total, "fresh_total_s": f_total}
    # The switch itself: the gap less one step of compute (the next file's first step).
    row["daemon_switch_s"] = max(0.0, row["daemon_gap_s"] - d_step)
    row["fresh_switch_s"] = max(0.0, row["fresh_gap_s"] - f_step)
    row["gap_ratio"] = row["fresh_gap_s"] / row["daemon_gap_s"]
    row["switch_ratio"] = row["fresh_switch_s"] / max(row["daemon_switch_s"], 1e-3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("tiny", "smollm2"))
    p.add_argument("--files", type=int, default=5, help="files for the tiny model")
    p.add_argument("--smollm2-files", type=int, default=3, help="files for SmolLM2 (each step is seconds on a CPU)")
    a = p.parse_args()
    common = ["--batch-size", "4", "--max-length", "128", "--no-packing", "--save-steps", "0", "--warmup-steps", "0"]
    rows = []
    if a.only in (None, "tiny"):
        from tiny import make_model_dir

        model = make_model_dir(Path(tempfile.mkdtemp(prefix="evertrain-bench-tiny-")))
        rows.append(bench("tiny (2 layers, full)", ["--model", str(model), "--full", *common], a.files, 24))
    if a.only in (None, "smollm2"):
        from evertrain import models

        models.embedded_model_dir()  # converted once into the cache, outside the timing
        rows.append(bench("SmolLM2-135M embedded (LoRA r16)", ["--lora", *common], a.smollm2_files, 8))
    print(f"{'model':34} {'one step':>9} {'gap daemon':>11} {'gap fresh':>10} {'ratio':>6} "
          f"{'switch daemon':>14} {'switch fresh':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:34} {r['step_s']:>8.3f}s {r['daemon_gap_s']:>10.3f}s {r['fresh_gap_s']:>9.3f}s "
              f"{r['gap_ratio']:>5.1f}x {r['daemon_switch_s']:>13.3f}s {r['fresh_switch_s']:>12.3f}s "
              f"{r['switch_ratio']:>5.1f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
