"""Durable file I/O, the ground floor every writer stands on: content hashes, fsync of a file tree and of a folder,
atomic replacement of a text or JSON file, and reading back a JSONL log that a crash may have torn.

    python -c "from evertrain.files import sha256_file; print(sha256_file('pyproject.toml'))"
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """Every file and folder below `root` on disk (not only in the page cache)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """A folder's entries on disk: what makes a rename or a new file inside it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: a half-written temp would only take more of it
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data, *, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def append_json_line(path: Path, record: dict) -> None:
    """One record at the end of a JSONL log (metrics, evaluations, drift, trace)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL log (metrics, evals, trace); a line torn by a crash mid-write is passed over."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def read_json(path: Path):
    """A JSON file's value, or None when it is missing or does not parse (a reader never fails on one)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def not_a_regular_file(path: Path) -> str | None:
    """None when `path` is a regular file to read; else what it is instead ("no such file" only when it is so)."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    return ("a folder, not a regular file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO)"
            if stat.S_ISFIFO(mode) else "not a regular file")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
