"""evertrain on one GPU against the Hugging Face Trainer and a bare PyTorch loop, on the same packed data.

Self-contained: a model built in code with the shapes of Qwen2.5-0.5B or -1.5B and random weights, a byte-level
tokenizer, and synthetic texts of realistic lengths (log-normal, a few hundred to a few thousand tokens), so it
needs nothing from a hub. Each contender runs in a process of its own (clean GPU memory) on the same examples:
- evertrain: the real `evertrain train` (packing, the automatic attention kernel, bf16, fused AdamW), with its
  default checkpoint interval scaled to the run, so the checkpoint stall is measured too;
- the Trainer with its best packing (`DataCollatorWithFlattening`, the same attention kernel, bf16);
- a bare loop: forward, backward, fused AdamW on evertrain's own packed batches.
Printed: tokens/s (median over steps after the warm-up) and its ratio to the Trainer's, MFU (6 x parameters x
tokens/s against the card's dense bf16 peak), peak GPU memory, and the checkpoint stall as a share of training
time. BENCHMARKS.md records the figures with the device and the versions.

    python bench/gpu.py --model 1.5b --mode full        # on a GPU machine (about 10 minutes on an H100)
    python bench/gpu.py --model tiny --steps 6          # anywhere: the same code, tiny shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {  # Qwen2.5 configurations (hidden, layers, heads, kv heads, intermediate); vocabulary 151,936
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def build(work: Path, shape: str, n_examples: int, max_length: int, seed: int = 0) -> tuple[Path, Path]:
    import torch
    from tiny import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=max(4096, max_length), tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model_dir = work / f"qwen-{shape}"
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng, words = random.Random(seed), "river stone lamp quiet orbit paper seven garden copper window".split()
    data = work / "texts.jsonl"
    with open(data, "w") as f:
        for _ in range(n_examples):
            n_chars = int(min(max_length, max(64, rng.lognormvariate(6.3, 0.8))))  # median ~550 tokens
            text = ""
            while len(text) < n_chars:
                text += rng.choice(words) + " "
            f.write(json.dumps({"text": text[:n_chars]}) + "\n")
    return model_dir, data


def run_evertrain(args, model_dir: Path, data: Path, out: Path) -> dict:
    import torch

    from evertrain import cli

    argv = ["train", "--dataset", str(data), "--output-dir", str(out), "--model", str(model_dir),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--held-out-fraction", "0",
            "--snapshot-budget", "0", "--warmup-steps", "0", "--learning-rate", "1e-5", "--log-steps", "1000",
            "--save-steps", str(args.save_steps), "--keep-checkpoints", "1", "--" + args.mode,
            "--overlap-checkpoints", args.overlap_checkpoints, *(["--chunked-loss"] if args.chunked_loss else []),
            # the same rows as the Trainer and the bare loop: none of the default replay, no anchor set to build
            "--replay-fraction", "0", "--no-anchor-replay", "--anchor-size", "0"]
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"evertrain train exited {code}")
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
    tokens = [r["tokens"] for r in records[1:]]
    typical = statistics.median(gaps)
    saves = {r["step"] for r in records if args.save_steps and r["step"] % args.save_steps == 0}
    stall = sum(g - typical for g, r in zip(gaps, records) if r["step"] in saves and g > typical)
    return {"tokens_per_s": statistics.median(t / g for t, g in zip(tokens, gaps)), "steps": len(records),
            "stall_share": stall / sum(gaps), "peak_gb": peak_memory_gb(torch)}


def packed_batches(args, model_dir: Path, data: Path) -> list:
    """evertrain's own packed rows, in its order, as the bare loop's batches."""
    from evertrain import data as evdata
    from evertrain.config import TrainConfig
    from evertrain.data.packing import collate
    from evertrain.models import load_tokenizer

    config = TrainConfig(model=str(model_dir), batch_size=args.batch_size, max_length=args.max_length,
                         held_out_fraction=0.0)
    tok = load_tokenizer(str(model_dir))
    fd = evdata.load_file(data, tok, config)
    out = []
    for step in range(fd.total_steps(args.batch_size, 1)):
        rows = [[fd.examples[i] for i in fd.rows[r]] for r in fd.step_rows(step, args.batch_size, config.seed)]
        n = sum(e.target_tokens for row in rows for e in row)
        out.append((collate(rows, tok.pad_token_id, "cpu"), n, sum(len(e.input_ids) for row in rows for e in row)))
    return out


def run_bare(args, model_dir: Path, data: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from evertrain.models import attention_implementation

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attention_implementation("auto")).to(device)
    model = lora(args, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    rates = []
    for batch, n, tokens in packed_batches(args, model_dir, data):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, use_cache=False,
                         num_items_in_batch=n).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the step's end, as evertrain's loop reads its loss
        rates.append(tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.median(rates[1:]), "steps": len(rates), "peak_gb": peak_memory_gb(torch)}


def run_trainer(args, model_dir: Path, data: Path, out: Path) -> dict:
    import torch
    from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainerCallback,
                              TrainingArguments)

    from evertrain.models import attention_implementation, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    texts = [json.loads(x)["text"] for x in data.read_text().splitlines()]
    ds = [{"input_ids": tok(t)["input_ids"][:args.max_length]} for t in texts]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attention_implementation("auto"))
    model = lora(args, model)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(time.perf_counter())

    # rows per step like evertrain's: its packed rows hold about max_length tokens each
    per_step = max(1, args.batch_size * args.max_length // statistics.median(len(x["input_ids"]) for x in ds))
    targs = TrainingArguments(str(out), per_device_train_batch_size=int(per_step), num_train_epochs=1,
                              learning_rate=1e-5, bf16=torch.cuda.is_available(), save_strategy="no",
                              report_to=[], logging_steps=10_000, optim="adamw_torch_fused",
                              dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
                              remove_unused_columns=False)
    flatten, tokens = DataCollatorWithFlattening(), []

    def collate(features):  # each step's tokens, counted from the very batch the Trainer draws
        tokens.append(sum(len(f["input_ids"]) for f in features))
        return flatten(features)

    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    rates = [t / (b - a) for t, a, b in zip(tokens[1:], stamps, stamps[1:])]
    return {"tokens_per_s": statistics.median(rates), "steps": len(stamps), "peak_gb": peak_memory_gb(torch)}


def lora(args, model):
    if args.mode != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def peak_memory_gb(torch) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="1.5b")
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--examples", type=int, default=0, help="texts (default: enough for --steps steps)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--save-steps", type=int, default=0, help="evertrain's checkpoint interval (default: steps/3)")
    p.add_argument("--chunked-loss", action="store_true", help="evertrain's loss without the full logits")
    p.add_argument("--overlap-checkpoints", choices=("auto", "on", "off"), default="auto",
                   help="evertrain's checkpoints written while training goes on (default: auto, on a GPU)")
    p.add_argument("--one", choices=("evertrain", "trainer", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model == "tiny":
        args.max_length = min(args.max_length, 512)
    args.save_steps = args.save_steps or max(1, args.steps // 3)
    if args.one:  # a contender, in its own process
        model_dir, data = args.work / f"qwen-{args.model}", args.work / "texts.jsonl"
        run = {"evertrain": lambda: run_evertrain(args, model_dir, data, args.work / "ev"),
               "trainer": lambda: run_trainer(args, model_dir, data, args.work / "hf"),
               "bare": lambda: run_bare(args, model_dir, data)}[args.one]
        print("RESULT " + json.dumps(run()), flush=True)
        return

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="evertrain-gpu-") as tmp:
        work = Path(tmp)
        n = args.examples or args.steps * args.batch_size * max(1, args.max_length // 550)
        model_dir, _data = build(work, args.model, n, args.max_length)
        params = sum(t.numel() for t in __import__("safetensors.torch").torch.load_file(
            str(model_dir / "model.safetensors")).values())
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
        print(f"gpu bench: {args.model} ({params / 1e6:.0f}M parameters, {args.mode}), {n} texts, device {device}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
        results = {}
        for who in ("trainer", "bare", "evertrain"):
            cmd = [sys.executable, __file__, "--one", who, "--work", str(work), "--model", args.model,
                   "--mode", args.mode, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--save-steps", str(args.save_steps),
                   "--overlap-checkpoints", args.overlap_checkpoints,
                   *(["--chunked-loss"] if args.chunked_loss else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{who} failed:\n{proc.stderr[-3000:]}")
            results[who] = json.loads(line[7:])
        base = results["trainer"]["tokens_per_s"]
        for who, r in results.items():
            mfu = f", MFU {6 * params * r['tokens_per_s'] / peak:.1%}" if peak else ""
            mem = f", peak {r['peak_gb']:.1f} GiB" if r.get("peak_gb") is not None else ""
            stall = f", checkpoint stall {r['stall_share']:.1%} of training" if "stall_share" in r else ""
            print(f"{who:>9}: {r['tokens_per_s']:,.0f} tok/s, {r['tokens_per_s'] / base:.2f}x the Trainer{mfu}"
                  f"{mem}{stall} ({r['steps']} steps)", flush=True)


if __name__ == "__main__":
    main()
