"""Containers: the files datasets come in, read one record at a time without loading the file into memory.

open_records(path) yields (index, value) per record: a decoded JSON value / Parquet row / CSV row as a dict, or a
BadRecord for one broken record (iteration goes on, so every bad one can be listed). A problem with the whole file
(truncated archive, wrong encoding, corrupt Parquet) raises ContainerError. Memory stays bounded by one chunk
(1 MiB of text, one Parquet batch) plus the largest single record, whatever the file size.

    python -m evertrain.data.containers FILE      # list what each record decodes to
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ijson
import zstandard

ACCEPTED = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet", ".csv", ".tsv")
CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CSV_FIELD_LIMIT = 256 << 20   # csv's default (128 KiB) rejects long documents; bounded so a broken quote can't eat RAM
PARQUET_BATCH = 256
MUST_BE_ARRAY = "a .json file must hold an array of examples ([{...}, {...}]); for one example per line use .jsonl"
BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


class ContainerError(ValueError):
    """A problem with the whole file; the message has no path prefix (the caller adds it)."""


@dataclass(frozen=True)
class BadRecord:
    reason: str   # one record's problem, e.g. 'invalid JSON (Expecting value at column 11)'


def kind_of(path) -> str | None:
    name = Path(path).name.lower()
    # longest first, so "x.jsonl.gz" is never taken for a plain ".gz"-less match
    return next((s[1:] for s in sorted(ACCEPTED, key=len, reverse=True)
                 if name.endswith(s) and len(name) > len(s)), None)


def accepted_text() -> str:
    return ", ".join(ACCEPTED)


def unit_of(kind: str) -> str:
    return "item" if kind == "json" else "row" if kind in ("parquet", "csv", "tsv") else "line"


class Records:
    """The records of one file, in order; iterate once. fraction() says how far the reading has got."""

    def __init__(self, path, kind: str):
        self.path, self.kind, self.unit = Path(path), kind, unit_of(kind)
        self._size = self.path.stat().st_size
        self._progress: Callable[[], float] = lambda: 0.0

    def fraction(self) -> float:
        return max(0.0, min(1.0, self._progress()))

    def __iter__(self) -> Iterator[tuple[int, object]]:
        try:
            if self.kind == "parquet":
                yield from self._parquet()
                return
            with open(self.path, "rb") as f:
                # compressed kinds count compressed bytes: the raw file position is what has been consumed
                self._progress = lambda: f.tell() / self._size if self._size else 0.0
                if self.kind in ("csv", "tsv"):
                    yield from _csv(f, "\t" if self.kind == "tsv" else ",")
                    return
                source = {"jsonl.gz": _gunzip, "jsonl.zst": _unzstd}.get(self.kind, _plain)
                chunks = _text(source(f))
                yield from (_json if self.kind == "json" else _jsonl)(chunks)
        finally:
            self._progress = lambda: 1.0

    def _parquet(self) -> Iterator[tuple[int, object]]:
        import pyarrow as pa            # heavy: only paid by those who read Parquet
        import pyarrow.parquet as pq

        done = 0
        try:
            with pq.ParquetFile(self.path) as pf:
                total = pf.metadata.num_rows
                self._progress = lambda: done / total if total else 0.0
                # batches, not read(): a whole table would hold the file's decoded size in memory
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
                    rows = batch.to_pylist()
                    yield from enumerate(rows, done)
                    done += len(rows)
        except (pa.ArrowException, OSError) as e:
            raise ContainerError(f"not a readable Parquet file ({e})") from None


def open_records(path) -> Records:
    kind = kind_of(path)
    if kind is None:
        raise ContainerError(f"not a dataset file: accepted are {accepted_text()}")
    return Records(path, kind)


# ---------------------------------------------------------------- byte streams

def _plain(f) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _gunzip(f) -> Iterator[bytes]:
    try:
        g = gzip.GzipFile(fileobj=f, mode="rb")
        while chunk := g.read(CHUNK):
            yield chunk
    except EOFError:
        raise ContainerError("the gzip stream is truncated (it ends before its end marker): "
                             "was the file copied completely?") from None
    except gzip.BadGzipFile as e:
        if "Not a gzipped file" in str(e):
            raise ContainerError("not a gzip file (it lacks the gzip signature 1f 8b): "
                                 "name it .jsonl if it is not compressed") from None
        raise ContainerError(f"the gzip stream is corrupt ({e})") from None
    except zlib.error as e:
        raise ContainerError(f"the gzip stream is corrupt ({e})") from None


def _unzstd(f) -> Iterator[bytes]:
    # decompressobj, not stream_reader: the reader silently stops at a cut-off frame, so a truncated file would
    # look complete. decompressobj returns all a piece expands to, so the piece size follows the compression
    # ratio to keep each output near CHUNK (a 10 KB file of repeats can hold 200 MB).
    d = zstandard.ZstdDecompressor()
    obj, in_frame, head, piece = d.decompressobj(), False, b"", 64
    try:
        while data := f.read(piece):
            head = head or data[:4]
            while data:   # a file may hold several frames (e.g. appended or pzstd output)
                out, in_frame = obj.decompress(data), True
                piece = max(64, min(1 << 16, CHUNK * len(data) // max(len(out), 1)))
                if out:
                    yield out
                if not obj.eof:
                    break
                data, obj, in_frame = obj.unused_data, d.decompressobj(), False
    except zstandard.ZstdError as e:
        if head != ZSTD_MAGIC:
            raise ContainerError("not a zstd file (it lacks the zstd signature 28 b5 2f fd): "
                                 "name it .jsonl if it is not compressed") from None
        raise ContainerError(f"the zstd stream is corrupt ({e})") from None
    if in_frame:
        raise ContainerError("the zstd stream is truncated (its last frame is incomplete): "
                             "was the file copied completely?")


def _check_encoding(head: bytes) -> None:
    for bom, name in BOMS:
        if head.startswith(bom):
            raise ContainerError(f"the file is {name} (it starts with a {name} byte-order mark); save it as UTF-8")
    if b"\0" in head[:1024]:
        raise ContainerError("the file is UTF-16 (or UTF-32 or binary: it has NUL bytes in its first KB); "
                             "save it as UTF-8")


def _text(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks, after checking the encoding on the first KB and dropping a UTF-8 BOM."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 1024:
            break
    _check_encoding(head)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if head:
        yield head
    yield from chunks


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []   # pieces of a line spanning chunks, joined once (not re-concatenated per chunk)
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        pending.append(parts[0])
        yield b"".join(pending)
        yield from parts[1:-1]
        pending = [parts[-1]]
    if tail := b"".join(pending):
        yield tail


# ---------------------------------------------------------------- record decoders

def _jsonl(chunks: Iterable[bytes]) -> Iterator[tuple[int, object]]:
    for i, line in enumerate(_lines(chunks)):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, BadRecord(f"not UTF-8 (byte {e.start})")
            continue
        if not text.strip():
            continue   # skipped, yet counted: the index stays the physical line
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            value = BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")
        except RecursionError:  # a poison line (thousands of nested brackets) fails alone, not the process
            value = BadRecord("invalid JSON (nested too deeply)")
        yield i, value


def _json_problem(e: Exception, item: int) -> str:
    msg = e.args[0] if e.args else str(e)
    msg = (msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)).strip().splitlines()[0]
    if "premature EOF" in msg or "Incomplete JSON" in msg:
        return f"the file ends inside item {item} ({msg}): was it copied completely?"
    if "trailing garbage" in msg or "Additional data" in msg:
        return f"invalid JSON after the closing ] of the array ({msg})"
    return f"item {item}: invalid JSON ({msg})"


def _json(chunks: Iterable[bytes]) -> Iterator[tuple[int, object]]:
    events = ijson.sendable_list()
    coro = ijson.items_coro(events, "item", use_float=True)   # push parser: fed one chunk at a time
    n, started, error = 0, False, None
    for chunk in chunks:
        if not started:
            head = chunk.lstrip()
            if not head:
                continue
            if head[:1] != b"[":
                raise ContainerError(MUST_BE_ARRAY)
            started = True
        try:
            coro.send(chunk)
        except ijson.JSONError as e:
            error = e
        yield from enumerate(events, n)   # items parsed before an error still count
        n += len(events)
        del events[:]
        if error:
            break
    else:
        if not started:
            return   # empty or blank: no examples, which the caller reports
        try:
            coro.close()
        except ijson.JSONError as e:
            error = e
        yield from enumerate(events, n)
        n += len(events)
    if error:
        raise ContainerError(_json_problem(error, n + 1))


def _csv(f, delimiter: str) -> Iterator[tuple[int, object]]:
    _check_encoding(f.peek(1024)[:1024])
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    # surrogateescape keeps a bad byte as a marker in its field, so that row alone is reported
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ContainerError("the file has no header row (its first row must name the columns, e.g. text)")
        if _bad_utf8(header):
            raise ContainerError("the header row is not UTF-8")
        if len(set(header)) < len(header):
            raise ContainerError(f"the header row names a column twice ({', '.join(header)})")
        for i, row in enumerate(reader):
            if not row:
                continue   # a blank line: skipped, yet counted like a spreadsheet's empty row
            if len(row) != len(header):
                yield i, BadRecord(f"the row has {len(row)} fields, the header has {len(header)}")
            elif bad := _bad_utf8(row):
                col, byte = bad
                yield i, BadRecord(f"not UTF-8 (column {header[col]!r}, byte {byte})")
            else:
                yield i, dict(zip(header, row))
    except csv.Error as e:
        raise ContainerError(f"line {reader.line_num}: {e}") from None
    finally:
        text.detach()   # the caller's `with` closes the file


def _bad_utf8(fields: list[str]) -> tuple[int, int] | None:
    """(field index, byte offset in the field) of the first undecodable byte, if any."""
    for col, s in enumerate(fields):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            return col, len(s[:e.start].encode("utf-8"))
    return None


if __name__ == "__main__":
    import sys

    try:
        records = open_records(sys.argv[1])
        for index, value in records:
            print(f"{records.unit} {index + 1} [{records.fraction():.0%}]: {value!r:.200}")
    except ContainerError as e:
        sys.exit(f"{sys.argv[1]}: {e}")
