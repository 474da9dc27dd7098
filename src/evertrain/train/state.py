"""TrainingProgress: everything a run needs to resume, in one small dataclass saved with every checkpoint.

It is written into `checkpoint-N/trainer_state.json` under the key "evertrain" (beside "global_step", the key
other tools read). Nothing about the run is ever parsed back out of folder names.

What the observers keep (the snapshot budget) is theirs and saved beside it ("observers" in the same file); a
checkpoint written before that held it here, and `from_state_dict` passes over such keys.

    python -c "from evertrain.train.state import TrainingProgress; print(TrainingProgress().state_dict())"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class FileRecord:
    """A file that finished training (or was skipped) in this run."""

    sha256: str
    name: str
    examples: int              # trained examples (held-out ones excluded)
    tokens: int
    steps: int                 # optimizer steps it got
    expected_steps: int
    first_step: int            # global step numbers (1-based) of its first and last optimizer step
    last_step: int
    status: str = "done"       # done | skipped | failed | rejected (by the forgetting gate: its steps undone)
    replayed: int = 0          # examples from earlier files mixed into its steps (replay_fraction)
    held_out: list[int] = field(default_factory=list)  # 0-based line numbers never trained
    forgetting: dict | None = None  # the forgetting gate's verdict on it (gate.judge), if the gate was on


@dataclass
class FileCursor:
    """A file part-way through training: where to pick it up again."""

    sha256: str
    name: str
    file_step: int             # optimizer steps of this file already done
    total_steps: int
    first_step: int            # global step of its first optimizer step
    settings: dict = field(default_factory=dict)  # batch settings the cursor is only valid for
    replayed: int = 0
    gate_before: dict | None = None  # the forgetting gate's baseline, taken before the file's first step
    attempt: int = 1           # 2: trained again after the gate tripped (forgetting_action retry)
    replay_boost: float = 1.0  # the replay dose's multiplier for this file (a retry's is stronger)
    forgot: dict | None = None  # the verdict that sent it back to be trained again


@dataclass
class TrainingProgress:
    global_step: int = 0       # optimizer steps in the whole run
    micro_batches: int = 0     # forward/backward passes on this process (never used for scheduling)
    tokens_seen: int = 0       # input tokens trained, all processes
    examples_seen: int = 0     # example-passes trained, all processes (an example in 2 epochs counts twice)
    current: str | None = None                                     # sha256 of the file in training, if any
    cursors: dict[str, FileCursor] = field(default_factory=dict)   # files part-way through, by sha256
    files: list[FileRecord] = field(default_factory=list)          # finished files, in order
    train_seconds: float = 0.0     # wall time inside optimizer steps: the base of the snapshot budget
    decay_start: int | None = None   # wsd: global step where the decay began (None: not decaying)
    decay_steps: int = 0

    def accepted(self) -> FileRecord | None:
        """The newest file that finished and passed the forgetting gate (or had no gate): the model at its last
        step is the one to serve (`evertrain serve`) and the one checkpoint retention never deletes. A file
        whose gate tripped and was kept (forgetting_action alert) is not accepted; one rejected, skipped or
        failed never is."""
        return next((f for f in reversed(self.files)
                     if f.status == "done" and not (f.forgetting or {}).get("tripped")), None)

    def finished(self, sha256: str) -> FileRecord | None:
        return next((f for f in reversed(self.files) if f.sha256 == sha256 and f.status == "done"), None)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrainingProgress":
        d = {k: v for k, v in d.items() if k in _FIELDS}  # what an older checkpoint kept here and no longer is
        d["cursors"] = {k: FileCursor(**v) for k, v in d.get("cursors", {}).items()}
        d["files"] = [FileRecord(**f) for f in d.get("files", [])]
        return cls(**d)


_FIELDS = {f.name for f in fields(TrainingProgress)}
