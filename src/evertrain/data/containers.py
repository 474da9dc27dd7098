"""Containers: the files datasets come in, read one record at a time without loading the file into memory.

open_records(path) yields (index, value) per record: a decoded JSON value / Parquet row / CSV row as a dict, a
{"text": ...} of a plain text file (.txt, .md: split by line, paragraph or document, see plaintext.py), or a
BadRecord for one broken record (iteration goes on, so every bad one can be listed). A problem with the whole file
(truncated archive, wrong encoding, corrupt Parquet) raises ContainerError. Memory stays bounded by one chunk
(1 MiB of text, one Parquet batch) plus the largest single record, whatever the file size; and a record is bounded
before it is parsed: a line longer than max_line_bytes is skipped unread to the next newline, and one nested deeper
than max_json_depth is refused by a bracket count (a .json array with such an item fails whole: it cannot resync).

    python -m evertrain.data.containers FILE      # list what each record decodes to
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ijson
import numpy as np
import zstandard

from evertrain.config import MAX_JSON_DEPTH, MAX_LINE_BYTES
from evertrain.data.plaintext import plain_text
from evertrain.data.reading import CHUNK, BadRecord, ContainerError, bad_utf8, check_encoding  # noqa: F401

ACCEPTED = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet", ".csv", ".tsv", ".txt", ".md")
TEXT_KINDS = ("txt", "md")   # plain text: every example is a {"text": ...} record
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CSV_FIELD_LIMIT = 256 << 20   # csv's default (128 KiB) rejects long documents; bounded so a broken quote can't eat RAM
PARQUET_BATCH = 256
MUST_BE_ARRAY = "a .json file must hold an array of examples ([{...}, {...}]); for one example per line use .jsonl"


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

    def __init__(self, path, kind: str, max_line_bytes: int = MAX_LINE_BYTES, max_depth: int = MAX_JSON_DEPTH,
                 sample_by: str = "line"):
        self.path, self.kind, self.unit = Path(path), kind, unit_of(kind)
        self.max_line_bytes, self.max_depth, self.sample_by = max_line_bytes, max_depth, sample_by
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
                    yield from _csv(f, "\t" if self.kind == "tsv" else ",", self.max_line_bytes)
                    return
                if self.kind in TEXT_KINDS:
                    yield from plain_text(f, self.sample_by, self.max_line_bytes)
                    return
                source = {"jsonl.gz": _gunzip, "jsonl.zst": _unzstd}.get(self.kind, _plain)
                chunks = _text(source(f))
                yield from (_json if self.kind == "json" else _jsonl)(chunks, self.max_line_bytes, self.max_depth)
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


def open_records(path, max_line_bytes: int = MAX_LINE_BYTES, max_depth: int = MAX_JSON_DEPTH,
                 sample_by: str = "line") -> Records:
    """`sample_by` splits a .txt or .md file: line, paragraph or document (other kinds ignore it)."""
    kind = kind_of(path)
    if kind is None:
        raise ContainerError(f"not a dataset file: accepted are {accepted_text()}")
    return Records(path, kind, max_line_bytes, max_depth, sample_by)


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


def _text(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks, after checking the encoding on the first KB and dropping a UTF-8 BOM."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 1024:
            break
    check_encoding(head)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if head:
        yield head
    yield from chunks


def _lines(chunks: Iterable[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines, without their newline; None for a line longer than `limit` bytes, whose bytes are dropped as
    they stream past (a 2 GB line costs one chunk of memory, not 2 GB)."""
    pending: list[bytes] = []   # pieces of a line spanning chunks, joined once (not re-concatenated per chunk)
    size, skipping = 0, False
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) > 1:
            if skipping or size + len(parts[0]) > limit:
                yield None
            else:
                pending.append(parts[0])
                yield b"".join(pending)
            if len(chunk) <= limit:   # the usual case (chunks are far below the limit): no line to check
                yield from parts[1:-1]
            else:
                yield from (p if len(p) <= limit else None for p in parts[1:-1])
            pending, size, skipping = [], 0, False
        if not skipping:
            pending.append(parts[-1])
            size += len(parts[-1])
            if size > limit:
                pending, skipping = [], True
    if skipping:
        yield None
    elif tail := b"".join(pending):
        yield tail


_KINDS = np.zeros(256, np.int8)   # what each byte does to the depth: +1 [ {, -1 ] }, 2 a quote
_KINDS[[ord("["), ord("{")]], _KINDS[[ord("]"), ord("}")]], _KINDS[ord('"')] = 1, -1, 2


class _Depth:
    """How deeply JSON text nests arrays and objects, outside strings, fed in pieces. numpy over the few bytes
    that matter (quotes, brackets), so the check costs a fraction of parsing. Bytes that JSON forbids outside
    strings may mislead it; the parser rejects those anyway."""

    def __init__(self, limit: int):
        self.limit, self.depth, self.in_string, self.backslashes = limit, 0, False, 0

    def exceeded(self, piece: bytes) -> int | None:
        """The offset in `piece` where the depth first goes over the limit (None: it does not); the state carries on."""
        for start in range(0, len(piece), CHUNK):   # bounded temporaries, however long the piece
            at = self._block(bytes(piece[start:start + CHUNK]))
            if at is not None:
                return start + at
        return None

    def _block(self, block: bytes) -> int | None:
        a = np.frombuffer(block, np.uint8)
        pos = np.flatnonzero((a == 34) | (a == 91) | (a == 93) | (a == 123) | (a == 125))   # faster than _KINDS[a]
        kinds = _KINDS[a[pos]]
        quotes = kinds == 2
        slashes = np.flatnonzero(a == 92)
        carried, self.backslashes = self.backslashes, 0
        if len(slashes):
            # runs of backslashes: a quote right after an odd run is escaped (a run may begin in the last piece)
            cut = np.flatnonzero(np.diff(slashes) != 1) + 1
            starts, ends = slashes[np.r_[0, cut]], slashes[np.r_[cut - 1, len(slashes) - 1]]
            lengths = ends - starts + 1 + np.where(starts == 0, carried, 0)
            at = np.flatnonzero(quotes)
            k = np.searchsorted(ends, pos[at] - 1)
            after = (k < len(ends)) & (ends[np.minimum(k, len(ends) - 1)] == pos[at] - 1)
            quotes[at[after]] = lengths[k[after]] % 2 == 0
            if ends[-1] == len(a) - 1:
                self.backslashes = int(lengths[-1])
        if len(pos) and pos[0] == 0 and quotes[0] and carried % 2:
            quotes[0] = False
        if not len(pos):
            return None
        inside = (np.cumsum(quotes, dtype=np.int64) + self.in_string) % 2 == 1
        depth = np.cumsum(np.where(inside | (kinds == 2), 0, kinds), dtype=np.int64) + self.depth
        self.in_string, self.depth = bool(inside[-1]), int(depth[-1])
        over = np.flatnonzero(depth > self.limit)
        return int(pos[over[0]]) if len(over) else None


def _too_deep(line: bytes, limit: int) -> bool:
    # counting brackets is a C loop: only a line with more of them than the limit is scanned properly
    return line.count(b"[") + line.count(b"{") > limit and _Depth(limit).exceeded(line) is not None


# ---------------------------------------------------------------- record decoders

def _jsonl(chunks: Iterable[bytes], max_line_bytes: int, max_depth: int) -> Iterator[tuple[int, object]]:
    for i, line in enumerate(_lines(chunks, max_line_bytes)):
        if line is None:
            yield i, BadRecord(f"longer than {max_line_bytes} bytes (max_line_bytes): skipped unread")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, BadRecord(f"not UTF-8 (byte {e.start})")
            continue
        if not text.strip():
            continue   # skipped, yet counted: the index stays the physical line
        if _too_deep(line, max_depth):
            yield i, BadRecord(_deep(max_depth))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            value = BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")
        except RecursionError:  # a max_json_depth above what the parser can take: this line fails alone
            value = BadRecord("invalid JSON (nested too deeply)")
        yield i, value


def _deep(limit: int) -> str:
    return f"nested too deeply (over {limit} arrays/objects; the limit is max_json_depth)"


def _json_problem(e: Exception, item: int) -> str:
    msg = e.args[0] if e.args else str(e)
    msg = (msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)).strip().splitlines()[0]
    if "premature EOF" in msg or "Incomplete JSON" in msg:
        return f"the file ends inside item {item} ({msg}): was it copied completely?"
    if "trailing garbage" in msg or "Additional data" in msg:
        return f"invalid JSON after the closing ] of the array ({msg})"
    return f"item {item}: invalid JSON ({msg})"


def _json(chunks: Iterable[bytes], max_item_bytes: int, max_depth: int) -> Iterator[tuple[int, object]]:
    events = ijson.sendable_list()
    coro = ijson.items_coro(events, "item", use_float=True)   # push parser: fed one chunk at a time
    # ijson's cost grows with the square of the depth (a 20,000-deep item takes 1 GB): checked before it parses
    depth = _Depth(max_depth + 1)   # + the array itself
    n, started, error, unfinished = 0, False, None, 0
    for chunk in chunks:
        if not started:
            head = chunk.lstrip()
            if not head:
                continue
            if head[:1] != b"[":
                raise ContainerError(MUST_BE_ARRAY)
            started = True
        too_deep = depth.exceeded(chunk)
        try:
            coro.send(chunk if too_deep is None else chunk[:too_deep])
        except ijson.JSONError as e:
            error = e
        yield from enumerate(events, n)   # items parsed before an error still count
        n += len(events)
        # bytes fed since an item last ended (within a chunk of it): one item's size, bounded like a line's
        unfinished = 0 if events else unfinished + len(chunk)
        del events[:]
        if error:
            break
        if too_deep is not None:
            raise ContainerError(f"item {n + 1}: {_deep(max_depth)}; the file is not read further")
        if unfinished > max_item_bytes:
            raise ContainerError(f"item {n + 1} is longer than {max_item_bytes} bytes (max_line_bytes); "
                                 "the file is not read further")
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


def _csv(f, delimiter: str, max_line_bytes: int) -> Iterator[tuple[int, object]]:
    check_encoding(f.peek(1024)[:1024])
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    # surrogateescape keeps a bad byte as a marker in its field, so that row alone is reported
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(_text_lines(text, max_line_bytes), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ContainerError("the file has no header row (its first row must name the columns, e.g. text)")
        if bad_utf8(header):
            raise ContainerError("the header row is not UTF-8")
        if len(set(header)) < len(header):
            raise ContainerError(f"the header row names a column twice ({', '.join(header)})")
        for i, row in enumerate(reader):
            if not row:
                continue   # a blank line: skipped, yet counted like a spreadsheet's empty row
            if len(row) != len(header):
                yield i, BadRecord(f"the row has {len(row)} fields, the header has {len(header)}")
            elif bad := bad_utf8(row):
                col, byte = bad
                yield i, BadRecord(f"not UTF-8 (column {header[col]!r}, byte {byte})")
            else:
                yield i, dict(zip(header, row))
    except csv.Error as e:
        raise ContainerError(f"line {reader.line_num}: {e}") from None
    finally:
        text.detach()   # the caller's `with` closes the file


def _text_lines(text, limit: int) -> Iterator[str]:
    """The physical lines, read `limit` characters at most at a time (iterating the file would read a line
    whole, however long). A longer line fails the file: a quoted field may span lines, so there is no resync."""
    number = 0
    while line := text.readline(limit + 2):   # + room for "\r\n"
        number += 1
        if len(line.rstrip("\r\n")) > limit:
            raise ContainerError(f"line {number} is longer than {limit} characters (max_line_bytes); "
                                 "the file is not read further")
        yield line




if __name__ == "__main__":
    import sys

    try:
        records = open_records(sys.argv[1])
        for index, value in records:
            print(f"{records.unit} {index + 1} [{records.fraction():.0%}]: {value!r:.200}")
    except ContainerError as e:
        sys.exit(f"{sys.argv[1]}: {e}")
