"""How long training waits for its checkpoints: written in step (overlap_checkpoints off) against written by a
thread from a CPU copy while training goes on (on), each against the same run with no checkpoint mid-file.

One small Llama (hidden 512, 8 layers, byte tokenizer; built in code, about 25 M parameters: a checkpoint of
weights and AdamW moments of some 300 MB) trains one file through the real CLI three ways per round, in turn:
no mid-file checkpoint (the baseline), a checkpoint every `--save-steps` written in step, and the same written
overlapped. Training time is the sum of the gaps between steps in metrics.jsonl (the end-of-file checkpoint,
the same for all three, is outside it); a mode's stall is its training time over the baseline's, minus one,
the median over the rounds. On a GPU the copy is a device-to-host transfer and the thread's work does not share
the cores that compute; here it does, so these figures are a floor for what overlapping saves.

    python bench/checkpoint_stall.py [--rounds 3] [--steps 40] [--save-steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny import make_model_dir  # noqa: E402

from evertrain import checkpoint, cli  # noqa: E402


def train_seconds(model: Path, data: Path, out: Path, save_steps: int, overlap: str) -> float:
    code = cli.main(["train", "--dataset", str(data), "--output-dir", str(out), "--model", str(model),
                     "--batch-size", "4", "--no-packing", "--max-length", "128", "--held-out-fraction", "0",
                     "--snapshot-budget", "0", "--replay-fraction", "0", "--no-anchor-replay", "--anchor-size", "0",
                     "--log-steps", "1000", "--keep-checkpoints", "2", "--save-steps", str(save_steps),
                     "--overlap-checkpoints", overlap])
    if code != 0:
        raise SystemExit(f"evertrain train exited {code}")
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step" in r and "time" in r]
    return sum(b["time"] - a["time"] for a, b in zip(records, records[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of the file")
    p.add_argument("--save-steps", type=int, default=5, help="the mid-file checkpoint interval")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evertrain-bench-stall-"))
    model = make_model_dir(work / "model", hidden=512, layers=8)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"example {i}: " + "lorem ipsum dolor sit amet " * 4}) + "\n"
                            for i in range(args.steps * 4)))
    stalls: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.rounds):
        base = train_seconds(model, data, work / f"base-{r}", 0, "off")
        for mode in ("off", "on"):
            t = train_seconds(model, data, work / f"{mode}-{r}", args.save_steps, mode)
            stalls[mode].append(t / base - 1)
            print(f"round {r + 1}: {mode:>3}: {t:.1f} s of training against {base:.1f} s with no mid-file "
                  f"checkpoint: stall {t / base - 1:+.1%}", flush=True)
    size = checkpoint.folder_size(checkpoint.newest_complete(work / "on-0").path)
    off, on = statistics.median(stalls["off"]), statistics.median(stalls["on"])
    print(f"\n{args.steps} steps, a checkpoint of {size / 1e6:.0f} MB every {args.save_steps} steps "
          f"({args.steps // args.save_steps - 1} mid-file), median of {args.rounds} rounds:")
    print(f"  written in step:   stall {off:+.1%} of training time")
    print(f"  written overlapped: stall {on:+.1%} of training time"
          + (f" ({on / off:.2f}x the in-step stall)" if off > 0 else ""))


if __name__ == "__main__":
    main()
