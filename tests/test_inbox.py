"""daemon/inbox.py: whether a file in the inbox looks complete, by its kind's own ending. Writers that pause or stay
cut, through the daemon: tests/test_slow_writers.py.

    pytest -q tests/test_inbox.py
"""

from __future__ import annotations

import pytest

from evertrain.daemon.inbox import looks_complete


@pytest.mark.parametrize("name,content,complete", [
    ("a.jsonl", b'{"a": 1}\n{"a": 2}\n', True),
    ("a.jsonl", b'{"a": 1}\n{"a": 2}\n\n', True),
    ("a.jsonl", b'{"a": 1}\n{"a": 2}', False),
    ("a.jsonl", b'{"a": 1}\n{"a": \n', True),  # a whole line, though it does not parse: validation fails it
    ("a.json", b'[{"a": 1},\n', False),
    ("a.json", b'[{"a": 1}]\n', True),
    ("a.json", b'[{"a": 1}]', True),  # json.dump writes no final newline
    ("a.json", b'[{"a": 1}]\n  \n', True),
    ("a.csv", b"q,a\nx,y", False),
    ("a.csv", b"q,a\nx,y\n", True),
    ("a.parquet", b"PAR1....", False),
    ("a.parquet", b"PAR1....PAR1", True),
    ("a.jsonl.gz", b"\x1f\x8b", True),  # no cheap check: stability alone decides
])
def test_looks_complete(tmp_path, name, content, complete):
    (tmp_path / name).write_bytes(content)
    assert looks_complete(tmp_path / name) is complete
