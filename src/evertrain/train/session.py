"""The training session: what training holds in memory from one file to the next, and what `fit` hands back.

A Session is made by `setup` (train/setup.py) and written only by the training code (the loop, saving,
rollback). Vocabulary: a *micro-batch* is one forward/backward pass on one process; an *optimizer step* (or just
*step*) consumes one global batch of rows = batch_size x processes x gradient_accumulation. Everything is
scheduled on optimizer steps.

    python -c "from evertrain.train.session import StepRecord; help(StepRecord)"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evertrain import logs
from evertrain.config import TrainConfig
from evertrain.runs import Run

# The caller's answer to a step, besides None (go on).
STOP, SKIP = "stop", "skip"


class RunMismatch(RuntimeError):
    """The settings that define a run differ from the run already in the output folder."""


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float, file_step: int):
        self.step, self.loss, self.file_step = step, loss, file_step
        super().__init__(f"loss is {loss} at global step {step} (the file's step {file_step}); nothing of that "
                         "step was applied")


class LostReference(RuntimeError):
    """A preference or feedback file's reference is gone after steps trained against it: the model is no longer
    the reference, so it cannot be computed again and the file cannot go on."""


@dataclass
class Retention:
    """What the caller asks of the checkpoints: which to keep whatever `keep_checkpoints` says (pinned by a
    person), a disk budget for all of them, and files of its own sealed into each one (the daemon's ledger copy)."""

    pinned: set[str] = field(default_factory=set)
    budget_bytes: int | None = None
    extra_files: Callable[[Path], None] | None = None


@dataclass
class Writing:
    """The state of checkpoint writing (train/saving.py): the newest checkpoint on disk, and the one a thread
    may be writing with the CPU copies it writes from (reused save after save: allocating and pinning a 1.5B full
    fine-tune's 18 GB at every save would take longer than copying it)."""

    last_checkpoint: Path | None = None
    saved_step: int | None = None       # global step of the newest checkpoint on disk
    thread: object = None               # a checkpoint.Write in flight (overlap_checkpoints)
    host_copies: dict = field(default_factory=dict)


@dataclass
class Session:
    config: TrainConfig
    run: Run
    accelerator: object
    model: object
    tokenizer: object
    optimizer: object
    progress: object                    # train/state.py TrainingProgress
    identity: dict                      # what defines the run; identity["sharding"] == "fsdp2": sharded by FSDP2
    gradient_accumulation: int          # micro-batches per step on each process: what keeps the run's global batch
    observers: object                   # observe.Observers
    objectives: object                  # train/objectives.py Objectives: the loss of a micro-batch
    replay: object                      # train/replay.py Replay
    retention: Retention
    writing: Writing

    @property
    def output_dir(self) -> Path:
        return self.run.run_dir

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.gradient_accumulation

    @property
    def sharded(self) -> bool:
        return self.identity["sharding"] == "fsdp2"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def last_checkpoint(self) -> Path | None:
        return self.writing.last_checkpoint

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
    replay_tokens: int         # their input tokens (part of `tokens`): the dose replay costs in compute
    tokens_per_second: float   # over the last few steps (RATE_STEPS), not since the file began
    time: float                # wall clock (time.time()) at the step's end
    objective: dict = field(default_factory=dict)  # preference, feedback: the step's rewards, accuracy, margin,
    #                            KL, by TRL's names (objectives.Sums)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FileResult:
    status: str                # done | skipped | interrupted | rejected (the gate undid it) | forgot (see loop)
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
