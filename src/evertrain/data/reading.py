"""What every reader of a dataset file shares: the errors it reports, the chunk it reads, the encoding it checks.

    python -m evertrain.data.containers FILE      # list what each record of FILE decodes to
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK = 1 << 20
BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


class ContainerError(ValueError):
    """A problem with the whole file; the message has no path prefix (the caller adds it)."""


@dataclass(frozen=True)
class BadRecord:
    reason: str   # one record's problem, e.g. 'invalid JSON (Expecting value at column 11)'


def check_encoding(head: bytes) -> None:
    for bom, name in BOMS:
        if head.startswith(bom):
            raise ContainerError(f"the file is {name} (it starts with a {name} byte-order mark); save it as UTF-8")
    if b"\0" in head[:1024]:
        raise ContainerError("the file is UTF-16 (or UTF-32 or binary: it has NUL bytes in its first KB); "
                             "save it as UTF-8")


def bad_utf8(fields: list[str]) -> tuple[int, int] | None:
    """(field index, byte offset in the field) of the first undecodable byte, if any."""
    for col, s in enumerate(fields):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            return col, len(s[:e.start].encode("utf-8"))
    return None
