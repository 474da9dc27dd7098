"""One file, from its path to its outcome: the same for the `train` command and the daemon (every process of a
launch runs it alike, so their collective steps stay in step).

    outcome = driver.open_file(session, path)          # ready, or invalid / cancelled / duplicate
    outcome = driver.run(outcome.session, outcome.data, decide)   # done, or why not

The caller reports the outcome in its own way (cli.py: an exit code and a line; daemon/outcomes.py: the ledger,
the folders, the status and notify_command). Out of space anywhere is not a file's fate: DiskFull propagates.

    evertrain train --dataset FILE --output-dir DIR; echo $?     # the outcome as an exit code (exits.py)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evertrain import disk
from evertrain.data import Cancelled, DataError, FileData
from evertrain.train import rollback
from evertrain.train.loop import drive, end_file, fit, guard_problems, prepare
from evertrain.train.saving import finish_write, save_checkpoint
from evertrain.train.session import FileResult, LostReference, NonFiniteLoss, RunMismatch, Session, StepRecord
from evertrain.train.state import FileRecord

# What can become of a file (Outcome.status):
READY = "ready"              # open_file: checked and tokenized, to be run
INVALID = "invalid"          # the file cannot be trained (DataError, every reason named); nothing trained
CANCELLED = "cancelled"      # preparing it was asked to stop (a stop or pause): it stays to be trained later
DUPLICATE = "duplicate"      # its content (sha256) was trained in this run already; not trained again
MISMATCH = "mismatch"        # the settings differ from those it was interrupted with (RunMismatch); nothing trained
FAILED = "failed"            # it cannot go on (its reference was lost after steps trained against it): ended where
                             # it stood, as failed, its steps kept in the model
ROLLED_BACK = "rolled_back"  # the loss became NaN/inf: the run is back at its newest complete checkpoint, the file
                             # recorded there as failed
INTERRUPTED = "interrupted"  # stopped at a step boundary, checkpointed; it resumes at its cursor
SKIPPED = "skipped"          # ended early on request, with the steps it got
REJECTED = "rejected"        # the forgetting gate undid it: the run is back at the checkpoint before it
NOT_DONE = "not_done"        # trained, but a guard failed (`problems`)
DONE = "done"                # every step trained and on disk


@dataclass
class Outcome:
    status: str
    session: Session                      # the session training goes on with (a new one after a rollback)
    data: FileData | None = None
    result: FileResult | None = None
    error: Exception | None = None        # the DataError, RunMismatch or NonFiniteLoss behind the status
    earlier: FileRecord | None = None     # DUPLICATE: the file of the same content that was trained
    problems: list[str] = field(default_factory=list)  # NOT_DONE: the guards that failed


def open_file(session: Session, path: Path, *, name: str | None = None, allow_repeat: bool = False,
              **prepare_kwargs) -> Outcome:
    """Check and tokenize the file at `path` (`name`: what people call it), and see whether it is to be trained."""
    try:
        data = prepare(session, path, **prepare_kwargs)
    except DataError as e:
        if disk.is_full(e):  # the token store found no room: not the file's fault
            raise
        return Outcome(INVALID, session, error=e)
    except Cancelled:
        return Outcome(CANCELLED, session)
    if name:
        data.name = name
    earlier = session.progress.finished(data.sha256)
    if earlier is not None and not allow_repeat:
        return Outcome(DUPLICATE, session, data, earlier=earlier)
    return Outcome(READY, session, data)


def run(session: Session, data: FileData, decide: Callable[[StepRecord], str | None]) -> Outcome:
    """Train (or resume) `data` until it ends or `decide` stops it."""
    try:
        session, result = run_file(session, data, decide)
    except RunMismatch as e:
        return Outcome(MISMATCH, session, data, error=e)
    except NonFiniteLoss as e:
        return Outcome(ROLLED_BACK, rollback.roll_back(session, data), data, error=e)
    except LostReference as e:  # raised before any step of this call: the session is as the checkpoint left it
        end_file(session, data, "failed")
        save_checkpoint(session)
        return Outcome(FAILED, session, data, error=e)
    if result.status != DONE:
        return Outcome(result.status, session, data, result)
    problems = guard_problems(session, result)
    return Outcome(NOT_DONE if problems else DONE, session, data, result, problems=problems)


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
        session = rollback.undo_file(session, data, result.gate)
        if data.sha256 not in session.progress.cursors:
            return session, dataclasses.replace(result, status=REJECTED, checkpoint=session.last_checkpoint,
                                                step_after=session.progress.global_step)
