"""Preparing the next queued file in the background while the current one trains.

A file's token store is the slow part of starting it (reading, rendering, tokenizing: minutes for millions of
examples). While file N trains, a thread builds the store of the file queued after it, with its own copy of
the tokenizer; when N ends, the next file's store is already on disk and it starts within a second. What the
thread builds is only a cache: if it is cancelled, fails or guessed the wrong file, the daemon prepares the
file itself as it would have anyway (and a bad file fails then, before any of it trains).

    evertrain run DIR       # drop two big files: the second is prepared while the first trains
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

from evertrain.data import Cancelled, DataError, load_file


class Prefetch:
    def __init__(self, tokenizer, config, store_dir: Path, say, attempts=None):
        self.tokenizer = copy.deepcopy(tokenizer)  # the training thread keeps using its own
        self.config, self.store_dir, self.say = config, store_dir, say
        # the ledger's count of preparations the process died in (Ledger.preparing): a file that once killed
        # it is not built here again, where a second death could not be told from the current file's
        self.attempts = attempts or (lambda path, background: None)
        self.path: Path | None = None
        self.thread: threading.Thread | None = None
        self.cancel = threading.Event()
        self.fraction = 0.0

    def start(self, path: Path | None) -> None:
        """Build `path`'s store in the background (no-op when it is already being built or was built)."""
        if path is None or path == self.path:
            return
        self.stop()
        self.path, self.fraction, self.cancel = path, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._build, args=(path, self.cancel), daemon=True,
                                       name="evertrain-prefetch")
        self.thread.start()

    def _build(self, path: Path, cancel: threading.Event) -> None:
        started = time.monotonic()
        try:
            data = load_file(path, self.tokenizer, self.config, store_dir=self.store_dir,
                             progress=lambda f: setattr(self, "fraction", f), should_stop=cancel.is_set,
                             attempt=self.attempts(path, background=True))
            self.say(f"evertrain: prepared the next file {path.name} in the background "
                     f"({time.monotonic() - started:.1f} s, {len(data.examples)} examples)")
        except (Cancelled, DataError, OSError):
            pass  # a cache only: the daemon prepares (or fails) the file itself when its turn comes
        except Exception as e:  # noqa: BLE001 - a background cache must never take the daemon down
            self.say(f"evertrain: background preparation of {path.name} stopped: {type(e).__name__}: {e}")

    def claim(self, path: Path, should_stop) -> None:
        """Before the daemon prepares `path`: wait for the thread if it is building that file, else stop it."""
        if self.thread is None or not self.thread.is_alive():
            return
        if path != self.path:
            self.stop()
            return
        while self.thread.is_alive() and not should_stop():
            self.thread.join(0.1)
        if self.thread.is_alive():
            self.stop()

    def stop(self) -> None:
        if self.thread is not None:
            self.cancel.set()
            self.thread.join()
        self.thread, self.path = None, None
