"""How long training waits for its checkpoints: written in step (overlap_checkpoints off) against written by a
thread from a CPU copy while training goes on (on), each against the same run with no checkpoint mid-file.

One small Llama (hidden 512, 8 layers, byte tokenizer; built in code, about 25 M parameters: a checkpoint of
weights and AdamW moments of some 300 MB) trains one file through the real CLI three ways per round, in turn:
no mid-file checkpoint (the baseline), a checkpoint every `--save-steps` written in step, and the same written
overlapped. Two figures per mode, medians over the rounds: the stall, how long training stood still at the
checkpoint steps (each gap after a checkpoint step beyond the run's median gap) as a share of training time;
and the training time (the sum of the gaps between steps in metrics.jsonl; the end-of-file checkpoint, the
same for all three, is outside it) against the baseline's, which also holds the cost of a thread that shares
the cores. On a GPU the copy is a device-to-host transfer and the thread does not share the cores that
compute; here, on 2 CPU cores, it does.

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

from evertrain import cli  # noqa: E402
from evertrain.train import checkpoint


def train(model: Path, data: Path, out: Path, save_steps: int, overlap: str) -> tuple[float, float]:
    """(training seconds, seconds training stood still at the checkpoint steps) of one run."""
    code = cli.main(["train", "--dataset", str(data), "--output-dir", str(out), "--model", str(model),
                     "--batch-size", "4", "--no-packing", "--max-length", "128", "--held-out-fraction", "0",
                     "--snapshot-budget", "0", "--replay-fraction", "0", "--no-anchor-replay", "--anchor-size", "0",
                     "--log-steps", "1000", "--keep-checkpoints", "2", "--save-steps", str(save_steps),
                     "--overlap-checkpoints", overlap])
    if code != 0:
        raise SystemExit(f"evertrain train exited {code}")
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step" in r and "time" in r]
    gaps = {b["step"]: b["time"] - a["time"] for a, b in zip(records, records[1:])}
    typical = statistics.median(gaps.values())
    # a checkpoint at step s is taken after step s's line: the gap before step s + 1 holds its wait
    waits = sum(max(0.0, g - typical) for step, g in gaps.items() if save_steps and (step - 1) % save_steps == 0)
    return sum(gaps.values()), waits


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
    waits: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.rounds):
        base, _ = train(model, data, work / f"base-{r}", 0, "off")
        for mode in ("off", "on"):
            t, waited = train(model, data, work / f"{mode}-{r}", args.save_steps, mode)
            stalls[mode].append(t / base - 1)
            waits[mode].append(waited / t)
            print(f"round {r + 1}: {mode:>3}: {t:.1f} s of training against {base:.1f} s with no mid-file "
                  f"checkpoint ({t / base - 1:+.1%}); training stood still {waited:.1f} s at the checkpoint "
                  f"steps ({waited / t:.1%})", flush=True)
    size = checkpoint.folder_size(checkpoint.newest_complete(work / "on-0").path)
    print(f"\n{args.steps} steps, a checkpoint of {size / 1e6:.0f} MB every {args.save_steps} steps "
          f"({args.steps // args.save_steps - 1} mid-file), median of {args.rounds} rounds:")
    for mode, what in (("off", "written in step"), ("on", "written overlapped")):
        print(f"  {what:>18}: training time {statistics.median(stalls[mode]):+.1%} against no checkpoint; "
              f"stood still at the checkpoint steps {statistics.median(waits[mode]):.1%} of it")
    off, on = statistics.median(waits["off"]), statistics.median(waits["on"])
    if off > 0:
        print(f"  the overlapped stall is {on / off:.2f}x the in-step stall")


if __name__ == "__main__":
    main()
