"""The training loop: one run that never ends, fed one file at a time.

`setup` builds (or resumes) a Session: the model, optimizer and progress live in it, in memory, from one file to
the next. `fit` trains one file and yields after every optimizer step; its caller (the `train` command, the
daemon) answers each step with a decision: go on, stop (checkpoint, the file stays open) or skip the file.
Vocabulary: a *micro-batch* is one forward/backward pass on one process; an *optimizer step* (or just *step*)
consumes one global batch of rows = batch_size x processes x gradient_accumulation. Everything is scheduled on
optimizer steps. The global batch is part of the run's identity: at another number of processes the gradient
accumulation changes to keep it.

    evertrain train --dataset FILE --output-dir DIR     # setup -> prepare the file -> drive(fit) -> checks
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Generator
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from evertrain import (anchor, checkpoint, chunked_loss, collective, disk, evals, faults, gate, logs, metrics, models,
                       replay, sharding, snapshots)
from evertrain.config import ConfigError, TrainConfig
from evertrain.data import Cancelled, DataError, Example, FileData, load_file
from evertrain.data.packing import collate
from evertrain.data import store as token_store
from evertrain.schedule import lr_factor
from evertrain.state import FileCursor, FileRecord, TrainingProgress
from evertrain.trace import Trace, in_file_order


# The caller's answer to a step (None means GO).
GO, STOP, SKIP = "go", "stop", "skip"


class RunMismatch(RuntimeError):
    """The settings that define a run differ from the run already in the output folder."""


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss is {loss} at global step {step}; nothing of that step was applied")


@dataclass
class Session:
    config: TrainConfig
    output_dir: Path
    accelerator: object
    model: object
    tokenizer: object
    optimizer: object
    progress: TrainingProgress
    identity: dict                 # what defines the run; identity["sharding"] == "fsdp2": sharded by FSDP2
    gradient_accumulation: int     # micro-batches per step on each process: what keeps the run's global batch
    trace: Trace | None = None
    last_checkpoint: Path | None = None
    saved_step: int | None = None                       # global step of the newest checkpoint on disk
    protected: set[str] = field(default_factory=set)   # checkpoint names pruning must keep (pinned)
    budget_bytes: int | None = None                     # disk budget for checkpoints, if any
    workdir: Path | None = None    # where logs/ and snapshots/ go: the workspace, or output_dir for `train`
    replay_pool: list | None = None
    # Set by the daemon: writes its own files (a copy of the ledger) into a checkpoint's temporary folder, so
    # that they are sealed in the manifest and committed atomically with it.
    extra_files: Callable[[Path], None] | None = None
    degraded: disk.Degraded | None = None   # optional writes (metrics, snapshots) skipped while the disk is full
    anchor: list | None = None     # the anchor set (anchor.items), read once
    measured: tuple | None = None  # (global step, the end-of-file numbers): the next file's gate baseline
    writing: checkpoint.Write | None = None  # the checkpoint a thread is writing (overlap_checkpoints)
    # The CPU copies that write is made from, reused save after save (pinned when the model is on a GPU):
    # allocating and pinning a 1.5B full fine-tune's 18 GB at every save would take longer than copying it.
    host_copies: dict = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.gradient_accumulation

    @property
    def sharded(self) -> bool:
        return self.identity["sharding"] == "fsdp2"

    @property
    def store_dir(self) -> Path:
        return self.output_dir / "tokens"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str, progress: bool = False) -> None:
        if self.is_main:
            logs.say(text, progress=progress)


@dataclass
class StepRecord:
    """One optimizer step, as `fit` yields it (and as logs/metrics.jsonl records it)."""

    step: int                  # global step, after this step
    file: str                  # sha256 of the file in training
    file_name: str
    file_step: int             # the file's steps done, after this step
    file_total_steps: int
    loss: float                # mean token loss of the step's global batch
    lr: float
    grad_norm: float | None    # before clipping; None when clipping is off
    tokens: int                # input tokens of the step, all processes
    examples: int              # the file's own examples in the step
    replayed: int              # examples replayed from earlier files
    tokens_per_second: float   # since this call of `fit` began
    time: float                # wall clock (time.time()) at the step's end

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FileResult:
    status: str                # done | skipped | interrupted
    steps: int                 # optimizer steps trained in this call
    expected_steps: int        # steps the whole file needs
    file_step: int             # the file's cursor after this call
    step_before: int
    step_after: int
    loss: float | None         # mean loss of the steps trained in this call
    tokens: int
    seconds: float
    checkpoint: Path | None
    stop_requested: bool = False  # a STOP or SKIP reached the loop (from this process or another)
    gate: dict | None = None      # the forgetting gate's verdict (status done, forgot or rejected)


# ------------------------------------------------------------------------------------------------- setup

def setup(config: TrainConfig, output_dir: Path, *, resume: checkpoint.Checkpoint | None | str = "newest",
          workdir: Path | None = None, cpu: bool = False, from_base: bool = False) -> Session:
    """Build the accelerator, then load `resume` (by default the newest complete checkpoint of `output_dir`).

    When checkpoints exist and none loads, this raises checkpoint.NoUsableCheckpoint, unless `from_base`
    (then the damaged ones are set aside and the run starts again from the base model)."""
    from accelerate import Accelerator

    output_dir = Path(output_dir)
    # Launched as several processes on a machine without CUDA: accelerate only picks gloo when told "cpu".
    cpu = cpu or ("LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    sharded = sharding.asked()  # FSDP2, which evertrain does itself; accelerate then runs plain processes
    if sharded:
        sharding.stand_aside()
    refuse_unhonoured_sharding()
    if config.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matrix products; set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    logs_dir = Path(workdir or output_dir) / "logs"
    trackers = metrics.log_with(config.report_to, default=config.report_to == TrainConfig.report_to)
    accelerator = Accelerator(mixed_precision=resolved_precision(config.precision), cpu=cpu, log_with=trackers or None,
                              project_dir=str(metrics.tracker_dir(logs_dir)))
    refuse_unhonoured_sharding(accelerator.distributed_type.value)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    newest = resume
    if resume == "newest":
        newest = checkpoint.newest_complete(output_dir, warn=logs.say if accelerator.is_main_process else _quiet,
                                            damaged=checkpoint.resume_policy(from_base, accelerator.is_main_process))
    saved_config = _saved_config(newest.path) if newest is not None else None
    if saved_config is not None and "held_out_min_file" not in saved_config:
        # A run begun before tiny files got a held-out slice keeps choosing as it did: a file interrupted part-way
        # must find the same held-out examples (its cursor's settings), and later files the same rule.
        config = dataclasses.replace(config, held_out_min_file=0)
    if saved_config is not None and "long_text" not in saved_config:
        # A run begun before long texts were windowed keeps truncating them, for the same reason: a file
        # interrupted part-way must find the same rows.
        config = dataclasses.replace(config, long_text="truncate", window_overlap=0)
    world = accelerator.num_processes
    asked = config.batch_size * world * config.gradient_accumulation
    precision = accelerator.mixed_precision
    # A run from before these were recorded keeps the ones it is resumed with.
    saved = ({"global_batch": asked, "precision": precision, "sharding": "none", **newest.state["run"]}
             if newest is not None else {})
    accumulation = keep_global_batch(config, world, saved.get("global_batch", asked), output_dir)
    # The sharding decides the optimizer state's format on disk, so a run keeps the one it began with.
    identity = {**config.identity(), "global_batch": saved.get("global_batch", asked), "precision": precision,
                "sharding": "fsdp2" if sharded else "none"}
    if newest is not None:
        if saved != identity:
            diff = ", ".join(f"{k}: run has {saved.get(k)!r}, asked {identity.get(k)!r}"
                             for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k))
            raise RunMismatch(f"{output_dir} holds a run with other settings ({diff}). Keep the run's settings, "
                              "or start a new run in a new output folder.")
        tokenizer = models.load_tokenizer(str(newest.path))
        if config.lora:
            model = models.load_lora(load_base(config), newest.path)
        else:
            model = models.load_model(str(newest.path), config.dtype, config.attention)
        progress = TrainingProgress.from_state_dict(newest.state["evertrain"])
    else:
        torch.manual_seed(config.seed)  # LoRA's initialisation
        tokenizer = models.load_tokenizer(config.model, config.chat_template)
        model = load_base(config)
        if config.lora:
            model = models.add_lora(model, config)
        progress = TrainingProgress()
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora:  # frozen embeddings: give the checkpointed blocks an input that requires grad
            model.enable_input_require_grads()
    if config.chunked_loss:
        chunked_loss.refuse_unsupported(model, sharded=sharded)
    if config.compile:
        # Packed rows vary in length: dynamic shapes, or a recompile for every new row width.
        model.forward = torch.compile(model.forward, dynamic=True)
    if sharded:
        if world == 1:
            raise ConfigError("FSDP shards the model over the processes of a launch; one process holds it whole: "
                              "launch several, or train without --use_fsdp")
        model = sharding.shard(model, accelerator.device, precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=config.fused_optimizer and fused_adamw_supported(trainable))
    if sharded:
        if newest is not None:
            sharding.load_optimizer(model, optimizer, newest.path)
    else:
        if newest is not None:
            optimizer.load_state_dict(torch.load(newest.path / "optimizer.pt", weights_only=True))
        model, optimizer = accelerator.prepare(model, optimizer)
    session = Session(config, output_dir, accelerator, model, tokenizer, optimizer, progress, identity,
                      accumulation, last_checkpoint=newest.path if newest else None,
                      saved_step=newest.step if newest else None, workdir=Path(workdir or output_dir))
    session.degraded = disk.Degraded(session.say)
    if session.is_main:
        session.logs_dir.mkdir(parents=True, exist_ok=True)
    metrics.start(session, config.to_dict())
    if newest is not None:
        _restore_rng(newest.path, accelerator.process_index)
        session.say(f"evertrain: resumed {newest.path} at global step {progress.global_step}")
    if sharded and config.snapshot_budget:
        session.say("evertrain: FSDP: no evolution snapshots (one process takes them, and a sharded model needs "
                    "every process for a forward pass); held-out evaluations run as usual")
    if accumulation != config.gradient_accumulation:
        session.say(f"evertrain: {world} process(es) x batch_size {config.batch_size}: gradient accumulation "
                    f"{config.gradient_accumulation} -> {accumulation}, to keep the run's global batch of "
                    f"{session.global_batch} rows per optimizer step")
    if config.trace:
        session.trace = Trace(output_dir / "trace.jsonl")
        if session.is_main:
            session.trace.truncate(progress.global_step, set(progress.cursors) | {f.sha256 for f in progress.files})
    return session


def refuse_unhonoured_sharding(distributed_type: str | None = None) -> None:
    """Sharding evertrain does not do (DeepSpeed; FSDP by accelerate's plugin) is refused, before the accelerator
    (`distributed_type` None) and after it: never dropped in silence. FSDP2 is asked for with `--use_fsdp
    --fsdp_version 2` and done by `sharding`, which has taken the request out of accelerate's way by then."""
    asked = "DeepSpeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") else None
    if distributed_type in ("FSDP", "DEEPSPEED"):
        asked = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}[distributed_type]
    if asked:
        raise ConfigError(f"{asked} was asked for. evertrain shards with FSDP2 (accelerate launch --use_fsdp "
                          "--fsdp_version 2) or trains DDP; DeepSpeed's sharded state is not supported.")


def keep_global_batch(config: TrainConfig, world: int, global_batch: int, output_dir: Path) -> int:
    """The gradient accumulation that makes `global_batch` at this number of processes; RunMismatch if none does."""
    per_round = config.batch_size * world
    if global_batch % per_round:
        fits = [b for b in range(1, global_batch // world + 1) if global_batch % (b * world) == 0]
        raise RunMismatch(
            f"{output_dir} holds a run with a global batch of {global_batch} rows per optimizer step; {world} "
            f"process(es) x batch_size {config.batch_size} = {per_round} rows per micro-batch round does not "
            f"divide it, so no gradient accumulation keeps it. "
            + (f"With {world} process(es) use a batch_size of {', '.join(map(str, fits[-4:]))}, "
               f"or another number of processes." if fits else
               f"{global_batch} rows cannot be split over {world} processes; use a number of processes that "
               f"divides {global_batch}."))
    return global_batch // per_round


def load_base(config: TrainConfig):
    """The run's base model, with its attention kernel (and 4-bit weights for QLoRA, made ready to train)."""
    model = models.load_model(models.resolve_model(config.model), config.dtype, config.attention,
                              config.load_in_4bit)
    return models.prepare_4bit(model, config) if config.load_in_4bit else model


def fused_adamw_supported(params: list) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU, CUDA and a few others, all on one kind."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda", "mps", "xpu", "hpu"} and all(p.is_floating_point()
                                                                                     for p in params)


def resolved_precision(name: str) -> str:
    """auto: bf16 on GPUs that have it, fp16 (with accelerate's loss scaler) on older GPUs, none on CPU."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _saved_config(path: Path) -> dict:
    try:
        return json.loads((path / "evertrain_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _quiet(_text: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------- the data

def prepare(session: Session, path: Path, **kwargs) -> FileData:
    """Load a file's tokens with the run's tokenizer and settings, on every process.

    The main process checks the file and builds its token store first, alone (`kwargs`: its progress and
    should_stop); the others learn how that went and then read the store, or raise the same error.
    """
    outcome, data = None, None
    if session.is_main:
        try:
            data = load_file(path, session.tokenizer, session.config, store_dir=session.store_dir, **kwargs)
        except DataError as e:
            outcome = e
        except Cancelled:
            outcome = "cancelled"
    outcome = collective.from_main(session.accelerator, outcome)
    if outcome == "cancelled":
        raise Cancelled()
    if outcome is not None:
        raise outcome
    if data is None:
        data = load_file(path, session.tokenizer, session.config, store_dir=session.store_dir)
    return data


# ------------------------------------------------------------------------------------------------- the loop

def fit(session: Session, data: FileData) -> Generator[StepRecord, str | None, FileResult]:
    """Train `data` from its cursor, one optimizer step at a time, yielding a StepRecord after each.

    The caller answers each record with a decision (`steps.send(...)`): None or GO goes on, STOP checkpoints and
    returns (the file stays open, to resume at its cursor), SKIP ends the file as skipped and checkpoints. A STOP
    on any process stops all of them at the same step. The generator's return value is the FileResult.
    """
    cfg, acc, progress, model, optimizer = (session.config, session.accelerator, session.progress,
                                            session.model, session.optimizer)
    G, world, rank, accum = session.global_batch, acc.num_processes, acc.process_index, session.gradient_accumulation
    total = data.total_steps(G, cfg.epochs)
    cursor, first_time = begin_file(session, data, total)
    if first_time:
        evals.store_held_out(session, data)
        acc.wait_for_everyone()  # every process evaluates the slice the main one just stored
        metrics.log_evals(session, evals.evaluate(session, [data.sha256], before_file=data))
        session.degraded.attempt("snapshots/tracked.json", lambda: snapshots.track_file(session, data))
        if anchor.build(session, data):  # at the run's first step only: the base model's own answers
            metrics.log_drift(session, anchor.evaluate(session))  # where the drift plot starts
        cursor.gate_before = gate.baseline(session, data)
        metrics.file_event(session, f"start {data.name} ({data.sha256[:12]}) at global step "
                                    f"{progress.global_step}: {total} steps")
    if cfg.lr_schedule == "wsd" and cfg.decay_steps and progress.decay_start is None:
        progress.decay_start, progress.decay_steps = progress.global_step, cfg.decay_steps

    step_before, file_step_before, t0 = progress.global_step, cursor.file_step, time.perf_counter()
    losses, tokens_trained, stop, skip = [], 0, False, False
    model.train()
    while cursor.file_step < total:
        t_step = time.perf_counter()
        rows = [[data.examples[i] for i in data.rows[r]] for r in data.step_rows(cursor.file_step, G, cfg.seed)]
        replayed = replay.draw(session, data.sha256)
        rows += [[e] for _sha, e in replayed]
        replayed_ids = {id(e): sha for sha, e in replayed}
        n_target = sum(e.target_tokens for row in rows for e in row)  # the loss's denominator, on every process
        lr = cfg.learning_rate * lr_factor(cfg.lr_schedule, progress.global_step, cfg.warmup_steps,
                                           progress.decay_start, progress.decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum, seen = torch.zeros((), device=acc.device), []
        for m, mine in micro_batches(rows, accum, world, rank):
            batch = collate(mine, session.tokenizer.pad_token_id, acc.device)
            sync = m == accum - 1
            with gradient_sync(session, sync), chunked_loss.active(model) if cfg.chunked_loss else nullcontext():
                out = model(**batch, use_cache=False, num_items_in_batch=max(n_target, 1))
                # DDP averages gradients over processes; each loss is already a share of the global sum.
                acc.backward(out.loss * world)
            faults.hit("mid-step")
            loss_sum += out.loss.detach()
            progress.micro_batches += 1
            if session.trace:  # the evidence, taken after the backward pass: what this process really fed
                seen.append(evidence(rank, m, mine, replayed_ids))

        grad_norm = clip_grad_norm(session) if cfg.max_grad_norm else None
        step_loss = acc.reduce(loss_sum, reduction="sum").item()  # the same number on every process
        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(progress.global_step + 1, step_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        progress.global_step += 1
        cursor.file_step += 1
        n_trained = sum(len(row) for row in rows[:len(rows) - len(replayed)])
        step_tokens = sum(len(e.input_ids) for row in rows for e in row)
        progress.tokens_seen += step_tokens
        progress.examples_seen += n_trained
        cursor.replayed += len(replayed)
        tokens_trained += step_tokens
        losses.append(step_loss)
        progress.train_seconds += time.perf_counter() - t_step
        if session.trace:
            write_trace(session, data.sha256, seen)
        elapsed = time.perf_counter() - t0
        record = StepRecord(step=progress.global_step, file=data.sha256, file_name=data.name,
                            file_step=cursor.file_step, file_total_steps=total, loss=step_loss, lr=lr,
                            grad_norm=grad_norm, tokens=step_tokens,
                            examples=n_trained, replayed=len(replayed),
                            tokens_per_second=tokens_trained / elapsed if elapsed else 0.0, time=time.time())
        log_step(session, record)
        if snapshots.decide(session, cursor.file_step, total):
            session.degraded.attempt("an evolution snapshot", lambda: snapshots.take(
                session, data, generations=snapshots.with_generations(cursor.file_step, total)))
        if cfg.eval_steps and progress.global_step % cfg.eval_steps == 0 and cursor.file_step < total:
            metrics.log_evals(session, evals.evaluate(session, evals.seen_files(session)))
            metrics.log_drift(session, anchor.evaluate(session))
        if session.writing is not None and session.writing.done():
            finish_write(session)  # the checkpoint a thread wrote is complete: the newest now
        if cfg.save_steps and progress.global_step % cfg.save_steps == 0 and cursor.file_step < total:
            save_checkpoint(session, overlap=overlaps(session))

        decision = yield record
        stop, skip = collective.agree(acc, decision in (STOP, SKIP), decision == SKIP)
        if stop:
            break

    status = "done" if cursor.file_step >= total else "skipped" if skip else "interrupted"
    finish_write(session)  # the file ends on checkpoints that are complete, whatever comes next
    verdict = None
    if status == "done":
        t_eval = time.perf_counter()
        results = evals.evaluate(session, evals.seen_files(session), after_file=data)
        drift = anchor.evaluate(session, after_file=data)
        metrics.log_evals(session, results)
        metrics.log_drift(session, drift)
        verdict = gate.judge(session, data, cursor.gate_before, results, drift, time.perf_counter() - t_eval,
                             cursor.attempt)
        if verdict and verdict["tripped"] and gate.undoes(cfg) and can_undo(session, cursor):
            # Nothing ended, nothing saved: the caller takes the run back to before the file (undo_file).
            return FileResult(status="forgot", steps=progress.global_step - step_before, expected_steps=total,
                              file_step=cursor.file_step, step_before=step_before, step_after=progress.global_step,
                              loss=sum(losses) / len(losses) if losses else None, tokens=tokens_trained,
                              seconds=time.perf_counter() - t0, checkpoint=None, gate=verdict)
        gate.remember(session, results, drift)
        end_file(session, data, "done", forgetting=verdict)
        replay.add_file(session, data)
        metrics.file_event(session, f"finished {data.name} at global step {progress.global_step}")
    elif status == "skipped":
        rec = end_file(session, data, "skipped")
        metrics.file_event(session, f"skipped {data.name} after {rec.steps}/{total} steps")
    if status != "interrupted" or session.saved_step != progress.global_step:
        save_checkpoint(session)
    if status == "done":
        replay.trim(session)
    return FileResult(status=status, steps=progress.global_step - step_before, expected_steps=total,
                      file_step=cursor.file_step, step_before=step_before, step_after=progress.global_step,
                      loss=sum(losses) / len(losses) if losses else None, tokens=tokens_trained,
                      seconds=time.perf_counter() - t0, stop_requested=stop, gate=verdict,
                      checkpoint=session.last_checkpoint if status != "interrupted" or cursor.file_step >
                      file_step_before else None)


def gradient_sync(session: Session, sync: bool):
    """Gradients are reduced across processes only at a step's last micro-batch (`sync`)."""
    if sync:
        return nullcontext()
    if session.sharded:
        return sharding.gradient_sync(session.model, False)
    return session.accelerator.no_sync(session.model)


def clip_grad_norm(session: Session) -> float:
    if session.sharded:
        return sharding.clip_grad_norm(session.model, session.config.max_grad_norm)
    return float(session.accelerator.clip_grad_norm_(session.model.parameters(), session.config.max_grad_norm))


def drive(steps: Generator[StepRecord, str | None, FileResult], decide: Callable[[StepRecord], str | None]
          ) -> FileResult:
    """Run `fit` to its end, answering each step with `decide(record)`; the FileResult it returns."""
    try:
        record = next(steps)
        while True:
            record = steps.send(decide(record))
    except StopIteration as end:
        return end.value


def guard_problems(session: Session, result: FileResult) -> list[str]:
    """The checks home-made systems lacked: a file is done only if its steps happened and are on disk."""
    problems = []
    if result.steps <= 0:
        problems.append("no optimizer step was trained")
    if result.file_step != result.expected_steps:
        problems.append(f"the file got {result.file_step} steps, expected {result.expected_steps}")
    if result.step_after - result.step_before != result.steps:
        problems.append(f"global step went {result.step_before} -> {result.step_after} for {result.steps} steps")
    ckpt = checkpoint.final_path(session.output_dir, result.step_after)
    state = checkpoint.read_state(ckpt)
    if state is None or state["global_step"] != result.step_after:
        problems.append(f"no complete checkpoint for global step {result.step_after} at {ckpt}")
    return problems


def micro_batches(rows: list[list[Example]], accum: int, world: int, rank: int):
    """(index, rows) of each micro-batch this process runs in one optimizer step: rows dealt round-robin."""
    for m in range(accum):
        mine = [row for i, row in enumerate(rows) if i % (world * accum) == m * world + rank]
        if mine or world > 1:  # every process runs every micro-batch, so DDP's collectives stay in step
            yield m, mine


def evidence(rank: int, m: int, rows: list[list[Example]], replayed: dict[int, str]) -> dict:
    """One micro-batch as it reached the model: the file's examples (by Example.id: a line, or "line/window" for a
    window of a long text), the replayed [sha256, id]s and the tokens.

    A replayed example is told apart from the file's own by identity (the same line number can be both);
    identities stay in this process, only ids travel to the main one.
    """
    examples = [e for row in rows for e in row]
    return {"rank": rank, "index": m, "examples": [e.id for e in examples if id(e) not in replayed],
            "replay": [[replayed[id(e)], e.id] for e in examples if id(e) in replayed],
            "tokens": sum(len(e.input_ids) for e in examples)}


def write_trace(session: Session, sha256: str, seen: list[dict]) -> None:
    """One trace line per optimizer step, built from every process's micro-batch evidence."""
    if session.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        seen = gather_object(seen)
    if not session.is_main:
        return
    record = {"step": session.progress.global_step, "file": sha256,
              "examples": sorted((x for mb in seen for x in mb["examples"]), key=in_file_order),
              "micro_batches": [{k: mb[k] for k in ("rank", "index", "examples", "tokens")} for mb in seen]}
    replay_lines = sorted((pair for mb in seen for pair in mb["replay"]),
                          key=lambda pair: (pair[0], in_file_order(pair[1])))
    if replay_lines:
        record["replay"] = replay_lines
    faults.hit("trace-write")
    session.trace.write(record)


def begin_file(session: Session, data: FileData, total: int) -> tuple[FileCursor, bool]:
    """Where a file's life begins: its cursor (new, or the one it was interrupted at) and whether it is new."""
    progress, cfg = session.progress, session.config
    settings = {"global_batch": session.global_batch, "epochs": cfg.epochs, "packing": cfg.packing,
                "max_length": cfg.max_length, "seed": cfg.seed, "held_out": len(data.held_out), **data.layout}
    cursor = progress.cursors.get(data.sha256)
    first_time = cursor is None
    if cursor is None:
        cursor = FileCursor(sha256=data.sha256, name=data.name, file_step=0, total_steps=total,
                            first_step=progress.global_step + 1, settings=settings)
        progress.cursors[data.sha256] = cursor
        trace_held_out(session, data)
    elif cursor.settings != settings or cursor.total_steps != total:
        raise RunMismatch(f"{data.name} was interrupted at step {cursor.file_step}/{cursor.total_steps} with "
                          f"{cursor.settings}; it must be finished with the same batch settings, got {settings}")
    elif cursor.file_step:
        session.say(f"evertrain: {data.name} resumes at its step {cursor.file_step}/{total}")
    progress.current = data.sha256
    return cursor, first_time


def trace_held_out(session: Session, data: FileData) -> None:
    if session.trace and session.is_main and data.held_out:
        session.trace.write({"file": data.sha256, "held_out": data.held_out_lines})


def end_file(session: Session, data: FileData, status: str, forgetting: dict | None = None) -> FileRecord:
    """Where a file's life ends: done, skipped, failed or rejected, with the steps it got (and the forgetting
    gate's verdict), recorded in the progress."""
    progress = session.progress
    cursor = progress.cursors.pop(data.sha256, None)
    progress.current = None
    record = FileRecord(
        sha256=data.sha256, name=data.name, examples=len(data.examples), tokens=data.tokens,
        steps=cursor.file_step if cursor else 0, expected_steps=data.total_steps(session.global_batch,
                                                                                 session.config.epochs),
        first_step=cursor.first_step if cursor else progress.global_step + 1, last_step=progress.global_step,
        status=status, held_out=data.held_out_lines, replayed=cursor.replayed if cursor else 0,
        forgetting=forgetting)
    progress.files.append(record)
    return record


def run_file(session: Session, data: FileData, decide: Callable[[StepRecord], str | None]
             ) -> tuple[Session, FileResult]:
    """`drive(fit(...))` to the file's end, the forgetting gate's undoing included: the session training goes on
    with (a new one after a rollback or retry) and the FileResult (status "rejected" when the gate rolled back)."""
    while True:
        try:
            result = drive(fit(session, data), decide)
        except BaseException:
            finish_write(session, quietly=True)  # the folder settled before the error's handler looks at it
            raise
        if result.status != "forgot":
            return session, result
        session = undo_file(session, data, result.gate)
        if data.sha256 not in session.progress.cursors:
            return session, dataclasses.replace(result, status="rejected", checkpoint=session.last_checkpoint,
                                                step_after=session.progress.global_step)


def can_undo(session: Session, cursor: FileCursor) -> bool:
    """Is the state before the file there to go back to: the base model, or a checkpoint of that step that
    verifies (asked only when the gate has tripped: hashing a checkpoint is not free)?"""
    start = cursor.first_step - 1
    return start == 0 or checkpoint.at_step(session.output_dir, start) is not None


def undo_file(session: Session, data: FileData, verdict: dict) -> Session:
    """A tripped forgetting gate: a new session from the checkpoint before the file (the base model if the file
    was the run's first), with the file begun again there for a retry (once: then it is rejected) or ended as
    rejected with the verdict, and that state checkpointed at the same global step.

    The undone file's own checkpoints go first: at any crash on the way, a restart resumes from the checkpoint
    before the file (the file trains again and the gate decides again, the same way), never from weights the
    gate refused, and the trace (cut at the fresh session's step) agrees with it."""
    cursor, cfg = session.progress.cursors[data.sha256], session.config
    start = cursor.first_step - 1
    if session.is_main:
        checkpoint.discard_after(session.output_dir, start)
    session.accelerator.wait_for_everyone()
    release(session)  # the refused weights go before the good ones load: a GPU holds one model, not two
    fresh = setup(cfg, session.output_dir, resume=checkpoint.at_step(session.output_dir, start, full=False),
                  workdir=session.workdir)
    fresh.protected, fresh.budget_bytes, fresh.extra_files = (session.protected, session.budget_bytes,
                                                              session.extra_files)
    fresh.measured = (start, {"files": cursor.gate_before["files"], "anchor": cursor.gate_before["anchor"]})
    if cfg.forgetting_action == "retry" and cursor.attempt == 1:
        fresh.progress.cursors[data.sha256] = dataclasses.replace(
            cursor, file_step=0, replayed=0, attempt=2, replay_boost=cfg.retry_replay_boost, forgot=verdict)
        trace_held_out(fresh, data)
        fresh.say(f"evertrain: {data.name}: {verdict['reason']}; training it again from global step {start} "
                  f"with {cfg.retry_replay_boost:g}x the replay dose, the anchor included")
    else:
        end_file(fresh, data, "rejected", forgetting=verdict)
        fresh.say(f"evertrain: {data.name}: REJECTED: {verdict['reason']}; rolled back to global step {start}")
    save_checkpoint(fresh)
    return fresh


def release(session: Session) -> None:
    """Let go of a session's model and optimizer (the session is done with)."""
    import gc

    session.accelerator.free_memory()
    session.model = session.optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reload(session: Session) -> Session:
    """A new session from the newest complete checkpoint, with `session`'s retention settings: what was trained
    since that checkpoint is forgotten (its trace lines dropped), so it is trained again exactly once."""
    fresh = setup(session.config, session.output_dir, workdir=session.workdir)
    fresh.protected, fresh.budget_bytes, fresh.extra_files = (session.protected, session.budget_bytes,
                                                              session.extra_files)
    return fresh


def roll_back(session: Session, data: FileData) -> Session:
    """After a non-finite loss: a new session from the newest complete checkpoint, with `data` ended there as
    failed (and that checkpointed), so the broken weights are gone and the file is never resumed."""
    fresh = reload(session)
    if data.sha256 in fresh.progress.cursors:
        end_file(fresh, data, "failed")
        save_checkpoint(fresh)
    return fresh


def log_step(session: Session, r: StepRecord) -> None:
    """metrics.jsonl (and TensorBoard) get every step; the console a line every `log_steps`."""
    session.degraded.attempt("logs/metrics.jsonl", lambda: metrics.log_step(session, r.as_dict()))
    if session.is_main and (r.file_step % session.config.log_steps == 0 or r.file_step == r.file_total_steps):
        session.say(f"  step {r.step:>7}  {r.file_name} {r.file_step}/{r.file_total_steps}  "
                    f"loss {r.loss:.4f}  lr {r.lr:.3g}  {r.tokens_per_second:.0f} tok/s", progress=True)


# ------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_bytes(session: Session) -> int:
    """About what the next checkpoint takes on disk: the last one's size, or weights + two AdamW moments."""
    if session.last_checkpoint is not None and session.last_checkpoint.is_dir():
        return checkpoint.folder_size(session.last_checkpoint)
    return sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in session.model.parameters())


def save_checkpoint(session: Session, *, overlap: bool = False) -> Path | None:
    """Write checkpoint-<global_step> atomically: model, tokenizer, optimizer, schedule, RNG, progress.

    `overlap` (overlaps()): copy what it holds to CPU memory and return at once; a thread writes the copy while
    training goes on, and it becomes the newest once complete (finish_write). One write at a time, in step order.
    Out of space: the partial temporary folder is removed at once and DiskFull raised; the newest complete
    checkpoint stays the newest."""
    finish_write(session)
    tmp = checkpoint.temp_path(session.output_dir, session.progress.global_step)
    try:
        if overlap:
            start_write(session, tmp)
            return None
        path = _save_checkpoint(session, tmp)
    except Exception as e:
        if not out_of_room(session, e):
            raise
        if session.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise disk.DiskFull(session.output_dir, checkpoint_bytes(session)) from e
    session.last_checkpoint, session.saved_step = path, session.progress.global_step
    return path


def out_of_room(session: Session, error: BaseException) -> bool:
    """Whether a failed checkpoint write failed for room. torch.save loses the errno ("iostream error"): a
    failure with less room than a checkpoint takes (the partial one still counted) is out of space all the same."""
    return disk.is_full(error) or disk.free_bytes(session.output_dir) < checkpoint_bytes(session)


def overlaps(session: Session) -> bool:
    """Whether the checkpoints taken every save_steps are written by a thread while training goes on. One process
    only: a launch's processes agree on each part of a write (shared_write). auto: where the model is on a GPU."""
    mode = session.config.overlap_checkpoints
    if mode == "off" or session.accelerator.num_processes > 1 or session.sharded:
        return False
    return mode == "on" or session.accelerator.device.type == "cuda"


@dataclass
class Snapshot:
    """What checkpoint-<step> holds, taken at that step: the live objects for a write while training waits, CPU
    copies of what training changes for one a thread does while training goes on."""
    step: int
    model: object                 # whose save_pretrained writes the weights (and the adapter's config)
    weights: dict                 # its state dict, complete (gathered, under FSDP2)
    optimizer: dict | None        # None under FSDP2: each process writes its shard (sharding.save_optimizer)
    rng: dict
    record: dict                  # trainer_state.json but its manifest: the step, identity, progress, files
    scheduler: dict
    config: dict
    keep: set[str]                # checkpoint names pruning keeps
    stores: set[str]              # token stores pruning keeps


def snapshot(session: Session, weights: dict, optimizer: dict | None, *, copy: bool) -> Snapshot:
    acc, progress, cfg = session.accelerator, session.progress, session.config
    if copy:  # what training changes: weights it trains (a LoRA run's frozen base stays where it is), moments
        # The last write is finished (save_checkpoint waits for it first), so its copies are free to take again.
        copies, trained = {}, {p.data_ptr() for p in session.model.parameters() if p.requires_grad}
        weights = {k: cpu_copy(v, copies, session.host_copies) if v.data_ptr() in trained else v
                   for k, v in weights.items()}
        optimizer = cpu_copy(optimizer, copies, session.host_copies)
        if acc.device.type == "cuda":
            torch.cuda.current_stream(acc.device).synchronize()  # the copies ran non-blocking: the thread reads them
        session.host_copies = copies  # those of tensors no longer there (a rollback's new moments) are let go
    # A gate that can undo a file keeps the checkpoint from before each open file, whatever keep_checkpoints.
    before = {checkpoint.final_path(session.output_dir, c.first_step - 1).name for c in progress.cursors.values()
              } if gate.undoes(cfg) else set()
    return Snapshot(
        step=progress.global_step, model=acc.unwrap_model(session.model), weights=weights, optimizer=optimizer,
        rng=_rng_state(), record=deepcopy({
            "global_step": progress.global_step, "run": session.identity, "evertrain": progress.state_dict(),
            "files": [{"sha256": f.sha256, "name": f.name, "steps": f.steps} for f in progress.files]}),
        scheduler={"name": cfg.lr_schedule, "peak_lr": cfg.learning_rate, "warmup_steps": cfg.warmup_steps,
                   "decay_start": progress.decay_start, "decay_steps": progress.decay_steps,
                   "next_lr": cfg.learning_rate * lr_factor(cfg.lr_schedule, progress.global_step, cfg.warmup_steps,
                                                            progress.decay_start, progress.decay_steps)},
        config=cfg.to_dict(), keep=set(session.protected) | before, stores={sha[:16] for sha in progress.cursors})


def cpu_copy(obj, copies: dict, reuse: dict):
    """`obj` (tensors in dicts, lists, tuples) with every tensor copied into CPU memory: into its copy in `reuse`
    from the last save where it has one, else a new one (pinned, for a GPU tensor); `copies` collects them.
    Tensors that share memory (tied weights) share their copy, so that it saves as the original does."""
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride())
        if key not in copies:
            copy = reuse.get(key)
            if copy is None:
                copy = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device="cpu",
                                           pin_memory=obj.is_cuda)
            copies[key] = copy.copy_(obj.detach(), non_blocking=obj.is_cuda)
        return copies[key]
    if isinstance(obj, dict):
        return {k: cpu_copy(v, copies, reuse) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, copies, reuse) for v in obj)
    return deepcopy(obj)


def _save_checkpoint(session: Session, tmp: Path) -> Path:
    """The write while training waits: every process takes part (FSDP2 gathers the weights; each process writes
    its RNG state and, sharded, its optimizer shard); the main process writes the rest and commits."""
    acc = session.accelerator
    main = acc.is_main_process
    shared_write(session, tmp, (lambda: new_folder(session, tmp)) if main else None)
    if session.sharded:  # the full model for the main process to write; each process its optimizer shard
        weights = sharding.full_state_dict(session.model)
        sharding.save_optimizer(session.model, session.optimizer, tmp)
    else:
        weights = acc.get_state_dict(session.model)
    snap = snapshot(session, weights, None if session.sharded else session.optimizer.state_dict(), copy=False)
    shared_write(session, tmp, (lambda: write_files(session, tmp, snap)) if main else None)
    shared_write(session, tmp, lambda: torch.save(snap.rng, tmp / f"rng_state_{acc.process_index}.pt"))
    shared_write(session, tmp, (lambda: commit(session, tmp, snap)) if main else None)
    return checkpoint.final_path(session.output_dir, snap.step)


def start_write(session: Session, tmp: Path) -> None:
    """save_checkpoint(overlap=True), one process: the folder and the daemon's files now (its ledger connection
    belongs to this thread), the rest copied now and written by a thread (checkpoint.Write)."""
    try:
        new_folder(session, tmp)
        snap = snapshot(session, session.accelerator.get_state_dict(session.model), session.optimizer.state_dict(),
                        copy=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def work() -> Path:
        write_files(session, tmp, snap)
        torch.save(snap.rng, tmp / "rng_state_0.pt")
        return commit(session, tmp, snap)

    session.writing = checkpoint.Write(snap.step, tmp, work)


def finish_write(session: Session, *, quietly: bool = False) -> None:
    """Wait for the checkpoint a thread is writing, if one is; complete, it is the newest. `quietly`: on the way
    out of another error, a failure of its own is not raised over it (it removed its partial folder)."""
    write, session.writing = session.writing, None
    if write is None:
        return
    try:
        path = write.wait()
    except Exception as e:
        if quietly:
            return
        if out_of_room(session, e):
            raise disk.DiskFull(session.output_dir, checkpoint_bytes(session)) from e
        raise
    session.last_checkpoint, session.saved_step = path, write.step


def new_folder(session: Session, tmp: Path) -> None:
    """The checkpoint's empty temporary folder, with the daemon's files in it (session.extra_files)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if session.extra_files:
        session.extra_files(tmp)


def write_files(session: Session, tmp: Path, snap: Snapshot) -> None:
    """The main process's part of a checkpoint: weights, tokenizer, optimizer (unsharded), schedule, settings."""
    snap.model.save_pretrained(tmp, state_dict=snap.weights, safe_serialization=True)
    session.tokenizer.save_pretrained(tmp)
    if snap.optimizer is not None:
        torch.save(snap.optimizer, tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(snap.scheduler, indent=2))
    (tmp / "evertrain_config.json").write_text(json.dumps(snap.config, indent=2, sort_keys=True))
    faults.hit("checkpoint-write")


def commit(session: Session, tmp: Path, snap: Snapshot) -> Path:
    """Seal the written folder as checkpoint-<step>, then prune old checkpoints and token stores."""
    path = checkpoint.commit(tmp, snap.record)
    checkpoint.prune(session.output_dir, session.config.keep_checkpoints, protected=snap.keep,
                     budget_bytes=session.budget_bytes, newest=path)
    # Token stores of files still open stay; of the rest, the most recently used few (a file dropped again).
    token_store.prune(session.store_dir, keep=snap.stores)
    return path


def shared_write(session: Session, tmp: Path, write: Callable[[], None] | None) -> None:
    """Run this process's part of the checkpoint write into `tmp` (None: none), then learn whether every
    process's part succeeded. If one failed, the main process removes the partial `tmp`, and then every process
    raises: the one that failed its error, the others DiskFull where the failure was a full disk (else a
    RuntimeError), instead of waiting at the next barrier for a process that is not coming until the launch's
    collective timeout. It is also the barrier between the parts."""
    error = None
    if write is not None:
        try:
            write()
        except Exception as e:
            error = e
    full = error is not None and out_of_room(session, error)
    acc = session.accelerator
    failed, any_full = collective.agree(acc, error is not None, full)
    if not failed:
        return
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    collective.agree(acc)  # every process leaves together, after the partial checkpoint is gone
    if error is not None:
        raise error
    if any_full:
        raise disk.DiskFull(session.output_dir, checkpoint_bytes(session))
    raise RuntimeError(f"another process failed to write checkpoint-{session.progress.global_step} (its own "
                       "log says why)")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(path: Path, rank: int) -> None:
    f = path / f"rng_state_{rank}.pt"
    if not f.exists():
        return
    state = torch.load(f, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
