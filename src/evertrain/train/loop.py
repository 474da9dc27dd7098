"""The training loop: one run that never ends, fed one file at a time.

`fit` trains one file and yields after every optimizer step; its caller (train/driver.py `run_file`, for the
`train` command and the daemon) answers each step with a decision: go on (None), STOP (checkpoint, the file stays open) or SKIP
(end the file). It calls the observers (observe/) at three moments by name, the objective (objectives.py) for each
micro-batch's loss, and saving.py for checkpoints. The global batch is part of the run's identity: at another
number of processes the gradient accumulation changes to keep it (setup.py).

    evertrain train --dataset FILE --output-dir DIR     # setup -> prepare the file -> fit, step by step
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Generator
from contextlib import nullcontext
from pathlib import Path

import torch

from evertrain import collective, faults
from evertrain.data import Cancelled, DataError, Example, FileData, load_file
from evertrain.observe import gate
from evertrain.train import checkpoint, references, replay, sharding
from evertrain.train.objectives import Counts, Sums
from evertrain.train.saving import finish_write, overlaps, save_checkpoint
from evertrain.train.schedule import lr_factor
from evertrain.train.session import SKIP, STOP, FileResult, NonFiniteLoss, RunMismatch, Session, StepRecord
from evertrain.train.state import FileCursor, FileRecord

RATE_STEPS = 10  # the tokens/s a step reports is over this many steps (the recent rate, not since the file began)


def prepare(session: Session, path: Path, **kwargs) -> FileData:
    """Load a file's tokens with the run's tokenizer and settings, on every process.

    The main process checks the file and builds its token store first, alone (`kwargs`: its progress and
    should_stop); the others learn how that went and then read the store, or raise the same error.
    """
    outcome, data = None, None
    if session.is_main:
        try:
            data = load_file(path, session.tokenizer, session.config, store_dir=session.run.tokens, **kwargs)
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
        data = load_file(path, session.tokenizer, session.config, store_dir=session.run.tokens)
    return data


def fit(session: Session, data: FileData) -> Generator[StepRecord, str | None, FileResult]:
    """Train `data` from its cursor, one optimizer step at a time, yielding a StepRecord after each.

    The caller answers each record with a decision (`steps.send(...)`): None goes on, STOP checkpoints and returns
    (the file stays open, to resume at its cursor), SKIP ends the file as skipped and checkpoints. A STOP on any
    process stops all of them at the same step. The generator's return value is the FileResult.
    """
    cfg, acc, progress, model, optimizer, observers = (session.config, session.accelerator, session.progress,
                                                       session.model, session.optimizer, session.observers)
    G, world, rank, accum = session.global_batch, acc.num_processes, acc.process_index, session.gradient_accumulation
    objectives, pad_id = session.objectives, session.tokenizer.pad_token_id
    total = data.total_steps(G, cfg.epochs)
    cursor, first_time = begin_file(session, data, total)
    references.attach(session, data, cursor, first_time)  # a preference or feedback file's: before anything reads it
    if first_time:
        cursor.gate_before = observers.file_started(model, progress, data, total)
    if cfg.lr_schedule == "wsd" and cfg.decay_steps and progress.decay_start is None:
        progress.decay_start, progress.decay_steps = progress.global_step, cfg.decay_steps

    step_before, file_step_before, t0 = progress.global_step, cursor.file_step, time.perf_counter()
    losses, tokens_trained, stop, skip = [], 0, False, False
    recent = collections.deque([(t0, 0)], maxlen=RATE_STEPS + 1)  # (time, tokens so far): the recent rate
    model.train()
    while cursor.file_step < total:
        t_step = time.perf_counter()
        rows = [[data.examples[i] for i in data.rows[r]] for r in data.step_rows(cursor.file_step, G, cfg.seed)]
        n_trained = sum(len(row) for row in rows)
        replayed = session.replay.draw(progress, data.sha256, G, observers.anchor_examples())
        own = len(rows)
        rows = replay.place(rows, [e for _sha, e in replayed], data.row_capacity or cfg.max_length)
        replayed_ids = {id(e): sha for sha, e in replayed}
        counts = Counts.of(rows)  # the denominators of the step's means, the same on every process
        lr = cfg.learning_rate * lr_factor(cfg.lr_schedule, progress.global_step, cfg.warmup_steps,
                                           progress.decay_start, progress.decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum, seen, sums = torch.zeros((), device=acc.device), [], Sums()
        batches = list(micro_batches(rows, accum, world, rank, own, G // (world * accum)))
        for m, mine in batches:
            with gradient_sync(session, sync=m == batches[-1][0]):
                loss = objectives.loss(model, mine, counts, pad_id, sums)
                # DDP averages gradients over processes; each loss is already a share of the global sum.
                acc.backward(loss * world)
            faults.hit("mid-step")
            loss_sum += loss.detach()
            progress.micro_batches += 1
            seen.append(evidence(rank, m, mine, replayed_ids))  # taken after the backward pass: what was fed

        grad_norm = clip_grad_norm(session) if cfg.max_grad_norm else None
        step_loss = acc.reduce(loss_sum, reduction="sum").item()  # the same number on every process
        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(progress.global_step + 1, step_loss, cursor.file_step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        progress.global_step += 1
        cursor.file_step += 1
        step_tokens = sum(len(e.input_ids) for row in rows for e in row)
        replay_tokens = sum(len(e.input_ids) for _sha, e in replayed)
        progress.tokens_seen += step_tokens
        progress.examples_seen += n_trained
        cursor.replayed += len(replayed)
        tokens_trained += step_tokens
        losses.append(step_loss)
        progress.train_seconds += time.perf_counter() - t_step
        now = time.perf_counter()
        recent.append((now, tokens_trained))
        rate = (recent[-1][1] - recent[0][1]) / (now - recent[0][0]) if now > recent[0][0] else 0.0
        record = StepRecord(step=progress.global_step, file=data.sha256, file_name=data.name,
                            file_step=cursor.file_step, file_total_steps=total, loss=step_loss, lr=lr,
                            grad_norm=grad_norm, tokens=step_tokens, examples=n_trained, replayed=len(replayed),
                            replay_tokens=replay_tokens, tokens_per_second=rate, time=time.time(),
                            objective=sums.reduced(acc) if counts.judged else {})
        observers.step_ended(model, progress, data, record, seen)
        if session.writing.thread is not None and session.writing.thread.done():
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
        verdict = observers.file_ended(model, progress, data, cursor)
        if verdict and verdict["tripped"] and gate.undoes(cfg) and can_undo(session, cursor):
            # Nothing ended, nothing saved: the caller takes the run back to before the file (rollback.undo_file).
            return FileResult(status="forgot", steps=progress.global_step - step_before, expected_steps=total,
                              file_step=cursor.file_step, step_before=step_before, step_after=progress.global_step,
                              loss=sum(losses) / len(losses) if losses else None, tokens=tokens_trained,
                              seconds=time.perf_counter() - t0, checkpoint=None, gate=verdict)
        end_file(session, data, "done", forgetting=verdict)
        session.replay.add_file(data)
        observers.event(f"finished {data.name} at global step {progress.global_step}", progress.global_step)
    elif status == "skipped":
        rec = end_file(session, data, "skipped")
        observers.event(f"skipped {data.name} after {rec.steps}/{total} steps", progress.global_step)
    if status != "interrupted" or session.writing.saved_step != progress.global_step:
        save_checkpoint(session)
    if status == "done":
        session.replay.trim(progress)
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


def micro_batches(rows: list[list[Example]], accum: int, world: int, rank: int, own: int, per_process: int):
    """(index, rows) of each micro-batch this process runs in one optimizer step.

    The step's first `own` rows (the file's, replay.place filled their padding) are dealt round-robin over `accum`
    micro-batches; the rows of replay alone after them go into micro-batches of their own (at most `per_process`
    rows on each process), so they are padded to their own length: beside the file's rows a 40-token replayed
    answer would be padded to their 512. Every process derives the same count from the same rows."""
    extra = -(-(len(rows) - own) // (world * per_process))  # micro-batches of replay alone
    groups = [(rows[:own], k, accum) for k in range(accum)] + [(rows[own:], k, extra) for k in range(extra)]
    for m, (group, k, n) in enumerate(groups):
        mine = [row for i, row in enumerate(group) if i % (world * n) == k * world + rank]
        if mine or world > 1:  # every process runs every micro-batch, so DDP's collectives stay in step
            yield m, mine


def evidence(rank: int, m: int, rows: list[list[Example]], replayed: dict[int, str]) -> dict:
    """One micro-batch as it reached the model: the file's examples (by Example.id: a line, or "line/window" for a
    window of a long text), the replayed [sha256, id]s and the tokens.

    A replayed example is told apart from the file's own by identity (the same line number can be both);
    identities stay in this process, only ids travel to the main one (observe/trace.py writes them).
    """
    examples = [e for row in rows for e in row]
    return {"rank": rank, "index": m, "examples": [e.id for e in examples if id(e) not in replayed],
            "replay": [[replayed[id(e)], e.id] for e in examples if id(e) in replayed],
            "tokens": sum(len(e.input_ids) for e in examples)}


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
        session.observers.held_out(data)
    elif cursor.settings != settings or cursor.total_steps != total:
        raise RunMismatch(f"{data.name} was interrupted at step {cursor.file_step}/{cursor.total_steps} with "
                          f"{cursor.settings}; it must be finished with the same batch settings, got {settings}")
    elif cursor.file_step:
        session.say(f"evertrain: {data.name} resumes at its step {cursor.file_step}/{total}")
    progress.current = data.sha256
    return cursor, first_time


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


def can_undo(session: Session, cursor: FileCursor) -> bool:
    """Is the state before the file there to go back to: the base model, or a checkpoint of that step that
    verifies (asked only when the gate has tripped: hashing a checkpoint is not free)?"""
    start = cursor.first_step - 1
    return start == 0 or checkpoint.at_step(session.output_dir, start) is not None
