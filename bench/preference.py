"""Learning from judgments against TRL: DPO speed, memory and held-out rewards; SFT, DPO, KTO in one run.

Two cases (`--case dpo|continuous|both`), full fine-tuning in float32 on CPU, every contender in a process of its
own (so its peak RSS, VmHWM, is its own):
- dpo: the same preference pairs, in the same order and the same batches, through `evertrain train` and TRL's
  `DPOTrainer`, with equal settings (beta, learning rate, batch, max length, float32, no warmup, a constant
  learning rate, clipping at 1.0, no gradient checkpointing, one epoch, hence the same optimizer steps). Rounds
  alternate evertrain, TRL, evertrain, TRL... and report per round: tokens/s (the median step, and the whole
  training: from the start of the reference pass, which evertrain makes once before its first step, to the end of
  the last step), peak memory, held-out reward accuracy and margin. Goal: at least 1.3x TRL's tokens/s at equal
  held-out accuracy (within 0.02), with less memory than TRL (which keeps a second model as its reference).
- continuous: a file of demonstrations (SFT), a file of pairs (DPO) and a file of rated answers (KTO) into one
  evertrain run (three `evertrain train` commands on one output folder, each a process), against three TRL jobs
  (SFTTrainer, DPOTrainer, KTOTrainer, each a process starting from the last one's output): wall time of the
  three, peak memory, and the final model's held-out numbers on all three files.

The data are generated (deterministic): sums asked in several phrasings, whose preferred answers state the right
sum in one fixed sentence, and whose other answers state a wrong sum, half of them in a hedging style. Held-out
records (sums never trained) are never given to either tool. The bench evaluates both final models itself, with
one function: a reward is beta * (log-probability under the model - log-probability under the base model), summed
over the answer's tokens as the chat template renders them; the held-out SFT loss is the mean negative
log-probability of the answers' tokens. Tokens are counted by the bench once per pair (prompt and answer, for each
answer: the two sequences each tool runs), so both contenders' tokens/s divide the same counts.

    .venv/bin/python bench/preference.py                      # the embedded SmolLM2, both cases: about 15 minutes
    .venv/bin/python bench/preference.py --case dpo           # about 8 minutes on 2 idle CPU cores
    .venv/bin/python bench/preference.py --case continuous    # about 7 minutes on 2 idle CPU cores
    .venv/bin/python bench/preference.py --model tiny         # the tests' tiny random Llama: about 2 minutes
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
from tiny import make_model_dir  # noqa: E402

# SmolLM2's sizes aim at about 8 minutes per case on 2 idle CPU cores: about 6 s per step of 4 pairs (6 x 135M
# parameters x 478 tokens at the ~80 GFLOP/s bench/throughput.py reaches), plus each process's start. One step
# measured on 2 cores shared with other jobs (its first, with allocations) took forward and backward 18 s, AdamW
# 10 s, a reference forward 2 s: on a busy machine expect up to twice the time. The tiny model's sizes only
# prove that the bench runs end to end.
SIZES = {
    "smollm2": {"pairs": 20, "held_out": 24, "sft": 20, "kto": 20, "batch": 4, "rounds": 3, "lr": 2e-5},
    "tiny": {"pairs": 16, "held_out": 8, "sft": 16, "kto": 16, "batch": 4, "rounds": 2, "lr": 1e-3},
}
BETA, MAX_LENGTH = 0.1, 256
PHRASINGS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "How much is {a} plus {b}?",
             "What do you get when you add {a} to {b}?"]


# ------------------------------------------------------------------------------------------------- the data

def sums(n: int, seed: int) -> list[tuple[str, int, int]]:
    """n (question, a, b) with distinct (a, b): no held-out sum is ever trained."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((rng.choice(PHRASINGS).format(a=a, b=b), a, b))
    return out


def right(a: int, b: int) -> str:
    return f"The sum of {a} and {b} is {a + b}."


def wrong(a: int, b: int, rng: random.Random) -> str:
    """A wrong sum; half of them also hedge, a style the preferred answers never have."""
    c = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    return f"The sum of {a} and {b} is {c}." if rng.random() < 0.5 else f"Hmm, maybe {c}? I am not sure about that."


def user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def bot(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def datasets(size: dict, seed: int = 0) -> dict[str, tuple[list[dict], list[dict]]]:
    """name -> (trained records, held-out records), in TRL's conversational shapes (which evertrain reads too)."""
    rng = random.Random(seed)
    qs = sums(size["pairs"] + size["sft"] + size["kto"] + 3 * size["held_out"], seed)
    cut = [size["pairs"], size["sft"], size["kto"]] + [size["held_out"]] * 3
    parts, k = [], 0
    for n in cut:
        parts.append(qs[k:k + n])
        k += n
    pair = lambda q: {"prompt": user(q[0]), "chosen": bot(right(q[1], q[2])), "rejected": bot(wrong(q[1], q[2], rng))}
    demo = lambda q: {"prompt": user(q[0]), "completion": bot(right(q[1], q[2]))}

    def rated(i: int, q) -> dict:
        good = i % 2 == 0
        return {"prompt": user(q[0]), "completion": bot(right(q[1], q[2]) if good else wrong(q[1], q[2], rng)),
                "label": good}

    return {"pairs": ([pair(q) for q in parts[0]], [pair(q) for q in parts[3]]),
            "demos": ([demo(q) for q in parts[1]], [demo(q) for q in parts[4]]),
            "ratings": ([rated(i, q) for i, q in enumerate(parts[2])], [rated(i, q) for i, q in enumerate(parts[5])])}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------- tokens and the held-out evaluation (once)

def encode(tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[list[int], int]:
    """The tokens of prompt + answer as the chat template renders them, and where the answer starts (where the
    rendering of the prompt alone, generation prompt included, stops matching): TRL's split, used for both."""
    render = lambda m, g: tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                                    add_special_tokens=False)["input_ids"]
    p, full = render(prompt, True), render(prompt + answer, False)
    k = 0
    while k < min(len(p), len(full)) and p[k] == full[k]:
        k += 1
    return full, k


def pair_tokens(tokenizer, rec: dict) -> int:
    """What a pair costs either tool: prompt and chosen answer, prompt and rejected answer."""
    return sum(len(encode(tokenizer, rec["prompt"], rec[side])[0]) for side in ("chosen", "rejected"))


def answer_logps(model, tokenizer, items: list[tuple[list[dict], list[dict]]]) -> list[tuple[float, int]]:
    """(summed log-probability of the answer's tokens, their number) for each (prompt, answer)."""
    import torch

    out = []
    model.eval()
    for start in range(0, len(items), 8):
        enc = [encode(tokenizer, p, a) for p, a in items[start:start + 8]]
        width = max(len(ids) for ids, _ in enc)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in enc])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in enc])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (x, k) in enumerate(enc):
            tok = torch.tensor(x[k:])
            out.append((float(logps[row, k - 1:len(x) - 1].gather(-1, tok[:, None]).sum()), len(x) - k))
    return out


class HeldOut:
    """The held-out records of the files, each file's evaluated once under the base model (the reference of
    every reward here, for both contenders)."""

    def __init__(self, base_dir: str, held: dict[str, list[dict]]):
        self.base_dir, self.held, self.base = base_dir, held, {}

    def items(self, name: str) -> list[tuple[list[dict], list[dict]]]:
        rows = self.held[name]
        if name == "pairs":  # every chosen answer, then every rejected one
            return [(r["prompt"], r["chosen"]) for r in rows] + [(r["prompt"], r["rejected"]) for r in rows]
        return [(r["prompt"], r["completion"]) for r in rows]

    def logps(self, model_dir: str, names: list[str]) -> dict[str, list[tuple[float, int]]]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return {name: answer_logps(model, tokenizer, self.items(name)) for name in names}

    def numbers(self, model_dir: str, names: list[str]) -> dict[str, float]:
        """The held-out figures of the files `names` under the model in `model_dir`."""
        todo = [n for n in names if n not in self.base]
        if todo:
            self.base.update(self.logps(self.base_dir, todo))
        lp, out = self.logps(model_dir, names), {}
        reward = {n: [BETA * (x[0] - b[0]) for x, b in zip(lp[n], self.base[n])] for n in names}
        if "pairs" in names:
            n = len(self.held["pairs"])
            chosen, rejected = reward["pairs"][:n], reward["pairs"][n:]
            out["dpo_accuracy"] = sum(c > r for c, r in zip(chosen, rejected)) / n
            out["dpo_margin"] = statistics.fmean(c - r for c, r in zip(chosen, rejected))
        if "demos" in names:
            out["sft_loss"] = -sum(x for x, _ in lp["demos"]) / sum(t for _, t in lp["demos"])
        if "ratings" in names:
            labels = [r["label"] for r in self.held["ratings"]]
            rated = reward["ratings"]
            out["kto_accuracy"] = sum((x > 0) == g for x, g in zip(rated, labels)) / len(rated)
            out["kto_margin"] = (statistics.fmean(x for x, g in zip(rated, labels) if g)
                                 - statistics.fmean(x for x, g in zip(rated, labels) if not g))
        return out


# ------------------------------------------------------------------------ the contenders (each in a process)

def peak_kib() -> int:
    """This process's peak resident memory (VmHWM), in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_evertrain(spec: dict) -> dict:
    """`evertrain train` through its real CLI, once, in this process. The training clock starts where a file's
    reference pass starts (references.attach), so evertrain's one pass over all pairs counts like TRL's reference
    forward at every step."""
    from evertrain.cli import main as evertrain
    from evertrain.train import checkpoint, references

    marks, attach = [], references.attach

    def timed(*args, **kwargs):
        marks.append(time.time())
        return attach(*args, **kwargs)

    references.attach = timed  # loop.py calls it as references.attach
    code = evertrain(spec["argv"])
    out = Path(spec["argv"][spec["argv"].index("--output-dir") + 1])
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["time"] >= marks[-1]] if marks else []
    ckpt = checkpoint.newest_complete(out)
    return {"code": code, "start": marks[-1] if marks else None, "stamps": [r["time"] for r in records],
            "examples": [r["examples"] for r in records], "losses": [r["loss"] for r in records],
            "model": str(ckpt.path) if ckpt else None, "peak_kib": peak_kib()}


def child_trl(spec: dict) -> dict:
    """One TRL job (sft, dpo or kto) from spec["model"], its records in spec["data"] taken in file order, saved
    to spec["out"]. The training clock starts at the first step, or where the reference pass starts when TRL
    precomputes the reference."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    stamps, losses, begin, precompute = [], [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begin.append(time.time())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    kind, s = spec["kind"], spec["settings"]
    # Equal settings: float32 (TRL's configs default to bf16), no gradient checkpointing (TRL's default is on,
    # evertrain's off), a constant learning rate without warmup, the records in the order given, one epoch.
    common = dict(output_dir=spec["out"], per_device_train_batch_size=s["batch"], learning_rate=s["lr"],
                  num_train_epochs=1, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  weight_decay=0.0, optim="adamw_torch_fused", bf16=False, fp16=False, use_cpu=True,
                  max_length=MAX_LENGTH, gradient_checkpointing=s.get("trl_gradient_checkpointing", False),
                  save_strategy="no",
                  report_to=[], logging_steps=1, disable_tqdm=True, train_sampling_strategy="sequential",
                  model_init_kwargs={"dtype": "float32"}, seed=42)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    data = Dataset.from_list(rows)
    if kind == "sft":
        trainer = SFTTrainer(model=spec["model"], args=SFTConfig(packing=False, **common), train_dataset=data)
    else:
        judged = dict(beta=BETA, precompute_ref_log_probs=s.get("trl_precompute_ref", False))
        config_cls, trainer_cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (KTOConfig, KTOTrainer)

        class Timed(trainer_cls):
            def _precompute_ref_logps(self, *args, **kwargs):
                t0 = time.time()
                try:
                    return super()._precompute_ref_logps(*args, **kwargs)
                finally:
                    precompute.append(time.time() - t0)

        trainer = Timed(model=spec["model"], args=config_cls(**judged, **common), train_dataset=data)
    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(spec["out"])
    trainer.processing_class.save_pretrained(spec["out"])
    return {"code": 0, "start": begin[0] - sum(precompute[:1]), "stamps": stamps, "losses": losses,
            "model": spec["out"], "peak_kib": peak_kib()}


def run_child(kind: str, spec: dict) -> dict:
    """One contender in a fresh process: its result, with the wall time of the whole process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])})
    wall = time.perf_counter() - t0
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{kind} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(line[len("RESULT "):])
    if result["code"] != 0 or not result["model"]:
        raise SystemExit(f"{kind} failed with exit code {result['code']}:\n{proc.stderr[-5000:]}")
    return {**result, "wall": wall}


# ------------------------------------------------------------------------------------------------- the cases

def evertrain_argv(data: Path, out: Path, model: str, size: dict, extra: list[str]) -> list[str]:
    """The same work as TRL's: no replay, no anchor set, no held-out slice (the bench holds its own out), no
    packing (one pair per row: the same pairs per step), no snapshots, a checkpoint only at the file's end."""
    return ["train", "--dataset", str(data), "--output-dir", str(out), "--model", model, "--full",
            "--batch-size", str(size["batch"]), "--learning-rate", str(size["lr"]), "--max-length", str(MAX_LENGTH),
            "--beta", str(BETA), "--epochs", "1", "--warmup-steps", "0", "--lr-schedule", "constant",
            "--max-grad-norm", "1.0", "--weight-decay", "0", "--precision", "no", "--no-gradient-checkpointing",
            "--no-packing", "--replay-fraction", "0", "--no-anchor-replay", "--anchor-size", "0",
            "--held-out-fraction", "0", "--held-out-min-file", "0", "--snapshot-budget", "0", "--save-steps", "0",
            "--keep-checkpoints", "1", "--forgetting-action", "off", "--report-to", "none", "--log-steps", "1000",
            *extra]


def in_evertrain_order(path: Path, rows: list[dict], model: str, size: dict, out: Path) -> tuple[Path, list]:
    """The records as evertrain trains them (its seeded order, batch by batch), written for TRL to take in file
    order: both then train the same records in the same steps. Also the order itself (row numbers)."""
    from evertrain import models
    from evertrain.config import TrainConfig
    from evertrain.data import load_file

    config = TrainConfig(batch_size=size["batch"], max_length=MAX_LENGTH, packing=False, held_out_fraction=0.0,
                         held_out_min_file=0, epochs=1)
    fd = load_file(path, models.load_tokenizer(model), config)
    order = [fd.examples[i].line for s in range(fd.total_steps(config.batch_size, 1))
             for r in fd.step_rows(s, config.batch_size, config.seed) for i in fd.rows[r]]
    if sorted(order) != list(range(len(rows))):
        raise SystemExit(f"evertrain does not train every record of {path.name} once: {len(order)} of {len(rows)}")
    return write_jsonl(out, [rows[i] for i in order]), order


def rates(result: dict, step_tokens: list[int]) -> tuple[float, float]:
    """(median step tokens/s over steps 2..N, tokens/s of the whole training from its clock's start)."""
    from throughput import step_rates

    stamps = result["stamps"]
    if len(stamps) != len(step_tokens):
        raise SystemExit(f"{len(stamps)} steps trained, {len(step_tokens)} planned")
    first = sum(step_tokens) / (stamps[0] - result["start"])
    per_step = step_rates(step_tokens, stamps) if len(stamps) > 1 else [first]
    return statistics.median(per_step), sum(step_tokens) / (stamps[-1] - result["start"])


def case_dpo(work: Path, model: str, size: dict, rounds: int, held: HeldOut, flags: dict, extra: list[str]) -> dict:
    from transformers import AutoTokenizer

    train, _ = DATA["pairs"]
    pairs = write_jsonl(work / "pairs.jsonl", train)
    trl_file, order = in_evertrain_order(pairs, train, model, size, work / "pairs-trl.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model)
    per_pair = [pair_tokens(tokenizer, train[i]) for i in order]
    B = size["batch"]
    step_tokens = [sum(per_pair[k:k + B]) for k in range(0, len(per_pair), B)]
    print(f"dpo: {len(train)} pairs in {len(step_tokens)} steps of {B}, {sum(per_pair):,} tokens "
          f"(prompt + answer, both answers), {len(held.held['pairs'])} held-out pairs; beta {BETA}, learning rate "
          f"{size['lr']:g}, max length {MAX_LENGTH}, float32, {rounds} rounds", flush=True)
    runs = {"evertrain": [], "TRL": []}
    for k in range(rounds):
        for name in runs:
            out = work / f"dpo-{name}-{k}"
            if name == "evertrain":
                r = run_child("evertrain", {"argv": evertrain_argv(pairs, out, model, size, extra)})
            else:
                r = run_child("trl", {"kind": "dpo", "model": model, "data": str(trl_file), "out": str(out),
                                      "settings": {**size, **flags}})
            if name == "evertrain" and r["examples"] != [min(B, len(order) - s * B) for s in range(len(step_tokens))]:
                raise SystemExit(f"evertrain trained {r['examples']} pairs per step, not {B}")
            step, whole = rates(r, step_tokens)
            runs[name].append({"step": step, "whole": whole, "peak": r["peak_kib"] / 1024, "wall": r["wall"],
                               "losses": r["losses"], **held.numbers(r["model"], ["pairs"])})
            x = runs[name][-1]
            print(f"round {k + 1}: {name}: median step {step:,.0f} tok/s, whole training {whole:,.0f} tok/s, "
                  f"peak {x['peak']:,.0f} MiB, held-out accuracy {x['dpo_accuracy']:.3f} margin "
                  f"{x['dpo_margin']:.4f}, process {x['wall']:.0f} s", flush=True)
        ev, trl = runs["evertrain"][-1]["losses"], runs["TRL"][-1]["losses"]
        if len(ev) == len(trl):  # evidence that the same pairs trained in the same steps: the losses follow
            print(f"round {k + 1}: per-step losses differ by at most {max(abs(a - b) for a, b in zip(ev, trl)):.4f}"
                  f" (evertrain {ev[-1]:.4f}, TRL {trl[-1]:.4f} at the last step)", flush=True)
    return runs


def case_continuous(work: Path, model: str, size: dict, rounds: int, held: HeldOut, flags: dict,
                    extra: list[str]) -> dict:
    files = {name: write_jsonl(work / f"{i + 1}-{name}.jsonl", DATA[name][0])
             for i, name in enumerate(("demos", "pairs", "ratings"))}
    trl_files = {name: in_evertrain_order(f, DATA[name][0], model, size, f.with_suffix(".trl.jsonl"))[0]
                 for name, f in files.items()}
    print(f"continuous: {', '.join(f'{f.name} ({len(DATA[n][0])})' for n, f in files.items())}, batch "
          f"{size['batch']}, learning rate {size['lr']:g}, beta {BETA}; evertrain: one run, a `train` process per "
          f"file; TRL: SFTTrainer, DPOTrainer, KTOTrainer, each a process from the last one's output", flush=True)
    runs = {"evertrain": [], "TRL": []}
    for k in range(rounds):
        for name in runs:
            t0, walls, peaks, model_in = time.perf_counter(), [], [], model
            for kind, (data, f) in zip(("sft", "dpo", "kto"), files.items()):
                if name == "evertrain":
                    r = run_child("evertrain", {"argv": evertrain_argv(f, work / f"cont-ev-{k}", model, size, extra)})
                else:
                    out = work / f"cont-trl-{k}-{kind}"
                    r = run_child("trl", {"kind": kind, "model": model_in, "data": str(trl_files[data]),
                                          "out": str(out), "settings": {**size, **flags}})
                    model_in = str(out)
                walls.append(r["wall"])
                peaks.append(r["peak_kib"] / 1024)
            runs[name].append({"wall": time.perf_counter() - t0, "walls": walls, "peak": max(peaks),
                               **held.numbers(r["model"], ["demos", "pairs", "ratings"])})
            x = runs[name][-1]
            print(f"round {k + 1}: {name}: {x['wall']:.0f} s (" + ", ".join(f"{w:.0f}" for w in walls) + f" s), "
                  f"peak {x['peak']:,.0f} MiB; held-out SFT loss {x['sft_loss']:.4f}, DPO accuracy "
                  f"{x['dpo_accuracy']:.3f} margin {x['dpo_margin']:.4f}, KTO accuracy {x['kto_accuracy']:.3f} "
                  f"margin {x['kto_margin']:.4f}", flush=True)
    return runs


# ----------------------------------------------------------------------------------------------- the report

def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report_dpo(runs: dict, size: dict, model_name: str) -> None:
    ev, trl = runs["evertrain"], runs["TRL"]
    print(f"\nDPO, {model_name}: {size['pairs']} pairs, batch {size['batch']}, {len(ev)} interleaved rounds; "
          f"tokens/s as ratios to TRL's DPOTrainer in the same round")
    print("| round | evertrain, median step | TRL, median step | ratio | evertrain, whole training | TRL, whole "
          "training | ratio | peak MiB: evertrain / TRL | held-out accuracy: evertrain / TRL | held-out margin: "
          "evertrain / TRL |\n|---|---|---|---|---|---|---|---|---|---|")
    for k, (a, b) in enumerate(zip(ev, trl)):
        print(f"| {k + 1} | {a['step']:,.0f} tok/s | {b['step']:,.0f} tok/s | {a['step'] / b['step']:.3f} | "
              f"{a['whole']:,.0f} tok/s | {b['whole']:,.0f} tok/s | {a['whole'] / b['whole']:.3f} | "
              f"{a['peak']:,.0f} / {b['peak']:,.0f} | {a['dpo_accuracy']:.3f} / {b['dpo_accuracy']:.3f} | "
              f"{a['dpo_margin']:.4f} / {b['dpo_margin']:.4f} |")
    step_ratio = statistics.median(a["step"] / b["step"] for a, b in zip(ev, trl))
    whole_ratio = statistics.median(a["whole"] / b["whole"] for a, b in zip(ev, trl))
    acc = (med(ev, "dpo_accuracy"), med(trl, "dpo_accuracy"))
    peak = (med(ev, "peak"), med(trl, "peak"))
    print(f"| **median** | **{med(ev, 'step'):,.0f} tok/s** | **{med(trl, 'step'):,.0f} tok/s** | **{step_ratio:.3f}** "
          f"| **{med(ev, 'whole'):,.0f} tok/s** | **{med(trl, 'whole'):,.0f} tok/s** | **{whole_ratio:.3f}** | "
          f"**{peak[0]:,.0f} / {peak[1]:,.0f}** | **{acc[0]:.3f} / {acc[1]:.3f}** | "
          f"**{med(ev, 'dpo_margin'):.4f} / {med(trl, 'dpo_margin'):.4f}** |")
    same = abs(acc[0] - acc[1]) <= 0.02
    print("\nGoals (medians of the round ratios):")
    print(f"- tokens/s >= 1.3x TRL's, median step: {step_ratio:.3f}x: {'PASS' if step_ratio >= 1.3 else 'FAIL'}")
    print(f"- tokens/s >= 1.3x TRL's, whole training (evertrain's reference pass included): {whole_ratio:.3f}x: "
          f"{'PASS' if whole_ratio >= 1.3 else 'FAIL'}")
    print(f"- held-out accuracy within 0.02 of TRL's: {acc[0]:.3f} vs {acc[1]:.3f}: {'PASS' if same else 'FAIL'}")
    print(f"- peak memory below TRL's: {peak[0]:,.0f} vs {peak[1]:,.0f} MiB ({peak[0] / peak[1]:.2f}x): "
          f"{'PASS' if peak[0] < peak[1] else 'FAIL'}")


def report_continuous(runs: dict, size: dict, model_name: str) -> None:
    print(f"\nSFT, DPO, KTO in sequence, {model_name}: {size['sft']} demonstrations, {size['pairs']} pairs, "
          f"{size['kto']} rated answers, batch {size['batch']}; the final model's held-out numbers (rewards against "
          f"the base model), medians over {len(runs['evertrain'])} round(s)")
    print("| contender | wall time, three files | peak MiB | SFT held-out loss | DPO held-out accuracy | DPO margin | "
          "KTO held-out accuracy | KTO margin |\n|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        print(f"| {'evertrain, one run' if name == 'evertrain' else 'TRL, three jobs'} | {med(rs, 'wall'):.0f} s | "
              f"{med(rs, 'peak'):,.0f} | {med(rs, 'sft_loss'):.4f} | {med(rs, 'dpo_accuracy'):.3f} | "
              f"{med(rs, 'dpo_margin'):.4f} | {med(rs, 'kto_accuracy'):.3f} | {med(rs, 'kto_margin'):.4f} |")
    ev, trl = runs["evertrain"], runs["TRL"]
    print(f"| ratio evertrain / TRL | {med(ev, 'wall') / med(trl, 'wall'):.3f} | "
          f"{med(ev, 'peak') / med(trl, 'peak'):.2f} | | | | | |")


DATA: dict = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=("dpo", "continuous", "both"), default="both")
    p.add_argument("--model", default="smollm2", help="smollm2 (the embedded SmolLM2-135M-Instruct), tiny (the "
                   "tests' random Llama) or a model folder (sized as smollm2)")
    p.add_argument("--rounds", type=int, help="DPO: interleaved evertrain/TRL rounds (default: 3; tiny: 2)")
    p.add_argument("--continuous-rounds", type=int, default=1, help="continuous: rounds (each: both contenders)")
    p.add_argument("--pairs", type=int, help="trained preference pairs (default by model)")
    p.add_argument("--held-out", type=int, help="held-out records of each file (default by model)")
    p.add_argument("--records", type=int, help="continuous: trained demonstrations and rated answers, each")
    p.add_argument("--batch", type=int, help="pairs (records) per optimizer step, both contenders")
    p.add_argument("--lr", type=float, help="learning rate, both contenders")
    p.add_argument("--trl-precompute-ref", action="store_true", help="TRL computes its reference once before "
                   "training (precompute_ref_log_probs), as evertrain does, instead of a second model every step")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL with its own default, gradient "
                   "checkpointing on (evertrain's default is off)")
    p.add_argument("--evertrain-args", default="", help="more options for every `evertrain train`, e.g. "
                   "'--packing' (then the steps differ from TRL's) or '--replay-fraction 0.25'")
    p.add_argument("--keep", action="store_true", help="keep the work folder (models, runs, data)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = (child_evertrain if a.child[0] == "evertrain" else child_trl)(json.loads(a.child[1]))
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    size = dict(SIZES["tiny" if a.model == "tiny" else "smollm2"])
    for key, value in {"pairs": a.pairs, "held_out": a.held_out, "sft": a.records, "kto": a.records,
                       "batch": a.batch, "lr": a.lr, "rounds": a.rounds}.items():
        if value is not None:
            size[key] = value
    work = Path(tempfile.mkdtemp(prefix="evertrain-preference-"))
    if a.model == "tiny":
        model, model_name = str(make_model_dir(work / "model", hidden=64, layers=2)), "tiny random Llama"
    elif a.model == "smollm2":
        from evertrain import models

        model, model_name = str(models.embedded_model_dir()), models.EMBEDDED_NAME
    else:
        model, model_name = a.model, Path(a.model).name
    DATA.update(datasets(size))
    flags = {"trl_precompute_ref": a.trl_precompute_ref, "trl_gradient_checkpointing": a.trl_gradient_checkpointing}
    extra = a.evertrain_args.split()
    from importlib.metadata import version

    print(f"preference: {model_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, TRL "
          f"{version('trl')}; TRL's reference: {'precomputed' if a.trl_precompute_ref else 'a second model'}; "
          f"TRL gradient checkpointing {'on' if a.trl_gradient_checkpointing else 'off'}; work folder {work}",
          flush=True)
    held = HeldOut(model, {name: DATA[name][1] for name in DATA})
    t0 = time.perf_counter()
    dpo = case_dpo(work, model, size, size["rounds"], held, flags, extra) if a.case in ("dpo", "both") else None
    t1 = time.perf_counter()
    cont = (case_continuous(work, model, size, a.continuous_rounds, held, flags, extra)
            if a.case in ("continuous", "both") else None)
    t2 = time.perf_counter()
    if dpo:
        report_dpo(dpo, size, model_name)
        print(f"(the DPO case took {t1 - t0:.0f} s)")
    if cont:
        report_continuous(cont, size, model_name)
        print(f"(the continuous case took {t2 - t1:.0f} s)")
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
