"""files.py, the ground floor every writer stands on: an atomic write leaves the old file or the new one (and
what a crash leaves is debris that checkpoint.remove_debris knows); a reader of JSON lines passes over torn ones.

    pytest -q tests/test_files.py
"""

from __future__ import annotations

import json

import pytest

from evertrain import files
from evertrain.train import checkpoint


def test_write_text_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "status.json"
    files.write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and "\n" in path.read_text()
    files.write_json_atomic(path, {"a": [1, 2]}, indent=None)
    assert path.read_text() == '{"a": [1, 2]}'
    real_replace = os.replace

    def crash_before_rename(src, dst):  # what a crash right here leaves is debris that remove_debris knows
        assert checkpoint.remove_debris(tmp_path) == [src] and not os.path.exists(src)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        files.write_text_atomic(path, "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_text() == '{"a": [1, 2]}' and sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "open", full_disk, raising=False)  # full before the temp even exists
    with pytest.raises(OSError) as err:
        files.write_text_atomic(path, "new")
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", full_disk)  # full after the temp was created: it is removed
    with pytest.raises(OSError):
        files.write_text_atomic(path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_read_records_passes_over_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert files.read_records(path) == []
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n\n{"step": 4')
    assert files.read_records(path) == [{"step": 1}, {"step": 3}]
    assert files.read_records(str(path)) == [{"step": 1}, {"step": 3}]
