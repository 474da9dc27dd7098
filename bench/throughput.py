"""Throughput of `evertrain train` against a bare PyTorch loop, and the padding that packing saves.

Both train the same small Llama (hidden 256, 4 layers, byte tokenizer; built in code) on exactly the same batches:
the bare loop replays evertrain's own data order (FileData.step_rows) through data.packing.collate, with every batch
built before its clock starts, and does forward, backward, AdamW step, nothing else. evertrain runs through its
real CLI (`evertrain.cli.main`), its speed read from the per-step times in metrics.jsonl. Both skip the first
step (allocation warm-up); the two alternate for several rounds, and the median step rates over all rounds are
compared, which a busy machine disturbs less than totals do. The per-step losses of the two must agree: the
proof that the batches and the math were the same.

`--case smollm2` does the same on the embedded SmolLM2-135M-Instruct (the default model) and generated chats
(bench/data_scale.py's), packed into rows of 512 tokens, batch 4; evertrain there turns its guard off with the
documented switch (`--forgetting-action off --no-anchor-replay`, so no anchor set is made) and `--replay-fraction
0`, and keeps its held-out slices and snapshots: the case where issue 23 found the guard's cost.

With `--processes N` it also trains the same file under `accelerate launch` with N processes, once with DDP and
once with FSDP2 (gloo on a machine without CUDA), batch size divided by N so the global batch and the losses
stay the same, and reports each whole-run rate against the 1-process evertrain run of the same round.

    python bench/throughput.py [--rounds 5] [--examples 600] [--processes 2]
    python bench/throughput.py --case smollm2       # 48 chats, 2 rounds (--rounds, --examples): ~9 min on 2 cores
    python bench/throughput.py --case smollm2 --model tiny --examples 12 --rounds 1    # its smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from data_scale import write_chat_file  # noqa: E402  (seeded chats, as in the data benchmark)
from tiny import make_model_dir  # noqa: E402

from evertrain import cli, data, exits, models  # noqa: E402
from evertrain.data.packing import collate  # noqa: E402
from evertrain.config import TrainConfig  # noqa: E402

WORDS = ("river stone lamp quiet orbit paper seven garden copper window falcon maple signal harbor violet "
         "engine lantern meadow cobalt thistle").split()
# Settings shared by both sides; no clipping and no warmup so the bare loop's "forward, backward, AdamW" is
# the same math. --model is added at run time.
OPTIONS = {"batch_size": 8, "max_length": 512, "learning_rate": 3e-4, "warmup_steps": 0, "max_grad_norm": 0.0,
           "epochs": 1, "seed": 42}


def write_mixed_file(path: Path, n: int, seed: int = 0) -> None:
    """Plain-text examples whose lengths spread log-uniformly from a few words to most of a row."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = int(round(2 ** rng.uniform(2, 6.3)))  # 4 to ~80 words: ~25 to ~500 bytes
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def tiny_model(work: Path) -> Path:
    return make_model_dir(work / "model", hidden=256, layers=4)


# Each case: its model, its file, the settings of both sides, and what evertrain turns off so that it trains
# the very rows the bare loop does (none of the default replay, no anchor set to build).
CASES = {
    "tiny": {"model": tiny_model, "write": write_mixed_file, "examples": 600, "rounds": 5,
             "options": OPTIONS,
             "evertrain": ["--replay-fraction", "0", "--no-anchor-replay", "--anchor-size", "0"]},
    # The default learning rate: 3e-4 without warmup or clipping is a lot for a pretrained model.
    "smollm2": {"model": lambda work: Path(models.resolve_model(None)), "write": write_chat_file, "examples": 48,
                "rounds": 2, "options": {**OPTIONS, "batch_size": 4, "learning_rate": 5e-5},
                "evertrain": ["--replay-fraction", "0", "--no-anchor-replay", "--forgetting-action", "off"]},
}


def step_rates(tokens: list[int], stamps: list[float]) -> list[float]:
    """Tokens per second of steps 2..N, each from the end of the step before to its own end (so whatever a
    loop does between steps counts); step 1 pays the allocator's warm-up on both sides."""
    return [n / (b - a) for n, a, b in zip(tokens[1:], stamps, stamps[1:])]


def whole_rate(tokens: list[int], stamps: list[float]) -> float:
    """Tokens per second of steps 2..N taken together: rare costs between steps (snapshots) count in full."""
    return sum(tokens[1:]) / (stamps[-1] - stamps[0])


def run_evertrain(case: dict, dataset: Path, model_dir: Path, work: Path, processes: int = 1,
                  fsdp: bool = False) -> tuple[float, list[float]]:
    out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    options = case["options"]
    argv = ["train", "--dataset", str(dataset), "--output-dir", str(out), "--model", str(model_dir),
            "--packing", "--save-steps", "0", "--log-steps", "1000", *case["evertrain"]]
    for key, value in {**options, "batch_size": options["batch_size"] // processes}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if processes == 1:
        code = cli.main(argv)
    else:
        import os
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD", "LOCAL_"))}
        kind = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
        code = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", *kind,
                               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "evertrain", *argv],
                              env=env, capture_output=True).returncode
    if code != exits.OK:
        raise SystemExit(f"evertrain train ({processes} process(es)) failed with exit code {code}")
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    tokens, stamps = [r["tokens"] for r in records], [r["time"] for r in records]
    shutil.rmtree(out)  # a SmolLM2 run's checkpoint and optimizer state: 1.6 GB
    return step_rates(tokens, stamps), [r["loss"] for r in records], whole_rate(tokens, stamps)


def planned_batches(dataset: Path, tokenizer, config: TrainConfig) -> tuple[data.FileData, list]:
    """evertrain's batches for one epoch, in its order, as (batch tensors, target tokens, tokens)."""
    fd = data.load_file(dataset, tokenizer, config)
    G, batches = config.batch_size, []
    for step in range(fd.total_steps(G, config.epochs)):
        rows = fd.step_rows(step, G, config.seed)
        examples = [fd.examples[i] for r in rows for i in fd.rows[r]]
        batch = collate([[fd.examples[i] for i in fd.rows[r]] for r in rows], tokenizer.pad_token_id, "cpu")
        batches.append((batch, sum(e.target_tokens for e in examples), sum(len(e.input_ids) for e in examples)))
    return fd, batches


def run_bare(batches: list, model_dir: Path, options: dict) -> tuple[float, list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=options["learning_rate"], weight_decay=0.0)
    stamps, losses = [], []
    for batch, n_target, _ in batches:
        out = model(**batch, num_items_in_batch=n_target)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        stamps.append(time.time())
    tokens = [t for _, _, t in batches]
    return step_rates(tokens, stamps), losses, whole_rate(tokens, stamps)


def padding(dataset: Path, tokenizer, options: dict, packing: bool) -> tuple[float, int]:
    """Padding share of the batches evertrain trains (in its data order), and the number of rows."""
    config = TrainConfig(**{**options, "packing": packing})
    fd = data.load_file(dataset, tokenizer, config)
    order = [fd.rows[r] for s in range(fd.total_steps(config.batch_size, 1))
             for r in fd.step_rows(s, config.batch_size, config.seed)]
    return data.padding_fraction(order, [len(e.input_ids) for e in fd.examples], config.batch_size), len(fd.rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=tuple(CASES), default="tiny", help="tiny: a small Llama built in code on "
                   "plain texts; smollm2: the embedded SmolLM2-135M-Instruct on generated chats")
    p.add_argument("--rounds", type=int, help="alternating evertrain/bare pairs (tiny 5, smollm2 2)")
    p.add_argument("--examples", type=int, help="lines in the generated file (tiny 600 texts of mixed lengths, "
                   "smollm2 48 chats)")
    p.add_argument("--processes", type=int, default=1, help="also train under accelerate launch with this many")
    p.add_argument("--model", help="another model for the case: a folder, or tiny (the tiny case's Llama; for a "
                   "smoke run of the smollm2 case's file and settings)")
    args = p.parse_args()
    case = CASES[args.case]
    options, rounds = case["options"], args.rounds or case["rounds"]

    with tempfile.TemporaryDirectory(prefix="evertrain-bench-") as tmp:
        work = Path(tmp)
        model_dir = (tiny_model(work) if args.model == "tiny" else Path(args.model) if args.model
                     else case["model"](work))
        dataset = work / "data.jsonl"
        case["write"](dataset, args.examples or case["examples"])
        tokenizer = models.load_tokenizer(str(model_dir))  # as evertrain loads it
        fd, batches = planned_batches(dataset, tokenizer, TrainConfig(**options))
        print(f"bench ({args.case}, {model_dir.name}): {len(fd.examples)} examples, {fd.tokens} tokens, "
              f"{len(batches)} steps of {options['batch_size']} packed rows <= {options['max_length']} tokens, "
              f"evertrain with {' '.join(case['evertrain'])}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)

        ours, bare, whole, multi = [], [], [], {"DDP": [], "FSDP2": []}  # per-step tokens/s; whole-run ratios
        for k in range(rounds):
            ev_rates, ev_losses, ev_whole = run_evertrain(case, dataset, model_dir, work)
            bare_rates, bare_losses, bare_whole = run_bare(batches, model_dir, options)
            whole.append(ev_whole / bare_whole)
            diff = max(abs(a - b) for a, b in zip(ev_losses, bare_losses))
            if len(ev_losses) != len(bare_losses) or diff > 1e-3:
                raise SystemExit(f"the two loops did not train the same batches (loss differs by {diff})")
            ours += ev_rates
            bare += bare_rates
            for kind in (multi if args.processes > 1 else ()):
                _rates, mp_losses, mp_whole = run_evertrain(case, dataset, model_dir, work, args.processes,
                                                            fsdp=kind == "FSDP2")
                multi[kind].append(mp_whole / ev_whole)
                diff_mp = max(abs(a - b) for a, b in zip(ev_losses, mp_losses))
                print(f"round {k + 1}: {args.processes} processes ({kind}) whole run {mp_whole:,.0f} tok/s, ratio to "
                      f"one process {multi[kind][-1]:.3f}; losses agree within {diff_mp:.1e}", flush=True)
            ev, br = statistics.median(ev_rates), statistics.median(bare_rates)
            print(f"round {k + 1}: median step evertrain {ev:,.0f} tok/s, bare loop {br:,.0f} tok/s, "
                  f"ratio {ev / br:.3f}; whole run {ev_whole:,.0f} vs {bare_whole:,.0f} tok/s, ratio "
                  f"{whole[-1]:.3f}; per-step losses agree within {diff:.1e}", flush=True)

        on, rows_on = padding(dataset, tokenizer, options, packing=True)
        off, rows_off = padding(dataset, tokenizer, options, packing=False)
        ev, br = statistics.median(ours), statistics.median(bare)
        print(f"\nmedian over {len(ours)} steps each: evertrain train {ev:,.0f} tok/s, "
              f"bare PyTorch loop {br:,.0f} tok/s, ratio {ev / br:.3f} (target >= 0.95)")
        print(f"whole runs (snapshots, evaluations and all between-step work included): median ratio "
              f"{statistics.median(whole):.3f} over {len(whole)} rounds")
        for kind, ratios in multi.items():
            if ratios:
                print(f"{args.processes} processes ({kind}) against one process, whole runs: median ratio "
                      f"{statistics.median(ratios):.3f} over {len(ratios)} rounds ({torch.get_num_threads()} "
                      f"threads for one process; the launched processes share the same cores)")
        print(f"padding, batch {options['batch_size']}: packing on {on:.1%} ({rows_on} rows), "
              f"packing off {off:.1%} ({rows_off} rows)")


if __name__ == "__main__":
    main()
