"""Poison is contained (issue 16, part 1): a file built to break the reader fails alone, with its reason.

Lines over max_line_bytes are skipped unread, records nested deeper than max_json_depth are refused before they
are parsed, texts are cut before the tokenizer sees them, anything else a file breaks is a DataError, and a file
that kills the process twice while it is prepared is quarantined. Through `train`, `check`, `add` and the daemon;
memory is measured on real subprocesses. The same limits at the unit level: tests/test_containers.py (long lines,
nesting), tests/test_render.py (texts cut), tests/test_data.py (any other failure a DataError), tests/test_ledger.py
(attempts at preparing a file).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_poison.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import cli, evertrain, explode_on_boom, nested, text_rows, write_bytes, write_jsonl
from daemon_helpers import by_name, drop, make_ws, rows, status



def test_train_on_a_poison_file_exits_2_with_its_reason_and_no_traceback(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    good = write_jsonl(tmp_path / "good.jsonl", text_rows(5))
    assert cli("train", "--dataset", good, "--output-dir", out, "--model", tiny_model) == 0
    before = sorted(p.name for p in out.iterdir())
    poison = tmp_path / "poison.jsonl"
    poison.write_bytes(b'{"text": "fine"}\n' + nested(150) + b"\n")
    capsys.readouterr()
    assert cli("train", "--dataset", poison, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "  line 2: nested too deeply (over 100 arrays/objects; the limit is max_json_depth)"
    assert f"{poison}: not trained" in err
    assert sorted(p.name for p in out.iterdir()) == before
    # the limit is a setting: raised, the same file trains
    assert cli("train", "--dataset", poison, "--output-dir", out, "--max-json-depth", "150") == 2   # a list, not a text
    assert '"text" must be a string' in capsys.readouterr().err


# ---------------------------------------------------------------- the daemon: poison among good files

def test_the_daemon_fails_each_poison_file_alone_and_trains_the_good_ones(tmp_path, tiny_model, monkeypatch):
    explode_on_boom(monkeypatch)
    ws = make_ws(tmp_path, tiny_model, "--max-line-bytes", "4096")
    drop(ws, "a-good.jsonl", rows(6, "a"))
    poisons = {
        "b-long.jsonl": ('{"text": "ok"}\n{"text": "' + "L" * 10000 + '"}\n', "line 2: longer than 4096 bytes"),
        "c-deep.jsonl": ('{"text": "ok"}\n' + nested(1000).decode() + "\n", "line 2: nested too deeply"),
        "d-deep.json": ("[" + nested(1000).decode() + "]", "item 1: nested too deeply"),
        "e-long.csv": ("text\nok\n" + "C" * 5000 + "\n", "line 3 is longer than 4096 characters"),
        "f-boom.jsonl": ('{"text": "ok"}\n{"text": "boom"}\n', "stopped after line 1: MemoryError"),
    }
    for name, (content, _) in poisons.items():
        drop(ws, name, content)
    drop(ws, "g-good.jsonl", rows(5, "g"))
    assert cli("run", ws, "--once") == 5  # exits.FILES_FAILED: the poison files failed, the good ones trained
    files = by_name(ws)
    assert files["a-good.jsonl"]["state"] == files["g-good.jsonl"]["state"] == "done"
    for name, (_, reason) in poisons.items():
        row = files[name]
        assert row["state"] == "failed" and reason in row["error"] and name in row["error"], (name, row["error"])
        assert row["first_step"] is None
        assert reason in (ws / "failed" / f"{row['name']}.error.txt").read_text()
    assert status(ws)["files_failed"] == len(poisons) and status(ws)["files_done"] == 2


def test_a_last_line_nested_too_deep_to_parse_is_a_whole_line_for_the_inbox(tmp_path, tiny_model):
    """A last line nested deeper than the JSON parser's recursion limit ends with its newline: a whole line, taken
    without waiting, that fails validation with its number and brings nothing down (found by bench/soak.py)."""
    from evertrain.daemon.inbox import looks_complete

    deep = b'{"text": "ok"}\n' + nested(100_000) + b"\n"
    assert looks_complete(write_bytes(tmp_path / "deep.jsonl", deep))
    assert not looks_complete(write_bytes(tmp_path / "cut.jsonl", deep[:-40]))
    ws = make_ws(tmp_path, tiny_model, "--incomplete-timeout", "60")  # the last line is read while it is young
    drop(ws, "deep.jsonl", deep.decode())
    drop(ws, "good.jsonl", rows(5, "g"))
    assert cli("run", ws, "--once") == 5
    files = by_name(ws)
    assert files["good.jsonl"]["state"] == "done"
    assert files["deep.jsonl"]["state"] == "failed" and "line 2: nested too deeply" in files["deep.jsonl"]["error"]


# ---------------------------------------------------------------- a file that kills the process while prepared

def test_a_file_the_process_died_preparing_twice_is_quarantined(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--no-watch")
    drop(ws, "once.jsonl", rows(5, "once"))
    assert evertrain("run", ws, "--once", fault="prepare").returncode == -signal.SIGKILL
    assert by_name(ws)["once.jsonl"]["attempts"] == 1
    done = evertrain("run", ws, "--once")   # one death is not enough: it trains, and the count is forgotten
    assert done.returncode == 0, done.stderr[-2000:]
    assert by_name(ws)["once.jsonl"]["state"] == "done" and by_name(ws)["once.jsonl"]["attempts"] == 0

    drop(ws, "twice.jsonl", rows(5, "twice"))
    drop(ws, "after.jsonl", rows(4, "after"))
    for attempt in (1, 2):
        assert evertrain("run", ws, "--once", fault="prepare").returncode == -signal.SIGKILL
        assert by_name(ws)["twice.jsonl"]["attempts"] == attempt
    done = evertrain("run", ws, "--once")
    assert done.returncode == 5, done.stderr[-2000:]  # exits.FILES_FAILED: the quarantined file
    files = by_name(ws)
    reason = "quarantined: the process died twice while preparing it (attempts 2)"
    assert files["twice.jsonl"]["state"] == "failed" and reason in files["twice.jsonl"]["error"]
    assert reason in (ws / "failed" / f"{files['twice.jsonl']['name']}.error.txt").read_text()
    assert files["after.jsonl"]["state"] == "done" and f"FAILED twice.jsonl: not trained" in done.stdout


def test_a_file_that_died_once_is_not_prepared_in_the_background(tmp_path, tiny_model, monkeypatch):
    import sqlite3

    from evertrain.data import prepare as prepare_module

    builds = []
    real = prepare_module.build_store

    def build_store(path, *args, **kwargs):
        builds.append((path.name.split("-", 1)[1], threading.current_thread().name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "build_store", build_store)
    ws = make_ws(tmp_path, tiny_model, "--no-watch")
    for name in ("first.jsonl", "second.jsonl", "third.jsonl"):
        assert cli("add", write_jsonl(tmp_path / name, rows(8, name)), ws) == 0
    db = sqlite3.connect(ws / "ledger.sqlite")
    db.execute("UPDATE files SET attempts = 1 WHERE original_name LIKE '%second.jsonl'")   # as one death leaves it
    db.commit()
    db.close()
    assert cli("run", ws, "--once") == 0
    assert all(r["state"] == "done" and r["attempts"] == 0 for r in by_name(ws).values())
    # the prefetch leaves "second" to the daemon's own thread (where a death is told apart), builds "third"
    assert ("second.jsonl", "MainThread") in builds and ("third.jsonl", "evertrain-prefetch") in builds
    assert ("second.jsonl", "evertrain-prefetch") not in builds


# ---------------------------------------------------------------- not a regular file

@pytest.mark.parametrize("what", ["folder", "fifo", "missing"])
def test_add_train_and_check_say_what_the_path_is(tmp_path, tiny_model, capsys, what):
    ws = make_ws(tmp_path, tiny_model)
    path = tmp_path / "data.jsonl"
    if what == "folder":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)
    said = {"folder": "a folder, not a regular file", "fifo": "not a regular file (a FIFO)",
            "missing": "no such file"}[what]
    for args in (("add", path, ws), ("train", "--dataset", path, "--output-dir", tmp_path / "run"),
                 ("check", path, "--model", tiny_model)):
        capsys.readouterr()
        assert cli(*args) == 2, args
        assert capsys.readouterr().err == f"evertrain: {path}: {said}\n", args
    assert not list((ws / "queue").iterdir())


# ---------------------------------------------------------------- memory, measured on the real commands

MEASURE = """
import resource, subprocess, sys, time
t = time.monotonic()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.monotonic() - t, p.returncode)
sys.stderr.write(p.stdout + p.stderr)
"""


def measured(*args):
    """(peak RSS in bytes, seconds, exit code, stdout and stderr) of `evertrain ARGS` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "evertrain", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    rss, seconds, rc = done.stdout.split()
    return int(rss), float(seconds), int(rc), done.stderr


def test_peak_memory_stays_flat_in_a_poison_line_and_a_sparse_file(tmp_path, tiny_model):
    small = write_jsonl(tmp_path / "small.jsonl", text_rows(5))
    base, _, rc, err = measured("check", small, "--model", tiny_model)
    assert rc == 0, err

    line = tmp_path / "line.jsonl"   # one 60 MB line between good ones
    with open(line, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "')
        for _ in range(60):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n{"text": "fine"}\n')
    sparse = tmp_path / "sparse.jsonl"   # 500 MB of NUL bytes, no newline, costing no disk
    with open(sparse, "wb") as f:
        f.truncate(500 << 20)
    tail = tmp_path / "tail.jsonl"   # good lines, then a 500 MB sparse line: past the first KB's encoding check
    tail.write_bytes(b'{"text": "ok"}\n' * 100)
    os.truncate(tail, 500 << 20)

    cases = [(line, "line 2: longer than 16777216 bytes (max_line_bytes): skipped unread"),
             (sparse, "the file is UTF-16 (or UTF-32 or binary: it has NUL bytes in its first KB)"),
             (tail, "line 101: longer than 16777216 bytes (max_line_bytes): skipped unread")]
    for path, reason in cases:
        rss, seconds, rc, err = measured("check", path, "--model", tiny_model)
        print(f"check {path.name} ({path.stat().st_size >> 20} MB): peak RSS {rss >> 20} MB "
              f"(+{(rss - base) >> 20} MB over a 5-line file), {seconds:.1f} s")
        assert rc == 2 and reason in err and "Traceback" not in err, err
        assert rss - base < 40 << 20, f"{path.name}: peak RSS {rss >> 20} MB, {base >> 20} MB for a small file"
        assert seconds < 60

    # a 15 MB text (under the limit) in windows: tokenized whole, in pieces, its 15 million tokens all kept
    long = tmp_path / "long.jsonl"
    long.write_bytes(b'{"text": "' + b"a" * (15 << 20) + b'"}\n')
    rss, seconds, rc, err = measured("check", long, "--model", tiny_model)
    print(f"check {long.name} in windows: peak RSS {rss >> 20} MB (+{(rss - base) >> 20} MB over a 5-line file), "
          f"{seconds:.1f} s")
    assert rc == 0 and "1 examples in 15,376 windows" in err, err
    # the line, its text, its tokens (4 bytes each) and the store's arrays; tokenized whole it took gigabytes
    assert rss - base < 400 << 20 and seconds < 120

    # allowed by the limit and truncated, the 60 MB text trains: the tokenizer sees only its first 32 x max_length
    # characters
    train = ("--model", tiny_model, "--held-out-fraction", "0", "--max-line-bytes", str(100 << 20),
             "--long-text", "truncate")
    base, _, rc, err = measured("train", "--dataset", small, "--output-dir", tmp_path / "small-run", *train)
    assert rc == 0, err
    rss, seconds, rc, err = measured("train", "--dataset", line, "--output-dir", tmp_path / "run", *train)
    print(f"train with the 60 MB line: peak RSS {rss >> 20} MB (+{(rss - base) >> 20} MB over a 5-line file), "
          f"{seconds:.1f} s")
    assert rc == 0, err
    # the line, its text and its decoded value, a few copies of 60 MB; tokenized whole it took 14 GB
    assert rss - base < 400 << 20 and seconds < 120
