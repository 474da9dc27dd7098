"""Which model the server answers with, and how it moves to a newer one while requests are in flight.

    evertrain serve WS                        # the newest accepted model, followed as the daemon trains
    evertrain serve WS --follow checkpoints   # every complete checkpoint, accepted or not

The newest *accepted* model is the checkpoint at the end of the newest file that finished and passed the
forgetting gate (TrainingProgress.accepted; checkpoint retention never prunes it). A rejected or undone file's
weights are never served, nor a checkpoint that is not complete: the checkpoint is found through its run's newest
complete checkpoint and verified before anything is read (readers never rename anything: a daemon may be in the
middle of a commit). Before any file is accepted, the base model is served.

`Versions` holds at most two models. A request takes the current one (`acquire`) and keeps it to its end; the
follower loads a newer one beside it and swaps (`install`): requests that started before go on with the old
weights, new ones get the new weights, and the old model is let go when its last request ends. A third model
is never loaded: a newer checkpoint waits until the old one is free. A LoRA run loads its base once and each
version's adapter into it, by name; a request generates with its own adapter (PEFT's `adapter_names`).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from evertrain.runs import open_run
from evertrain.train import checkpoint

log = logging.getLogger("evertrain.serve")

ACCEPTED, CHECKPOINTS = "accepted", "checkpoints"


@dataclass(frozen=True)
class Target:
    """What should be served: a checkpoint (its step) or the base model (step None)."""

    step: int | None
    checkpoint: str | None          # "checkpoint-120"
    files: tuple[str, ...] = ()      # the files it has learned, in training order


@dataclass
class Version:
    """A loaded model and what it is."""

    target: Target
    model: object
    tokenizer: object
    adapter: str | None = None       # a LoRA version's adapter name in the shared base (None: a whole model)
    users: int = 0
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0        # reading it in (not the wait for room beside two models)

    @property
    def label(self) -> str:
        """The version's name in answers: 'step-120' (or 'base')."""
        return "base" if self.target.step is None else f"step-{self.target.step}"

    def generate_kwargs(self) -> dict:
        return {"adapter_names": [self.adapter]} if self.adapter else {}


def find_target(root: Path, follow: str = ACCEPTED) -> Target:
    """What the run in `root` offers now: its newest accepted model (or, following checkpoints, its newest
    complete checkpoint); the base model when there is none yet. Reads only; never renames. Sizes only, not
    sha256s: the server looks every few seconds, and hashing a model's gigabytes each time would take a core from
    its answers; the version it then loads is verified in full (export.open_source)."""
    run = open_run(root)
    newest = checkpoint.newest_complete(run.run_dir, warn=lambda _text: None, full=False)
    if newest is None:
        return Target(None, None)
    progress = newest.state.get("evertrain") or {}
    done = [f for f in progress.get("files", []) if f.get("status") == "done"]
    if follow == CHECKPOINTS:
        return Target(newest.step, newest.name, tuple(f["name"] for f in done))
    from evertrain.train.state import TrainingProgress

    accepted = TrainingProgress.from_state_dict(progress).accepted()
    if accepted is None:
        return Target(None, None)
    found = checkpoint.at_step(run.run_dir, accepted.last_step, full=False)
    if found is None:  # pruned by a run from before retention kept it: the newest accepted one left, if any
        return _older_accepted(run.run_dir) or Target(None, None)
    return Target(found.step, found.name, tuple(f["name"] for f in done if f["last_step"] <= accepted.last_step))


def _older_accepted(run_dir: Path) -> Target | None:
    from evertrain.train.state import TrainingProgress

    for c in checkpoint.candidates(run_dir):
        if checkpoint.verify(c, full=False) is not None:
            continue
        progress = TrainingProgress.from_state_dict(c.state.get("evertrain") or {})
        accepted = progress.accepted()
        if accepted is not None and accepted.last_step == c.step:
            return Target(c.step, c.name, tuple(f.name for f in progress.files if f.status == "done"))
    return None


class Versions:
    """The model(s) in memory: the current one, and the one before while requests still use it."""

    def __init__(self, root: Path, *, dtype: str | None = None):
        self.root, self.dtype = Path(root), dtype
        self.lock = threading.Condition()
        self.current: Version | None = None
        self.loaded: list[Version] = []
        self.base = None                 # a LoRA run's base model, shared by its adapters
        self.swaps = 0

    def acquire(self) -> Version:
        with self.lock:
            version = self.current
            version.users += 1
            return version

    def release(self, version: Version) -> None:
        with self.lock:
            version.users -= 1
            if version is not self.current and version.users == 0:
                self._drop(version)
            self.lock.notify_all()

    def load(self, target: Target, stop: threading.Event | None = None) -> Version | None:
        """The model of `target`, loaded beside the current one (waiting while two are in memory); None when
        `stop` was set while it waited."""
        with self.lock:
            while len(self.loaded) >= 2:
                if stop is not None and stop.is_set():
                    return None
                self.lock.wait(0.2)
        started = time.monotonic()
        version = self._read(target)
        version.load_seconds = time.monotonic() - started
        with self.lock:
            self.loaded.append(version)
        return version

    def install(self, version: Version) -> None:
        """Make `version` the one new requests get; the old one goes when its last request ends."""
        with self.lock:
            old, self.current = self.current, version
            if old is not None:
                self.swaps += 1
                if old.users == 0:
                    self._drop(old)
            self.lock.notify_all()

    def _drop(self, version: Version) -> None:
        self.loaded.remove(version)
        if version.adapter is not None:
            self.base.delete_adapter(version.adapter)
        version.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def _read(self, target: Target) -> Version:
        from evertrain.export import open_source
        from evertrain.export.chat import speaker
        from evertrain.export.export import load_tokenizer

        if target.step is None:
            who = speaker(self.root, "base")
            return Version(target, who.model, who.tokenizer)
        source = open_source(self.root, target.step)
        if not source.config.lora:
            who = speaker(self.root, target.step)
            return Version(target, who.model, who.tokenizer)
        return self._read_adapter(source, target, load_tokenizer(source))

    def _read_adapter(self, source, target: Target, tokenizer) -> Version:
        """A LoRA checkpoint: its adapter into the base this server holds (loaded once), under a new name."""
        from evertrain import models

        name = f"step-{target.step}-{self.swaps + len(self.loaded)}"
        if self.base is None:
            from peft import PeftModel

            base = models.load_model(models.resolve_model(source.config.model), self.dtype or source.config.dtype)
            self.base = PeftModel.from_pretrained(base, source.ckpt.path, adapter_name=name, is_trainable=False)
        else:
            self.base.load_adapter(source.ckpt.path, adapter_name=name, is_trainable=False)
        self.base.eval()
        self.base.config.use_cache = True
        return Version(target, self.base, tokenizer, adapter=name)


class Follower(threading.Thread):
    """Polls the run every `poll_seconds` and swaps to a newer target. A load that fails (a checkpoint pruned
    while it was read) is tried again at the next poll; the model in service stays."""

    def __init__(self, versions: Versions, follow: str, poll_seconds: float, on_swap=None):
        super().__init__(name="evertrain-serve-follow", daemon=True)
        self.versions, self.follow, self.poll = versions, follow, poll_seconds
        self.on_swap = on_swap or (lambda version: None)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.problem: str | None = None

    def check(self) -> Version | None:
        """One look at the run: the version installed, or None when nothing changed."""
        target = find_target(self.versions.root, self.follow)
        current = self.versions.current
        if current is not None and current.target.step == target.step:
            return None
        version = self.versions.load(target, self.stop)
        if version is None:
            return None
        self.versions.install(version)
        log.info("serving %s (%s)", version.label, target.checkpoint or "the base model")
        self.on_swap(version)
        return version

    def run(self) -> None:
        while not self.stop.is_set():
            self.wake.wait(self.poll)
            self.wake.clear()
            if self.stop.is_set():
                return
            try:
                self.check()
                self.problem = None
            except Exception as e:  # noqa: BLE001 - the server goes on with the model it has
                self.problem = str(e)
                log.warning("serve: could not load the run's newer model (tried again in %gs): %s", self.poll, e)
