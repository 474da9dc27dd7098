"""Plain text files (.txt, .md) as {"text": ...} records, split as the datasets library's `text` builder splits them.

    python -m evertrain.data.containers NOTES.md     # list the records a text file gives (sample_by line)
    evertrain check NOTES.md --text-sample-by paragraph
"""

from __future__ import annotations

import io
import itertools
from typing import Iterable, Iterator

from evertrain.data.reading import CHUNK, BadRecord, bad_utf8, check_encoding


def plain_text(f, sample_by: str, limit: int) -> Iterator[tuple[int, object]]:
    r"""A .txt or .md file as {"text": ...} records, each numbered by the 0-based line it starts on.

    As the datasets library's `text` builder reads it (universal newlines: \r\n and \r end a line too):
    `line`, each line without its line break; `paragraph`, the text between empty lines, its own line breaks kept;
    `document`, the whole file. Unlike that builder, a blank line (or a paragraph of blanks) is skipped rather than
    kept as an empty example, and a run of empty lines separates two paragraphs once (its split on "\n\n" leaves a
    lone newline at the start of a paragraph after an odd number of them). A record over `limit` characters is a
    bad record, streamed past unread (a line in line mode, a paragraph, the file in document mode).
    """
    check_encoding(f.peek(1024)[:1024])
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=None)
    try:
        if sample_by == "document":
            yield from _document(text, limit)
        elif sample_by == "paragraph":
            yield from _paragraphs(_limited_lines(text, limit), limit)
        else:
            for number, line in _limited_lines(text, limit):
                if line is None:
                    yield number, _too_long(limit)
                elif line.strip():
                    yield number, _text_record(line)
    finally:
        text.detach()   # the caller's `with` closes the file


def _paragraphs(lines: Iterable[tuple[int, str | None]], limit: int) -> Iterator[tuple[int, object]]:
    start, held, size = 0, [], 0   # the paragraph being gathered; held is None once it is over the limit
    for number, line in itertools.chain(lines, [(-1, "")]):   # an empty line after the last ends the last one
        if line == "":
            if held is None:
                yield start, _too_long(limit)
            elif any(x.strip() for x in held):
                yield start, _text_record("\n".join(held))
            start, held, size = number + 1, [], 0
            continue
        size += 0 if line is None else len(line) + 1   # its text: these lines and a newline between each two
        if line is None or size - 1 > limit:
            held = None   # over the limit: the rest of it is read past, not kept
        elif held is not None:
            held.append(line)


def _limited_lines(text, limit: int) -> Iterator[tuple[int, str | None]]:
    """(0-based number, line without its newline), None for a line over `limit` characters, read past in pieces."""
    number = 0
    while line := text.readline(limit + 1):
        if not line.endswith("\n") and len(line) > limit:
            while line and not line.endswith("\n"):
                line = text.readline(CHUNK)
            yield number, None
        else:
            yield number, line[:-1] if line.endswith("\n") else line
        number += 1


def _document(text, limit: int) -> Iterator[tuple[int, object]]:
    parts, size = [], 0
    while chunk := text.read(CHUNK):
        size += len(chunk)
        if size > limit:
            yield 0, _too_long(limit)
            return
        parts.append(chunk)
    if "".join(parts).strip():
        yield 0, _text_record("".join(parts))


def _text_record(text: str) -> dict | BadRecord:
    bad = bad_utf8([text])
    return BadRecord(f"not UTF-8 (byte {bad[1]})") if bad else {"text": text}


def _too_long(limit: int) -> BadRecord:
    return BadRecord(f"longer than {limit} characters (max_line_bytes): skipped unread")
