"""Poison is contained (issue 16, part 1): a file built to break the reader fails alone, with its reason.

Lines over max_line_bytes are skipped unread, records nested deeper than max_json_depth are refused before they
are parsed, texts are cut before the tokenizer sees them, anything else a file breaks is a DataError, and a file
that kills the process twice while it is prepared is quarantined. Through the library, `train`, `check`, `add`
and the daemon; memory is measured on real subprocesses.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_poison.py
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
from conftest import cli, text_rows, write_jsonl
from daemon_helpers import by_name, drop, make_ws, rows, status

from evertrain.config import TrainConfig
from evertrain.data import DataError, containers, load_file
from evertrain.data.containers import BadRecord, ContainerError, _Depth, open_records
from evertrain.data.formats import parse_record
from evertrain.data.render import CHARS_PER_TOKEN, Renderer
from evertrain.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def read(path, **limits):
    return list(open_records(path, **limits))


def nested(depth: int) -> bytes:
    """A record holding `depth` containers, counting itself: {"text": [[...]]}."""
    return b'{"text": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


# ---------------------------------------------------------------- long lines

@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
@pytest.mark.parametrize("gz", [False, True])
def test_a_line_over_the_limit_is_a_bad_record_and_reading_goes_on(tmp_path, monkeypatch, chunk, gz):
    monkeypatch.setattr(containers, "CHUNK", chunk)   # lines that span chunks, end in them, and straddle them
    limit = 100
    ok = b'{"text": "%s"}'
    lines = [ok % b"a", ok % (b"x" * 100), ok % b"b", b"", ok % (b"y" * (limit - 12)), ok % (b"z" * 500), ok % b"c",
             ok % (b"w" * 89)]
    assert [len(x) for x in lines] == [13, 112, 13, 0, 100, 512, 13, 101]
    raw = b"\n".join(lines) + b"\n" + ok % (b"t" * 200)   # the last line has no newline
    path = tmp_path / ("d.jsonl.gz" if gz else "d.jsonl")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    too_long = BadRecord(f"longer than {limit} bytes (max_line_bytes): skipped unread")
    assert read(path, max_line_bytes=limit) == [
        (0, {"text": "a"}), (1, too_long), (2, {"text": "b"}), (4, {"text": "y" * (limit - 12)}),   # exactly the limit
        (5, too_long), (6, {"text": "c"}), (7, too_long), (8, too_long)]


def test_a_huge_line_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "first"}\n{"text": "')
        for _ in range(40):
            f.write(b"q" * (1 << 20))
        f.write(b'"}\n{"text": "last"}')
    tracemalloc.start()
    try:
        got = read(path, max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(i, type(v).__name__) for i, v in got] == [(0, "dict"), (1, "BadRecord"), (2, "dict")]
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB skipping a 40 MB line"


def test_csv_line_over_the_limit_fails_the_file_with_its_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nshort\n" + "x" * 300 + "\nafter\n")
    got = []
    with pytest.raises(ContainerError, match=r"^line 3 is longer than 200 characters \(max_line_bytes\)"):
        for record in open_records(path, max_line_bytes=200):
            got.append(record)
    assert got == [(0, {"text": "short"})]
    path.write_text("text\n" + "y" * 200 + "\r\n")   # exactly the limit, with a CRLF ending
    assert read(path, max_line_bytes=200) == [(0, {"text": "y" * 200})]


def test_json_item_over_the_limit_fails_the_file_after_the_good_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(containers, "CHUNK", 256)   # the bound holds to within one chunk
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps([{"text": "a"}, {"text": "b" * 5000}, {"text": "c"}]).encode())
    got = []
    with pytest.raises(ContainerError, match=r"^item 2 is longer than 1024 bytes \(max_line_bytes\)"):
        for record in open_records(path, max_line_bytes=1024):
            got.append(record)
    assert got == [(0, {"text": "a"})]
    assert [v for _, v in read(path, max_line_bytes=1 << 20)][1] == {"text": "b" * 5000}


# ---------------------------------------------------------------- nesting

def test_jsonl_depth_limit_counts_containers_not_brackets_in_strings(tmp_path):
    deep = BadRecord("nested too deeply (over 10 arrays/objects; the limit is max_json_depth)")
    lines = [nested(10), nested(11), json.dumps({"text": "[{" * 50 + '\\"[' * 20}).encode(), nested(100000),
             json.dumps({"text": "\\" * 3 + '"[[[[[[[[[[[[[['}).encode()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    got = read(path, max_depth=10)
    assert [v if isinstance(v, BadRecord) else "ok" for _, v in got] == ["ok", deep, "ok", deep, "ok"]


def test_json_array_depth_is_checked_before_ijson_builds_it(tmp_path):
    # ijson's memory grows with the square of the depth: 100,000 levels would take tens of GB
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + nested(5) + b", " + nested(6) + b"]")
    assert [v for _, v in read(path, max_depth=6)] == [{"text": [[[[]]]]}, {"text": [[[[[]]]]]}]
    path.write_bytes(b"[" + nested(5) + b", " + nested(100000) + b"]")
    got, started = [], time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(ContainerError, match=r"^item 2: nested too deeply \(over 5 .*not read further$"):
            for record in open_records(path, max_depth=5):
                got.append(record)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [(0, {"text": [[[[]]]]})]
    assert peak < 20e6 and time.monotonic() - started < 10


def test_depth_scanner_agrees_with_a_byte_by_byte_reference():
    def reference(text: bytes) -> int:
        depth = most = 0
        inside = escaped = False
        for c in text.decode():
            if inside:
                escaped, inside = (False, inside) if escaped else (c == "\\", c != '"')
            elif c == '"':
                inside = True
            elif c in "[{":
                depth += 1
                most = max(most, depth)
            elif c in "]}":
                depth -= 1
        return most

    rng = random.Random(7)
    leaves = ['"a\\\\"', '"x\\"[{"', '"\\\\\\"]"', "1", '"]]]]"', "null", '"\\\\"', '"\\\\\\\\\\\\\\""', '"{"']

    def value(d=0):
        r = rng.random()
        if d > 12 or r < 0.3:
            return rng.choice(leaves)
        if r < 0.65:
            return "[" + ",".join(value(d + 1) for _ in range(rng.randint(0, 3))) + "]"
        return "{" + ",".join(f'"k{i}\\\\": {value(d + 1)}' for i in range(rng.randint(0, 3))) + "}"

    for _ in range(600):
        text = value().encode()
        json.loads(text)
        most = reference(text)
        for limit in (max(most - 1, 0), most):
            scanner, at, pos = _Depth(limit), None, 0
            while pos < len(text):   # in random pieces: the state carries across them
                piece = text[pos:pos + rng.randint(1, 6)]
                found = scanner.exceeded(piece)
                at = pos + found if at is None and found is not None else at
                pos += len(piece)
            assert (at is not None) == (most > limit), (text, limit)
            if at is not None:
                assert reference(text[:at + 1]) == limit + 1 and text[at:at + 1] in b"[{", (text, at)


# ---------------------------------------------------------------- tokenization sees a bounded prefix

def test_long_texts_are_cut_before_the_tokenizer_and_counted_as_truncated(tok):
    renderer = Renderer(tok, 16)
    bound = CHARS_PER_TOKEN * 16
    recs = [parse_record({"text": "t" * 100_000}), parse_record({"text": "u" * bound}),
            parse_record({"prompt": "p" * 100_000, "completion": "c"}),
            parse_record({"messages": [{"role": "user", "content": "m" * 100_000},
                                       {"role": "assistant", "content": "ok"}]})]
    rendered = renderer.render(recs)
    assert [len(t) for t in rendered.firsts + rendered.seconds + rendered.chats] == [bound, bound, bound, 0, bound]
    assert rendered.cut == [True, False, True, True]
    encoded = renderer.tokenize(rendered)
    assert encoded.truncated.tolist() == [True, True, True, True] and encoded.lengths.tolist() == [16] * 4
    whole = tok.backend_tokenizer.encode("t" * 100_000).ids[:16]   # the cut does not change the kept tokens
    assert encoded.ids[:16].tolist() == whole
    assert encoded.mask[32:48].sum() == 0   # the prompt fills the row: nothing of the completion is trained


def test_a_cut_text_counts_as_truncated_even_when_its_tokens_fit(tok):
    renderer = Renderer(tok, 16)
    renderer.max_chars = 4   # as if the text had tokens of many characters each: the cut, not the row, binds
    encoded = renderer.encode([parse_record({"text": "abcdefgh"}), parse_record({"text": "abcd"})])
    assert encoded.truncated.tolist() == [True, False]
    assert encoded.lengths.tolist() == [4, 5]   # no EOS after a cut text: it does not end there; one after "abcd"
    assert encoded.ids[4:9].tolist()[-1] == tok.eos_token_id


def test_load_file_counts_cut_texts(tmp_path, tok, tiny_model):
    f = write_jsonl(tmp_path / "cut.jsonl", [{"text": "v" * 300}, {"text": "short"}])
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=8, packing=False, held_out_fraction=0,
                                         long_text="truncate"))
    assert data.truncated == 1 and [len(e.input_ids) for e in data.examples] == [8, 6]


# ---------------------------------------------------------------- anything else a file breaks is a DataError

def explode_on_boom(monkeypatch):
    """Reading a line that holds "boom" raises MemoryError, as a reader meeting poison might."""
    real = containers._too_deep

    def too_deep(line, limit):
        if b"boom" in line:
            raise MemoryError()
        return real(line, limit)

    monkeypatch.setattr(containers, "_too_deep", too_deep)


def test_an_unexpected_exception_while_reading_is_a_data_error_with_the_place(tmp_path, tok, tiny_model, monkeypatch):
    explode_on_boom(monkeypatch)
    f = write_jsonl(tmp_path / "boom.jsonl", text_rows(3) + [{"text": "boom"}] + text_rows(2))
    with pytest.raises(DataError) as err:
        load_file(f, tok, TrainConfig(model=str(tiny_model)))
    assert err.value.problems == ["stopped after line 3: MemoryError"]
    assert str(f) in str(err.value)


def test_an_unexpected_exception_in_one_record_fails_that_record(tmp_path, tok, tiny_model, monkeypatch):
    from evertrain.data import prepare

    def parse(value, columns):
        if value.get("text") == "deep":
            raise RecursionError("maximum recursion depth exceeded\nwhile calling a Python object")
        return parse_record(value, columns)

    monkeypatch.setattr(prepare, "parse_record", parse)
    f = write_jsonl(tmp_path / "deep.jsonl", text_rows(2) + [{"text": "deep"}, {"text": 5}])
    with pytest.raises(DataError) as err:
        load_file(f, tok, TrainConfig(model=str(tiny_model)))
    assert err.value.problems == ["line 3: RecursionError: maximum recursion depth exceeded",
                                  'line 4: "text" must be a string, got int']


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


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- a file that kills the process while prepared

def run_daemon(ws, fault=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EVERTRAIN_FAULT"}
    if fault:
        env["EVERTRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "evertrain", "run", str(ws), "--once"], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_file_the_process_died_preparing_twice_is_quarantined(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--no-watch")
    drop(ws, "once.jsonl", rows(5, "once"))
    assert run_daemon(ws, "prepare").returncode == -signal.SIGKILL
    assert by_name(ws)["once.jsonl"]["attempts"] == 1
    done = run_daemon(ws)   # one death is not enough: it trains, and the count is forgotten
    assert done.returncode == 0, done.stderr[-2000:]
    assert by_name(ws)["once.jsonl"]["state"] == "done" and by_name(ws)["once.jsonl"]["attempts"] == 0

    drop(ws, "twice.jsonl", rows(5, "twice"))
    drop(ws, "after.jsonl", rows(4, "after"))
    for attempt in (1, 2):
        assert run_daemon(ws, "prepare").returncode == -signal.SIGKILL
        assert by_name(ws)["twice.jsonl"]["attempts"] == attempt
    done = run_daemon(ws)
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


def test_old_ledgers_get_the_attempts_column(tmp_path):
    import sqlite3

    from evertrain.daemon.ledger import Ledger

    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, original_name TEXT NOT NULL, name TEXT, "
               "sha256 TEXT, size INTEGER, priority TEXT NOT NULL DEFAULT 'normal', state TEXT NOT NULL, "
               "steps_trained INTEGER NOT NULL DEFAULT 0, error TEXT, arrived_at REAL)")
    db.execute("INSERT INTO files (original_name, name, state) VALUES ('a.jsonl', '1-a.jsonl', 'queued')")
    db.commit()
    db.close()
    ledger = Ledger(tmp_path / "old.sqlite")
    try:
        assert ledger.get(1)["attempts"] == 0
    finally:
        ledger.close()


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


def test_preparing_counts_deaths_only(tmp_path):
    from evertrain.daemon.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        fid = ledger.add_file("a.jsonl", sha256=None, size=1)
        ledger.update(fid, name="000001-a.jsonl")
        path = tmp_path / "queue" / "000001-a.jsonl"
        with pytest.raises(DataError):   # a DataError is lived through: not counted
            with ledger.preparing(path):
                assert ledger.get(fid)["attempts"] == 1   # committed before the work starts
                raise DataError(path, ["bad"])
        assert ledger.get(fid)["attempts"] == 0
        ledger.update(fid, attempts=1)   # as a death leaves it
        with pytest.raises(DataError, match="quarantined"):
            with ledger.preparing(path, background=True):   # the prefetch leaves it to the daemon
                pass
        with ledger.preparing(path):   # the daemon tries once more
            assert ledger.get(fid)["attempts"] == 2
        ledger.update(fid, attempts=2, steps_trained=3)   # part-trained: its deaths were not its data's
        with ledger.preparing(path):
            pass
        ledger.update(fid, attempts=2, steps_trained=0)
        with pytest.raises(DataError, match=r"quarantined: the process died twice while preparing it \(attempts 2\)"):
            with ledger.preparing(path):
                pass
        with ledger.preparing(tmp_path / "not-in-the-ledger.jsonl"):
            pass
    finally:
        ledger.close()


def test_a_full_disk_is_not_blamed_on_the_file(tmp_path, tok, tiny_model, monkeypatch):
    import errno

    from evertrain.data import store

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.StoreWriter, "add", full)
    f = write_jsonl(tmp_path / "fine.jsonl", text_rows(3))
    with pytest.raises(OSError) as err:   # the daemon waits for room; the file stays queued
        load_file(f, tok, TrainConfig(model=str(tiny_model)))
    assert not isinstance(err.value, DataError) and err.value.errno == errno.ENOSPC
