"""Forgetting with and without replay: three files of clearly different data, trained in sequence.

Trains a small Llama (built in code, byte-level tokenizer) on three synthetic distributions, once with
replay_fraction 0 and once with 0.05, through the real `evertrain train`, and prints both forgetting matrices
side by side (and 0.25, to show the mechanism at a higher dose), plus how much each earlier file's held-out loss rose from right after its training to the end.

    .venv/bin/python bench/forgetting.py [--examples 400] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import make_model_dir  # noqa: E402

from evertrain.cli import main as evertrain  # noqa: E402
from evertrain.evals import forgetting_matrix, read_evals  # noqa: E402

WORDS = "apple river stone cloud maple ember frost harbor lantern meadow".split()


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"{a}+{b}=", "completion": str(a + b)}


def reversal(rng: random.Random) -> dict:
    w = rng.choice(WORDS) + rng.choice(WORDS)
    return {"prompt": f"reverse {w}:", "completion": w[::-1]}


def counting(rng: random.Random) -> dict:
    start, n = rng.randint(0, 20), rng.randint(3, 6)
    letter = rng.choice("xyz")
    return {"prompt": f"count {letter} from {start}:", "completion": " ".join(f"{letter}{i}" for i in range(start, start + n))}


def write(path: Path, make, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(n)))
    return path


def run(model: Path, files: list[Path], out: Path, replay: float, epochs: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    for f in files:
        code = evertrain(["train", "--dataset", str(f), "--output-dir", str(out), "--model", str(model),
                          "--batch-size", "16", "--learning-rate", "2e-3", "--warmup-steps", "10", "--epochs",
                          str(epochs), "--held-out-fraction", "0.1", "--replay-fraction", str(replay),
                          "--snapshot-budget", "0", "--no-packing", "--log-steps", "1000"])
        assert code == 0, f"training {f.name} failed with exit code {code}"
    return forgetting_matrix(read_evals(out)), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fractions", default="0,0.05,0.25", help="replay fractions to compare; the first is the baseline")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="evertrain-forgetting-"))
    model = make_model_dir(tmp / "model", hidden=64, layers=2)
    files = [write(tmp / f"{i + 1}-{fn.__name__}.jsonl", fn, a.examples, i) for i, fn in
             enumerate((arithmetic, reversal, counting))]
    results = {r: run(model, files, tmp / f"replay-{r}", r, a.epochs) for r in map(float, a.fractions.split(","))}

    names = [f.name for f in files]
    print(f"\nForgetting matrix (held-out loss; row = after training that file, column = evaluated file), "
          f"{a.examples} examples x {a.epochs} epochs per file")
    print(f"{'':>22}" + "".join(f"{'replay ' + str(r):>33}" for r in results))
    print(f"{'after':>22}" + ("".join(f"{n.split('-')[1][:9]:>11}" for n in names)) * len(results))
    for i, name in enumerate(names):
        row = "".join(f"{x:11.3f}" if x is not None else f"{'-':>11}" for r in results for x in results[r][0]["rows"][i]["cells"])
        print(f"{name:>22}{row}")
    print("\nRise of each earlier file's loss from right after its training to the end (lower = less forgetting),")
    print("and as a ratio to the first column's rise:")
    for j, name in enumerate(names[:-1]):
        rises = [results[r][0]["rows"][-1]["cells"][j] - results[r][0]["rows"][j]["cells"][j] for r in results]
        print(f"  {name:<20}" + "".join(f"  replay {r}: {x:+.3f} ({x / rises[0]:.2f}x)" for r, x in zip(results, rises)))
    print("\nwall time: " + ", ".join(f"replay {r}: {results[r][1]:.0f} s" for r in results))


if __name__ == "__main__":
    main()
