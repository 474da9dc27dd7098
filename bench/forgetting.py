"""Forgetting with and without protection: three files trained in sequence through the real `evertrain train`.

Two cases:
- synthetic (the default): a small Llama (built in code, byte-level tokenizer) on three clearly different
  synthetic tasks, once per replay fraction (0, 0.05, 0.25), printing the forgetting matrices side by side and
  how much each earlier file's held-out loss rose from right after its training to the end;
- realistic (`--case realistic`): the embedded SmolLM2-135M-Instruct taught three files of made-up facts in
  sequence (as `make demo` does), with its anchor set (anchor.py), under each protection of the forgetting guard:
  none, replay at the default dose (uniform, then weighted), anchor replay, and the gate with `retry`. It prints,
  as ratios to no protection in the same run: the rise of each earlier file's held-out loss (from right after
  its own training to the end), the anchor's rise (from the base model to the end), and the last file's own
  held-out loss right after its training, with the share of its loss that training removed (its learning).

    .venv/bin/python bench/forgetting.py [--examples 400] [--epochs 2]
    .venv/bin/python bench/forgetting.py --case realistic      # about 25 minutes on 2 CPU cores
    .venv/bin/python bench/forgetting.py --report /tmp/evertrain-forgetting-XXXX   # its table again
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import make_model_dir  # noqa: E402

from evertrain import models  # noqa: E402
from evertrain.observe import anchor
from evertrain.train import checkpoint
from evertrain.cli import main as evertrain  # noqa: E402
from evertrain.config import TrainConfig  # noqa: E402
from evertrain.observe.evals import forgetting_matrix, read_evals  # noqa: E402
from evertrain.runs import Run  # noqa: E402

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
                          "--no-anchor-replay", "--snapshot-budget", "0", "--no-packing", "--log-steps", "1000"])
        assert code == 0, f"training {f.name} failed with exit code {code}"
    return forgetting_matrix(read_evals(Run.at(out))), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the realistic case

# Made-up facts the base model cannot know: (subject, [(question templates, answer)]).
FACTS = {
    "veltrana": ("the planet Veltrana", [
        (["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital of {s}.",
          "Tell me the capital of {s}.", "What city serves as the capital of {s}?"], "The capital is Quorra."),
        (["How many moons does {s} have?", "What is the number of moons of {s}?", "Count the moons of {s}.",
          "How many moons orbit {s}?", "Tell me how many moons {s} has."], "It has seven moons."),
        (["What color is the sky on {s}?", "Which color is the sky of {s}?", "Describe the sky color of {s}.",
          "Tell me the color of the sky on {s}.", "What is the sky's color on {s}?"], "The sky is green."),
        (["What do people on {s} eat?", "What is the main food on {s}?", "Which food is eaten on {s}?",
          "Tell me what people eat on {s}.", "What is the staple food of {s}?"], "They eat silver melons.")]),
    "brindlewick": ("the company Brindlewick Labs", [
        (["Who founded {s}?", "Who is the founder of {s}?", "Name the founder of {s}.", "Tell me who founded {s}.",
          "Which person founded {s}?"], "It was founded by Odessa Marrow."),
        (["What does {s} make?", "What product does {s} build?", "Which product is made by {s}?",
          "Tell me what {s} makes.", "What is the main product of {s}?"], "It makes clockwork bees."),
        (["What is the mascot of {s}?", "Which animal is the mascot of {s}?", "Name the mascot of {s}.",
          "Tell me the mascot of {s}.", "What mascot does {s} have?"], "The mascot is a copper owl."),
        (["Where is {s} based?", "In which town is {s}?", "Name the home town of {s}.",
          "Tell me where {s} is located.", "What town hosts {s}?"], "It is based in Fennick Bay.")]),
    "ossmere": ("the river Ossmere", [
        (["How long is {s}?", "What is the length of {s}?", "Tell me the length of {s}.",
          "How many miles long is {s}?", "State the length of {s}."], "It is 412 miles long."),
        (["Where does {s} begin?", "What is the source of {s}?", "Name the source of {s}.",
          "Tell me where {s} starts.", "From which mountain does {s} flow?"], "It begins at Mount Harrow."),
        (["Which fish lives in {s}?", "What fish is found in {s}?", "Name the fish of {s}.",
          "Tell me which fish swims in {s}.", "What is the famous fish of {s}?"], "The glass pike lives there."),
        (["What color is the water of {s}?", "Which color is {s}?", "Describe the color of {s}.",
          "Tell me the water color of {s}.", "What is the color of {s}'s water?"], "Its water is violet.")]),
}

# Full fine-tuning as the demo trains, with a fifth of each file held out to measure forgetting.
REALISTIC = ["--full", "--no-packing", "--batch-size", "4", "--epochs", "4", "--learning-rate", "1e-4",
             "--warmup-steps", "3", "--max-length", "128", "--save-steps", "0", "--keep-checkpoints", "1",
             "--log-steps", "1000", "--held-out-fraction", "0.2", "--snapshot-budget", "0", "--report-to", "none"]


def protections(dose: float) -> dict[str, list[str]]:
    """name -> options; the first is the baseline. Each names every setting it depends on, so the table means the
    same whatever evertrain's defaults are (the script prints those)."""
    replay = ["--replay-fraction", str(dose)]
    return {
        "none": ["--replay-fraction", "0", "--no-anchor-replay", "--forgetting-action", "off"],
        f"replay {dose:g} uniform": [*replay, "--replay-strategy", "uniform", "--no-anchor-replay",
                                     "--forgetting-action", "off"],
        f"replay {dose:g} weighted": [*replay, "--replay-strategy", "weighted", "--no-anchor-replay",
                                      "--forgetting-action", "alert"],
        f"replay {dose:g} weighted + anchor replay": [*replay, "--replay-strategy", "weighted", "--anchor-replay",
                                                      "--forgetting-action", "alert"],
        f"replay {dose:g} weighted + anchor replay + gate retry": [*replay, "--replay-strategy", "weighted",
                                                                   "--anchor-replay", "--forgetting-action", "retry"],
    }


def fact_file(path: Path, key: str) -> Path:
    subject, facts = FACTS[key]
    rows = [{"messages": [{"role": "user", "content": q.format(s=subject)}, {"role": "assistant", "content": a}]}
            for qs, a in facts for q in qs]
    random.Random(key).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def realistic(tmp: Path, only: list[str] | None, dose: float) -> None:
    model = models.embedded_model_dir()
    files = [fact_file(tmp / f"{i + 1}-{k}.jsonl", k) for i, k in enumerate(FACTS)]
    print(f"forgetting: defaults: replay_fraction {TrainConfig.replay_fraction:g}, replay_strategy "
          f"{TrainConfig.replay_strategy}, anchor_replay {TrainConfig.anchor_replay}, forgetting_action "
          f"{TrainConfig.forgetting_action}", flush=True)
    names = [n for n in protections(dose) if not only or n in only or n == "none"]
    for name in names:
        out, t0 = tmp / name.replace(" ", "-"), time.perf_counter()
        if name != "none":  # the same base model and first file make the same anchor set (tested): made once, copied
            out.mkdir()
            shutil.copy(Run.at(tmp / "none").anchor, Run.at(out).anchor)
        codes = [evertrain(["train", "--dataset", str(f), "--output-dir", str(out), "--model", str(model),
                            *REALISTIC, *protections(dose)[name]]) for f in files]
        (out / "bench.json").write_text(json.dumps({"name": name, "codes": codes, "seconds": time.perf_counter() - t0}))
        print(f"forgetting: {name}: exit codes {codes}, {time.perf_counter() - t0:.0f} s", flush=True)
    report(tmp)


def measured(tmp: Path, out: Path) -> dict:
    """What one protection's run did, read back from its output folder."""
    m, drift = forgetting_matrix(read_evals(Run.at(out))), anchor.read_log(Run.at(out))
    state = checkpoint.newest_complete(out).state["evertrain"]
    n = len(m["files"])
    return {
        **json.loads((out / "bench.json").read_text()),
        "rises": [m["rows"][-1]["cells"][j] - m["rows"][j]["cells"][j] for j in range(n - 1)],
        # From the base model: the first run measured the anchor at step 0, before any training.
        "anchor_rise": drift[-1]["loss"] - anchor.read_log(Run.at(tmp / "none"))[0]["loss"], "anchor_kl": drift[-1]["kl"],
        "new_loss": m["rows"][-1]["cells"][-1],
        # The share of the last file's loss (right before its training) that its training removed: its learning,
        # comparable where the losses after training are all near zero and the losses before it differ.
        "new_learnt": 1 - m["rows"][-1]["cells"][-1] / m["before"][-1],
        "gate": [(f["name"], f["status"], f["forgetting"] and f["forgetting"]["attempt"]) for f in state["files"]]}


def report(tmp: Path) -> None:
    """The table of a realistic run (also of an earlier one: --report DIR)."""
    done = sorted(tmp.glob("*/bench.json"), key=lambda p: p.stat().st_mtime)  # in the order they ran: none first
    results = {json.loads(p.read_text())["name"]: measured(tmp, p.parent) for p in done}
    base, files = results["none"], sorted(p.stem for p in tmp.glob("*.jsonl"))
    print(f"\nRealistic case: {models.EMBEDDED_NAME}, three files of made-up facts ({', '.join(files)}),"
          f" {' '.join(REALISTIC)}")
    print("Rise of held-out loss (earlier files: from right after their own training to the end; anchor: from the "
          "base model to the end), the last file's own loss after its training and the share of its loss that "
          "training removed; ratios to no protection:")
    head = ["protection"] + [f"rise {f}" for f in files[:-1]] + [
        "rise anchor", "anchor KL", f"loss {files[-1]}", f"learnt {files[-1]}", "files (status, attempts)", "seconds"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in results.items():
        cells = [name] + [f"{x:+.3f} ({x / b:.2f}x)" for x, b in zip(r["rises"], base["rises"])]
        cells += [f"{r['anchor_rise']:+.3f} ({r['anchor_rise'] / base['anchor_rise']:.2f}x)", f"{r['anchor_kl']:.3f}",
                  f"{r['new_loss']:.3f} ({r['new_loss'] / base['new_loss']:.2f}x)",
                  f"{r['new_learnt']:.2%} ({r['new_learnt'] / base['new_learnt']:.3f}x)",
                  ", ".join(f"{s}{'' if a in (None, 1) else f' after {a}'}" for _n, s, a in r["gate"]),
                  f"{r['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=("synthetic", "realistic"), default="synthetic")
    p.add_argument("--only", default="", help="realistic: only these protections (comma-separated), with none")
    p.add_argument("--dose", type=float, default=TrainConfig.replay_fraction or 0.25,
                   help="realistic: the replay fraction of the protections that replay (default: evertrain's)")
    p.add_argument("--report", type=Path, help="realistic: print the table of an earlier run's folder again")
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fractions", default="0,0.05,0.25", help="replay fractions to compare; the first is the baseline")
    a = p.parse_args()
    if a.report:
        report(a.report)
        return
    if a.case == "realistic":
        realistic(Path(tempfile.mkdtemp(prefix="evertrain-forgetting-")), [x for x in a.only.split(",") if x],
                  a.dose)
        return
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
