"""`evertrain serve --release`: each accepted model exported for other servers (vLLM, llama.cpp, Ollama).

    evertrain serve WS --release                                  # WS/releases/step-N/, WS/releases/latest
    evertrain serve RUN --release --release-merge --release-gguf --release-quant q8_0 --notify-command CMD

When the server moves to a newer model, and once at start, the newest *accepted* model (versions.find_target;
with --follow checkpoints too, only accepted models are released) is written by `evertrain export` (export.export,
the same folder, card and checks) to ROOT/releases/step-N, ROOT being the workspace or the train --output-dir.
This runs in a thread of its own: answering never waits for it, and a model accepted while an export runs is
released when it ends (one superseded before its turn is skipped, as the follower skips it).

export writes into a hidden temporary folder and renames it: a step-N folder is always whole, so one that exists
is never exported again. Only then does `latest` move (a new symlink renamed over the old one), the releases
beyond the newest --release-keep go (never the one `latest` names; renamed aside first, so no reader sees half a
folder), and notify_command gets one event on its stdin:

    {"event": "release", "text": ..., "time": ..., "run": ROOT, "path": ".../releases/step-N", "step": N,
     "checkpoint": "checkpoint-N", "files": [data files learned, in order], "kind": "adapter"|"merged"|"full",
     "gguf": ".../model-q8_0.gguf" or null}

A failed export is logged, leaves nothing behind, and the next accepted model is tried. One server releases a run
at a time (it holds releases/.evertrain.lock), so what a killed one left half-written is removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from evertrain import locks
from evertrain.export import ExportError, hub_id, open_source, saved_config
from evertrain.export.card import LINEAGE_FILE
from evertrain.files import fsync_dir
from evertrain.runs import CONFIG_FILE, open_run
from evertrain.serve.versions import ACCEPTED, Target, find_target
from evertrain.train import checkpoint

log = logging.getLogger("evertrain.serve")

LATEST = "latest"
STEP_FOLDER = re.compile(r"step-(\d+)")
# What a server killed mid-release leaves: export's temporary folders, releases renamed aside, a half-made link.
LEFTOVER = re.compile(r"\.(step-\d+\.(export-.+|pruned)|latest\.tmp)")


@dataclass
class ReleaseSettings:
    merge: bool = False              # a LoRA run: the merged model instead of the adapter
    gguf: bool = False               # and model-QUANT.gguf beside it (Llama architecture)
    quant: str = "f16"
    keep: int = 3                    # releases kept; `latest`'s is never deleted
    base_id: str | None = None       # a LoRA adapter's base model on the hub, when the run's base is a local folder
    notify_command: str | None = None  # None: the workspace's [daemon] notify_command (a train folder has none)
    command: str = ""                # the serve command line, for the release's card ("how it was made")


class Releaser(threading.Thread):
    """Releases the newest accepted model each time it is `offer`ed a chance, in its own thread."""

    def __init__(self, root: Path, settings: ReleaseSettings):
        super().__init__(name="evertrain-serve-release", daemon=True)
        from evertrain.daemon.notify import Notifier

        self.root, self.settings = Path(root), settings
        check(self.root, settings)
        command, timeout = notify_settings(self.root, settings.notify_command)
        self.notifier = Notifier(command, timeout, log.warning)
        self.folder = open_run(self.root).releases
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock: int | None = locks.hold(self.folder / locks.LOCK_NAME, "server releasing this run's models",
                                               "serve without --release, or stop that one first")
        except OSError as e:
            raise ExportError(f"{self.folder}: cannot release models there: {e.strerror or e}") from None
        for leftover in (p for p in self.folder.iterdir() if LEFTOVER.fullmatch(p.name)):
            remove(leftover)
        self.wake, self.stop = threading.Event(), threading.Event()
        self.busy: int | None = None     # the step being exported now
        self.last: Path | None = None    # the release `latest` names since the last pass that succeeded
        self.problem: str | None = None  # why the last release failed (None: it did not)

    def offer(self) -> None:
        self.wake.set()

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stop.is_set():
                return
            try:
                self.last = self.release_newest()
                self.problem = None
            except Exception as e:  # noqa: BLE001 - the server goes on; the next accepted model is tried
                self.problem = str(e)
                log.warning("evertrain: serve: the release failed (the next accepted model is tried): %s", e)
            finally:
                self.busy = None

    def release_newest(self) -> Path | None:
        """Export the newest accepted model unless it is released already; move `latest` to it; prune; tell."""
        from evertrain.export.export import export

        target = find_target(self.root, ACCEPTED)
        if target.step is None:
            return None  # the base model: nothing trained to release
        out = self.folder / f"step-{target.step}"
        fresh = not out.is_dir()
        if fresh:
            self.busy = target.step
            s = self.settings
            export(open_source(self.root, target.step), out, merge=s.merge, gguf=s.gguf, quant=s.quant,
                   base_id=s.base_id, command=s.command or f"evertrain serve {self.root} --release")
        self.link(out)
        self.prune()
        if fresh:
            self.tell(out, target)
        return out

    def link(self, out: Path) -> None:
        """`latest` -> out (relative, so the folder may be mounted elsewhere), replaced in one rename."""
        latest = self.folder / LATEST
        if latest.is_symlink() and os.readlink(latest) == out.name:
            return
        tmp = self.folder / f".{LATEST}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(out.name, tmp)
        os.replace(tmp, latest)
        fsync_dir(self.folder)

    def prune(self) -> None:
        """Keep the newest `keep` releases and the one `latest` names."""
        steps = sorted((int(m[1]), p) for p in self.folder.iterdir()
                       if (m := STEP_FOLDER.fullmatch(p.name)) and p.is_dir() and not p.is_symlink())
        latest = self.folder / LATEST
        named = os.readlink(latest) if latest.is_symlink() else None
        for _, path in steps[:-self.settings.keep]:
            if path.name != named:
                aside = path.with_name(f".{path.name}.pruned")
                path.rename(aside)  # gone from its name in one step; a reader of it never sees half a folder
                remove(aside)

    def tell(self, out: Path, target: Target) -> None:
        facts = json.loads((out / LINEAGE_FILE).read_text())["export"]
        gguf = facts.get("gguf")
        print(f"evertrain: released {target.checkpoint} ({facts['kind']}) to {out}", flush=True)
        self.notifier.send("release", f"released {target.checkpoint} ({facts['kind']}) to {out}",
                           run=str(self.root.absolute()), path=str(out.absolute()), step=target.step,
                           checkpoint=target.checkpoint, files=list(target.files), kind=facts["kind"],
                           gguf=str((out / gguf).absolute()) if gguf else None)

    def close(self) -> None:
        """Stop; a release under way is finished first (a second Ctrl-C leaves it: the next start clears it)."""
        self.stop.set()
        self.wake.set()
        if self.is_alive():
            if self.busy is not None:
                print(f"evertrain: waiting for the release of step {self.busy} to finish", flush=True)
            self.join()
        self.notifier.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def check(root: Path, settings: ReleaseSettings) -> None:
    """Refuse at start what every release would fail on: a LoRA adapter with no base on the hub, or GGUF of one,
    or GGUF of an architecture it does not convert. Judged on the run's settings (its newest checkpoint's, or
    before any, the workspace's [train]); a train folder with no checkpoint yet is judged at its first release."""
    found = run_config(root)
    if found is None:
        return
    config, where = found
    adapter = config.lora and not settings.merge
    if adapter and settings.gguf:
        raise ExportError(f"{where}: --release-gguf writes a whole model; add --release-merge to release this LoRA "
                          "run's adapter merged into its base")
    if adapter and not settings.base_id and hub_id(config) is None:
        raise ExportError(f"{where}: the base model is the local folder {config.model}, which means nothing on "
                          "another machine; pass --release-base-id ORG/NAME (its id on the hub) for the adapter, "
                          "or --release-merge to release the merged model")
    if settings.gguf and config.model not in (None, "embedded"):
        from transformers import AutoConfig

        try:
            kind = AutoConfig.from_pretrained(config.model).model_type
        except OSError:  # not readable now (no network): the model's load, or the first release, will say why
            return
        if kind != "llama":
            raise ExportError(f"{where}: --release-gguf converts the Llama architecture only (this model is "
                              f"{kind!r}); release without it and use llama.cpp's convert_hf_to_gguf.py")


def run_config(root: Path):
    """(TrainConfig, where it was read) of the run in `root`, or None when it has none yet."""
    from evertrain.config import TrainConfig

    run = open_run(root)
    newest = checkpoint.newest_complete(run.run_dir, warn=lambda _text: None)
    if newest is not None:
        return saved_config(newest), newest.path
    if run.is_workspace:
        from evertrain.daemon.workspace import read_settings

        path = run.work_dir / CONFIG_FILE
        return TrainConfig.from_dict(read_settings(path)[0], source=f"{path} [train]"), path
    return None


def notify_settings(root: Path, command: str | None) -> tuple[str, float]:
    """(command, time limit): --notify-command, else the workspace's [daemon] notify_command ("" for none)."""
    from evertrain.config import settings_from_dict
    from evertrain.daemon.workspace import DaemonConfig, read_settings

    run = open_run(root)
    if not run.is_workspace:
        return command or "", DaemonConfig().notify_timeout
    path = run.work_dir / CONFIG_FILE
    daemon = settings_from_dict(DaemonConfig, read_settings(path)[1], f"{path} [daemon]")
    return (daemon.notify_command if command is None else command), daemon.notify_timeout
