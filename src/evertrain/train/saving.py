"""Writing a checkpoint: a copy of what training holds, written into a temporary folder and committed atomically.

`save_checkpoint` writes checkpoint-<global step> while training waits (every process takes part), or, with
`overlap` (overlap_checkpoints: one process), copies what training changes into CPU memory and lets a thread write
it while training goes on (`Writing.thread`): it becomes the newest once committed (`finish_write`). One write at a
time, in step order. Whatever fails for room removes its partial folder and raises DiskFull: the newest complete
checkpoint stays the newest. The record sealed with it holds everything a resume needs: the progress (the cursor),
the observers' state, the run's identity, the files trained, the schedule, the settings, every process's RNG.

    evertrain train --dataset F --output-dir D --save-steps 50 --overlap-checkpoints on
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evertrain import collective, disk, faults
from evertrain.data import store as token_store
from evertrain.files import folder_size
from evertrain.observe import gate
from evertrain.runs import SETTINGS_FILE
from evertrain.train import checkpoint, references, sharding
from evertrain.train.schedule import lr_factor
from evertrain.train.session import Session


def checkpoint_bytes(session: Session) -> int:
    """About what the next checkpoint takes on disk: the last one's size, or weights + two AdamW moments."""
    if session.writing.last_checkpoint is not None and session.writing.last_checkpoint.is_dir():
        return folder_size(session.writing.last_checkpoint)
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
    session.writing.last_checkpoint, session.writing.saved_step = path, session.progress.global_step
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
class Copy:
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
    references: set[str]          # reference files pruning keeps (those of the files still open)


def take_copy(session: Session, weights: dict, optimizer: dict | None, *, copy: bool) -> Copy:
    acc, progress, cfg = session.accelerator, session.progress, session.config
    if copy:  # what training changes: weights it trains (a LoRA run's frozen base stays where it is), moments
        # The last write is finished (save_checkpoint waits for it first), so its copies are free to take again.
        copies, trained = {}, {p.data_ptr() for p in session.model.parameters() if p.requires_grad}
        reuse = session.writing.host_copies
        weights = {k: cpu_copy(v, copies, reuse) if v.data_ptr() in trained else v for k, v in weights.items()}
        optimizer = cpu_copy(optimizer, copies, reuse)
        if acc.device.type == "cuda":
            torch.cuda.current_stream(acc.device).synchronize()  # the copies ran non-blocking: the thread reads them
        session.writing.host_copies = copies  # those of tensors no longer there (a rollback's new moments) go
    # A gate that can undo a file keeps the checkpoint from before each open file, whatever keep_checkpoints.
    before = {checkpoint.final_path(session.output_dir, c.first_step - 1).name for c in progress.cursors.values()
              } if gate.undoes(cfg) else set()
    return Copy(
        step=progress.global_step, model=acc.unwrap_model(session.model), weights=weights, optimizer=optimizer,
        rng=rng_state(), record=deepcopy({
            "global_step": progress.global_step, "run": session.identity, "evertrain": progress.state_dict(),
            "observers": session.observers.state_dict(),
            "files": [{"sha256": f.sha256, "name": f.name, "steps": f.steps} for f in progress.files]}),
        scheduler={"name": cfg.lr_schedule, "peak_lr": cfg.learning_rate, "warmup_steps": cfg.warmup_steps,
                   "decay_start": progress.decay_start, "decay_steps": progress.decay_steps,
                   "next_lr": cfg.learning_rate * lr_factor(cfg.lr_schedule, progress.global_step, cfg.warmup_steps,
                                                            progress.decay_start, progress.decay_steps)},
        config=cfg.to_dict(), keep=set(session.retention.pinned) | before, stores={sha[:16] for sha in progress.cursors},
        references={references.path_of(session.run, sha, c.first_step - 1).name for sha, c in progress.cursors.items()})


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
    snap = take_copy(session, weights, None if session.sharded else session.optimizer.state_dict(), copy=False)
    shared_write(session, tmp, (lambda: write_files(session, tmp, snap)) if main else None)
    shared_write(session, tmp, lambda: torch.save(snap.rng, tmp / f"rng_state_{acc.process_index}.pt"))
    shared_write(session, tmp, (lambda: commit(session, tmp, snap)) if main else None)
    return checkpoint.final_path(session.output_dir, snap.step)


def start_write(session: Session, tmp: Path) -> None:
    """save_checkpoint(overlap=True), one process: the folder and the daemon's files now (its ledger connection
    belongs to this thread), the rest copied now and written by a thread (checkpoint.Write)."""
    try:
        new_folder(session, tmp)
        snap = take_copy(session, session.accelerator.get_state_dict(session.model), session.optimizer.state_dict(),
                         copy=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def work() -> Path:
        write_files(session, tmp, snap)
        torch.save(snap.rng, tmp / "rng_state_0.pt")
        return commit(session, tmp, snap)

    session.writing.thread = checkpoint.Write(snap.step, tmp, work)


def finish_write(session: Session, *, quietly: bool = False) -> None:
    """Wait for the checkpoint a thread is writing, if one is; complete, it is the newest. `quietly`: on the way
    out of another error, a failure of its own is not raised over it (it removed its partial folder)."""
    write, session.writing.thread = session.writing.thread, None
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
    session.writing.last_checkpoint, session.writing.saved_step = path, write.step


def new_folder(session: Session, tmp: Path) -> None:
    """The checkpoint's empty temporary folder, with the caller's files in it (Retention.extra_files)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if session.retention.extra_files:
        session.retention.extra_files(tmp)


def write_files(session: Session, tmp: Path, snap: Copy) -> None:
    """The main process's part of a checkpoint: weights, tokenizer, optimizer (unsharded), schedule, settings."""
    snap.model.save_pretrained(tmp, state_dict=snap.weights, safe_serialization=True)
    session.tokenizer.save_pretrained(tmp)
    if snap.optimizer is not None:
        torch.save(snap.optimizer, tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(snap.scheduler, indent=2))
    (tmp / SETTINGS_FILE).write_text(json.dumps(snap.config, indent=2, sort_keys=True))
    faults.hit("checkpoint-write")


def commit(session: Session, tmp: Path, snap: Copy) -> Path:
    """Seal the written folder as checkpoint-<step>, then prune old checkpoints and token stores."""
    path = checkpoint.commit(tmp, snap.record)
    checkpoint.prune(session.output_dir, session.config.keep_checkpoints, protected=snap.keep,
                     budget_bytes=session.retention.budget_bytes, newest=path)
    # Token stores of files still open stay; of the rest, the most recently used few (a file dropped again).
    token_store.prune(session.run.tokens, keep=snap.stores)
    references.prune(session.run, snap.references)
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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(path: Path, rank: int) -> None:
    f = path / f"rng_state_{rank}.pt"
    if not f.exists():
        return
    state = torch.load(f, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
