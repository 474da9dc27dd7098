"""Going back: to the newest complete checkpoint after a non-finite loss, or to the checkpoint before a file the
forgetting gate refused (forgetting_action rollback or retry). Either way a new session is made from what is on
disk, so the weights training goes on with are those of a checkpoint, bitwise, and the trace agrees with them.

    evertrain train --dataset F --output-dir D --forgetting-action rollback; echo $?   # 7: rejected, rolled back
"""

from __future__ import annotations

import dataclasses

import torch

from evertrain.data import FileData
from evertrain.train import checkpoint
from evertrain.train.loop import end_file
from evertrain.train.saving import save_checkpoint
from evertrain.train.session import Session
from evertrain.train.setup import setup


def release(session: Session) -> None:
    """Let go of a session's model and optimizer (the session is done with)."""
    import gc

    session.accelerator.free_memory()
    session.model = session.optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reload(session: Session, resume: checkpoint.Checkpoint | None | str = "newest") -> Session:
    """A new session from the newest complete checkpoint (or `resume`), with `session`'s retention: what was
    trained since that checkpoint is forgotten (its trace lines dropped), so it is trained again exactly once."""
    return setup(session.config, session.run, resume=resume, retention=session.retention)


def roll_back(session: Session, data: FileData) -> Session:
    """After a non-finite loss: a new session from the newest complete checkpoint, with `data` ended there as
    failed (and that checkpointed), so the broken weights are gone and the file is never resumed."""
    fresh = reload(session)
    if data.sha256 in fresh.progress.cursors:
        end_file(fresh, data, "failed")
        save_checkpoint(fresh)
    return fresh


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
    fresh = reload(session, checkpoint.at_step(session.output_dir, start, full=False))
    # The numbers measured before the file are those of the weights now loaded: the next baseline, unmeasured.
    fresh.observers.gate.remember(start, cursor.gate_before["files"], cursor.gate_before["anchor"])
    if cfg.forgetting_action == "retry" and cursor.attempt == 1:
        fresh.progress.cursors[data.sha256] = dataclasses.replace(
            cursor, file_step=0, replayed=0, attempt=2, replay_boost=cfg.retry_replay_boost, forgot=verdict)
        fresh.observers.held_out(data)
        fresh.say(f"evertrain: {data.name}: {verdict['reason']}; training it again from global step {start} "
                  f"with {cfg.retry_replay_boost:g}x the replay dose, the anchor included")
    else:
        end_file(fresh, data, "rejected", forgetting=verdict)
        fresh.say(f"evertrain: {data.name}: REJECTED: {verdict['reason']}; rolled back to global step {start}")
    save_checkpoint(fresh)
    return fresh
