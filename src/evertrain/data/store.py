"""The token store: a file's tokens on disk, keyed by its content and everything that changes its tokens.

OUTPUT_DIR/tokens/<key>/ holds flat arrays (ids.bin int32, mask.bin uint8, offsets/records/kinds/parts .npy;
parts: each example's window of its text, -1 for a whole one, absent from stores built before windows) and,
written last, meta.json with every array's size and CRC-32. A store is built in a hidden temporary folder and
renamed into place, so a crash leaves nothing that looks complete; one whose sizes or hashes do not match is
rebuilt, never trained from. Arrays are memory-mapped: a file of millions of examples costs page cache, not RSS.
Later runs, resumes and evaluations of the same file reuse the store; `prune` keeps the ones still in use.

    evertrain check FILE --model DIR      # builds a store (in a temporary folder), prints its summary
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from array import array
from pathlib import Path

import numpy as np

from evertrain.data.examples import Example
from evertrain.data.packing import IGNORE
from evertrain.files import fsync_dir, write_text_atomic

STORE_VERSION = 2
ARRAYS = {"ids.bin": np.int32, "mask.bin": np.uint8}


class StoreError(RuntimeError):
    """A store that is incomplete or damaged: rebuild it."""


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's output: its vocabulary and rules, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map,
                         tokenizer.eos_token_id], sort_keys=True, default=str).encode())
    return h.hexdigest()


def store_key(sha256: str, fingerprint: str, max_length: int, columns: str, layout: dict | None = None) -> str:
    """`layout`: the other settings that change the tokens (windows, how a text file splits); left out when
    empty, so a store built before them keeps its key."""
    settings = json.dumps([STORE_VERSION, sha256, fingerprint, max_length, columns] + ([layout] if layout else []),
                          sort_keys=True)
    return f"{sha256[:16]}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"


class TokenStore:
    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.offsets = np.load(path / "offsets.npy", mmap_mode="r")
        self.records = np.load(path / "records.npy", mmap_mode="r")
        self.kinds = np.load(path / "kinds.npy", mmap_mode="r")
        self.parts = _optional(path / "parts.npy")
        self.splits = _optional(path / "splits.npy")   # a store from before preference pairs has none
        self.rated = _optional(path / "rated.npy")
        n_tokens = int(self.offsets[-1]) if len(self.offsets) else 0
        self.ids = _memmap(path / "ids.bin", np.int32, n_tokens)
        self.mask = _memmap(path / "mask.bin", np.uint8, n_tokens)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens(self, indexes: np.ndarray) -> int:
        return int(self.lengths[indexes].sum())

    def example(self, i: int) -> Example:
        ids, labels = self._tokens(i)
        part = int(self.parts[i]) if self.parts is not None else -1
        rated = int(self.rated[i]) if self.rated is not None else -1
        e = Example(line=int(self.records[i]), format=self.meta["kinds"][int(self.kinds[i])],
                    input_ids=ids.tolist(), labels=labels.tolist(), truncated=False,
                    part=part if part >= 0 else None, objective=self.meta.get("objective", "supervised"),
                    split=int(self.splits[i]) if self.splits is not None else 0,
                    desirable=None if rated < 0 else bool(rated), index=i)
        if e.objective == "feedback":
            e.kl = self.kl_sequence(i)
        return e

    def kl_sequence(self, i: int) -> tuple[list[int], list[int]]:
        """Feedback record i's prompt with the answer of the record before it (the last's: the first's), cut to
        max_length: the mismatched pairs whose log-probabilities estimate KTO's KL term (as TRL rotates a batch's
        answers by one)."""
        ids, labels = self._tokens(i)
        other_ids, other_labels = self._tokens((i - 1) % len(self))
        prompt = ids[:_first_trained(labels)]
        start = _first_trained(other_labels)
        end = len(other_labels) - _first_trained(other_labels[::-1])  # after its last trained token
        answer = other_ids[start:end]
        cut = self.meta.get("max_length") or len(prompt) + len(answer)
        kl_ids = np.concatenate([prompt, answer])[:cut]
        kl_labels = np.concatenate([np.full(len(prompt), IGNORE), answer])[:cut]
        return kl_ids.tolist(), kl_labels.tolist()

    def _tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        return ids, np.where(self.mask[a:b] == 1, ids, IGNORE)

    def starts_of_records(self) -> np.ndarray:
        """True where an example begins its record (a whole example, or a text's first window)."""
        return np.ones(len(self), dtype=bool) if self.parts is None else np.asarray(self.parts) <= 0


def _optional(path: Path) -> np.ndarray | None:
    return np.load(path, mmap_mode="r") if path.exists() else None


def _first_trained(labels: np.ndarray) -> int:
    trained = np.flatnonzero(np.asarray(labels) != IGNORE)
    return int(trained[0]) if len(trained) else len(labels)


def _memmap(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_store(path: Path) -> TokenStore | None:
    """The complete store at `path`, None if there is none; StoreError if it is damaged."""
    meta_path = path / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        for name, want in meta["files"].items():
            if _crc32(path / name) != want:
                raise StoreError(f"{path / name} does not match its recorded checksum")
        return TokenStore(path, meta)
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"{path}: {e}") from e


def _crc32(path: Path) -> int:
    """A checksum against damage, not against an adversary: CRC-32 reads a gigabyte in a fraction of a second,
    which keeps resuming a big file's store quick (sha256 would take seconds)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


class StoreWriter:
    """Appends encoded batches to a temporary folder; `commit` makes it the store, atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files = {name: open(self.tmp / name, "wb") for name in ARRAYS}
        self.crcs = dict.fromkeys(ARRAYS, 0)
        self.offsets, self.records, self.kinds, self.parts = array("q", [0]), array("q"), array("B"), array("q")
        self.splits, self.rated = array("q"), array("b")
        self.kind_names: list[str] = []
        self.truncated = 0

    def add(self, encoded, records: list[int], kinds: list[str], rated: list[bool | None] | None = None) -> None:
        """`records`, `kinds` and `rated` (a feedback record's rating): one per record of the batch
        (`encoded.owners` says which examples are whose)."""
        for name, arr in (("ids.bin", encoded.ids), ("mask.bin", encoded.mask)):
            raw = np.ascontiguousarray(arr, dtype=ARRAYS[name]).tobytes()
            self.files[name].write(raw)
            self.crcs[name] = zlib.crc32(raw, self.crcs[name])
        end = self.offsets[-1]
        for length in encoded.lengths.tolist():
            end += length
            self.offsets.append(end)
        owners = encoded.owners.tolist()
        self.records.extend(records[o] for o in owners)
        for o in owners:
            if kinds[o] not in self.kind_names:
                self.kind_names.append(kinds[o])
            self.kinds.append(self.kind_names.index(kinds[o]))
        self.parts.extend(encoded.parts.tolist())
        self.splits.extend(encoded.splits.tolist())
        self.rated.extend(-1 if rated is None or rated[o] is None else int(rated[o]) for o in owners)
        self.truncated += int(encoded.truncated.sum())

    def commit(self, meta: dict) -> TokenStore:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        files = dict(self.crcs)
        for name, values, dtype in (("offsets", self.offsets, np.int64), ("records", self.records, np.int64),
                                    ("kinds", self.kinds, np.uint8), ("parts", self.parts, np.int64),
                                    ("splits", self.splits, np.int64), ("rated", self.rated, np.int8)):
            np.save(self.tmp / f"{name}.npy", np.frombuffer(values, dtype=dtype) if len(values) else
                    np.zeros(0, dtype=dtype))
            files[f"{name}.npy"] = _crc32(self.tmp / f"{name}.npy")
        parts = np.frombuffer(self.parts, dtype=np.int64) if len(self.parts) else np.zeros(0, dtype=np.int64)
        meta = {**meta, "version": STORE_VERSION, "kinds": self.kind_names, "truncated": self.truncated,
                "examples": len(self.records), "windows": int((parts >= 0).sum()), "tokens": int(self.offsets[-1]),
                "files": files}
        write_text_atomic(self.tmp / "meta.json", json.dumps(meta, indent=1))
        shutil.rmtree(self.path, ignore_errors=True)
        os.rename(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return TokenStore(self.path, meta)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def prune(root: Path, keep: set[str], newest: int = 2) -> None:
    """Remove stores whose key does not start with a prefix in `keep`, except the `newest` most recently used."""
    if not root.is_dir():
        return
    for p in root.glob(".tmp-*"):  # a build that died with its process (kill -9) is debris
        if not _alive(int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else 0):
            shutil.rmtree(p, ignore_errors=True)
    stores = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for p in stores[newest:]:
        if p.name.split("-")[0] not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
