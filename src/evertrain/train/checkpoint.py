"""Checkpoints: written atomically, verified before use, pruned without ever losing the newest good one.

A checkpoint is first written to `OUTPUT_DIR/.tmp-checkpoint-N/`, every file fsync'd, then renamed to
`checkpoint-N/` and the parent folder fsync'd: a crash leaves either no checkpoint-N or a complete one.
`trainer_state.json` is written last and lists every other file with its size and sha256 (the manifest);
resume verifies the manifest and falls back to the previous checkpoint when the newest fails. When checkpoints
exist and none verifies, resume refuses (NoUsableCheckpoint) rather than start the run again from the base model;
`--from-base` moves the damaged ones into OUTPUT_DIR/damaged/ and starts again.
Checkpoints are ordered by the global step recorded inside them, never by folder name or mtime.

    python -m evertrain.train.checkpoint OUTPUT_DIR      # list checkpoints and whether each verifies
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from evertrain import faults
from evertrain.config import ConfigError
from evertrain.files import folder_size, fsync_dir, fsync_tree, sha256_file

STATE_FILE = "trainer_state.json"
FORMAT = 1
DAMAGED_DIR = "damaged"  # where --from-base moves checkpoints that do not load; never deleted


class NoUsableCheckpoint(ConfigError):
    """Checkpoints exist and none of them loads: starting from the base model would silently drop the run."""

    def __init__(self, output_dir: Path, problems: list[tuple[Path, str]]):
        self.output_dir, self.problems = output_dir, problems
        lines = "".join(f"\n  {path}: {why}" for path, why in problems)
        super().__init__(f"no checkpoint in {output_dir} loads; nothing was trained or changed:{lines}\n"
                         f"Restore a checkpoint, or start the run again from the base model with --from-base "
                         f"(the damaged checkpoints are then moved to {Path(output_dir) / DAMAGED_DIR}/)")

    def __reduce__(self):  # the main process of a launch sends it to the others (collective.from_main)
        return type(self), (self.output_dir, self.problems)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict

    @property
    def name(self) -> str:
        return self.path.name


def manifest(folder: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != STATE_FILE:
            out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def temp_path(output_dir: Path, step: int) -> Path:
    return output_dir / f".tmp-checkpoint-{step}"


def final_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def commit(tmp: Path, state: dict) -> Path:
    """Seal a fully written temporary checkpoint folder and move it into place. Main process only."""
    state = dict(state, format=FORMAT, manifest=manifest(tmp))
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=2)
    fsync_tree(tmp)
    final = final_path(tmp.parent, state["global_step"])
    if final.exists():
        # The same step saved again (e.g. a stop right after a resume): swap, never leave a gap of nothing.
        old = tmp.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        faults.hit("old-swap")
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    faults.hit("after-rename")
    fsync_dir(tmp.parent)
    return final


class Write:
    """A checkpoint being written and committed by a thread while training goes on (overlap_checkpoints).

    Until `wait` returns its path it is not a checkpoint: a crash meanwhile leaves `tmp` (debris, removed at the
    next start) and the one before it the newest, as a crash between two saves would. A failed write removes
    `tmp` and `wait` raises its error."""

    def __init__(self, step: int, tmp: Path, work):
        self.step, self.tmp, self.path, self.error = step, tmp, None, None
        self.thread = threading.Thread(target=self._run, args=(work,), name=f"evertrain-checkpoint-{step}",
                                       daemon=True)
        self.thread.start()

    def _run(self, work) -> None:
        try:
            self.path = work()
        except BaseException as e:  # noqa: BLE001 - raised again in the training thread, by wait()
            self.error = e
            shutil.rmtree(self.tmp, ignore_errors=True)

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.path


def read_state(path: Path) -> dict | None:
    try:
        with open(path / STATE_FILE) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or "manifest" not in state:
        return None
    return state


def verify(ckpt: Checkpoint, *, full: bool = True) -> str | None:
    """None when every file of the manifest is there with its size (and, if `full`, its sha256); else why not."""
    for rel, meta in ckpt.state["manifest"].items():
        p = ckpt.path / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {meta['size']}"
        if full and sha256_file(p) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def candidates(output_dir: Path) -> list[Checkpoint]:
    """Checkpoints whose state file parses, newest (highest recorded global step) first; not yet verified."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-"):
                state = read_state(p)
                if state is not None:
                    found.append(Checkpoint(p, state["global_step"], state))
    return sorted(found, key=lambda c: c.step, reverse=True)


def recover_swap(output_dir: Path) -> None:
    """A crash in the middle of `commit`'s swap left checkpoint-N moved aside and nothing in its place: put it back.
    Only for the holder of the folder's lock (`remove_debris`): in a live run the same state is a commit between
    its two renames, which a reader's rename would break."""
    if not output_dir.is_dir():
        return
    for old in output_dir.glob(".old-checkpoint-*"):
        final = output_dir / old.name[len(".old-"):]
        if not final.exists() and read_state(old) is not None:
            old.rename(final)


def remove_debris(folder: Path) -> list[Path]:
    """Remove what crashed writes left in `folder`: temporary checkpoints, swapped-out old ones (after putting
    back any that is the only copy), and the temps of `write_text_atomic`. Only for the holder of the folder's
    lock (locks.py): a live writer's temps are not debris."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    recover_swap(folder)
    removed = []
    for p in folder.iterdir():
        stale_old = p.name.startswith(".old-checkpoint-") and (folder / p.name[len(".old-"):]).exists()
        if p.name.startswith(".tmp-checkpoint-") or stale_old:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def unreadable(output_dir: Path) -> list[tuple[Path, str]]:
    """checkpoint-* folders whose state file does not parse: `candidates` cannot even order them."""
    out = []
    if output_dir.is_dir():
        for p in sorted(output_dir.iterdir()):
            if p.is_dir() and p.name.startswith("checkpoint-") and read_state(p) is None:
                out.append((p, f"{STATE_FILE} is missing or does not parse"))
    return out


def newest_complete(output_dir: Path, *, warn=print, damaged: str = "skip", full: bool = True) -> Checkpoint | None:
    """The newest checkpoint that verifies (`full`: its sha256s too, else its files and their sizes, which is what
    a poller can afford every few seconds); broken newer ones are reported and passed over.

    It only reads (export, chat, the page and `status` call it beside a live daemon), unless `damaged` says
    otherwise. When checkpoints exist but none verifies, `damaged` decides: "skip" returns None (the caller's
    business), "refuse" raises NoUsableCheckpoint naming each one's problem, "set-aside" moves them into damaged/
    (so that a run started again from the base model neither prunes its own good checkpoints for them nor trips
    on them) and returns None: that is for the holder of the folder's lock alone.
    """
    output_dir = Path(output_dir)
    problems, found = [], None
    for ckpt in candidates(output_dir):
        problem = verify(ckpt, full=full)
        if problem is None:
            found = ckpt
            break
        problems.append((ckpt.path, problem))
    problems += unreadable(output_dir)
    if found is None:
        if problems and damaged == "refuse":
            raise NoUsableCheckpoint(output_dir, problems)
        if damaged == "set-aside":
            for path, why in problems:
                warn(f"evertrain: moved {path} to {set_aside(path)} ({why})")
            return None
    for path, why in problems:
        warn(f"evertrain: skipping {path}: {why}")
    return found


def at_step(output_dir: Path, step: int, *, full: bool = True) -> Checkpoint | None:
    """The complete checkpoint of global step `step`, if one is there and verifies (`full`: its sha256s too)."""
    path = final_path(Path(output_dir), step)
    state = read_state(path)
    ckpt = Checkpoint(path, step, state) if state is not None and state["global_step"] == step else None
    return ckpt if ckpt is not None and verify(ckpt, full=full) is None else None


def discard_after(output_dir: Path, step: int) -> list[Path]:
    """Delete every checkpoint beyond global step `step`: training after it was undone (a rollback).

    Each is renamed to its temporary name first: once this returns, no resume can find one, even where the disk
    fails to delete it (what is left is debris, which `remove_debris` removes)."""
    output_dir = Path(output_dir)
    gone = [c for c in candidates(output_dir) if c.step > step]
    for c in gone:
        tmp = temp_path(output_dir, c.step)
        shutil.rmtree(tmp, ignore_errors=True)  # the debris of a write of that step cut by a crash
        os.rename(c.path, tmp)
    if gone:
        fsync_dir(output_dir)
    for c in gone:
        shutil.rmtree(temp_path(output_dir, c.step), ignore_errors=True)
    return [c.path for c in gone]


def resume_policy(from_base: bool, main_process: bool) -> str:
    """`newest_complete`'s `damaged` at resume: refuse; with --from-base set them aside, from one process only."""
    if not from_base:
        return "refuse"
    return "set-aside" if main_process else "skip"


def present(output_dir: Path) -> bool:
    """Whether any checkpoint-* folder is there, loadable or not."""
    output_dir = Path(output_dir)
    return output_dir.is_dir() and any(p.is_dir() and p.name.startswith("checkpoint-") for p in output_dir.iterdir())


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint into OUTPUT_DIR/damaged/, under a name not yet taken there."""
    target_dir = path.parent / DAMAGED_DIR
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / path.name, 1
    while target.exists():
        target, n = target_dir / f"{path.name}.{n}", n + 1
    path.rename(target)
    fsync_dir(path.parent)
    return target


def prune(output_dir: Path, keep: int, *, protected: set[str] = frozenset(), budget_bytes: int | None = None,
          newest: Path | None = None) -> list[Path]:
    """Delete old complete checkpoints beyond `keep` (and beyond a disk budget), oldest first.

    Never deleted: the newest complete checkpoint (`newest`, which the caller has just written or verified),
    and any checkpoint named in `protected` (pinned by a person).
    """
    ckpts = candidates(Path(output_dir))
    if newest is None and ckpts:
        newest = ckpts[0].path
    removable = [c for c in ckpts if c.path != newest and c.name not in protected]
    kept_count = len(ckpts) - len(removable)
    deleted = []
    size = {c.path: folder_size(c.path) for c in ckpts} if budget_bytes is not None else {}
    total = sum(size.values())
    # Oldest first: the list is newest first, so walk it from the end.
    for idx, c in reversed(list(enumerate(removable))):
        over_count = kept_count + idx + 1 > keep
        over_budget = budget_bytes is not None and total > budget_bytes
        if over_count or over_budget:
            shutil.rmtree(c.path, ignore_errors=True)
            total -= size.get(c.path, 0)
            deleted.append(c.path)
    # Debris of crashed saves: never complete, never useful.
    for p in Path(output_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    return deleted


if __name__ == "__main__":
    import sys

    for c in candidates(Path(sys.argv[1])):
        print(f"{c.path}  step {c.step}  {verify(c) or 'ok'}")
    for path, why in unreadable(Path(sys.argv[1])):
        print(f"{path}  {why}")
