"""The dataset containers: every kind round-trips the same records, each whole-file problem has its message,
and reading stays streaming (memory does not grow with the file)."""

import csv
import gzip
import json
import os
import random
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import nested, write_bytes

from evertrain.data import containers
from evertrain.data.containers import (
    ACCEPTED, BadRecord, ContainerError, _Depth, accepted_text, kind_of, open_records, unit_of,
)

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
ROWS = [
    {"text": "plain text, with \"quotes\"\tand a tab"},
    {"prompt": "Q: 2+2?", "completion": " 4"},
    {"messages": CHAT},
    {"text": "naïve café ✓"},
]
SCHEMA = pa.schema([("text", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
FLAT = [{"prompt": "Q: one?", "completion": " 1"}, {"prompt": "Q: two,\nlines?", "completion": " 2"},
        {"prompt": "naïve ✓", "completion": ""}]


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def read(path, **limits):
    return list(open_records(path, **limits))


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- names

def test_kind_of_and_units():
    assert kind_of("a/b/DATA.JSONL.GZ") == "jsonl.gz"
    assert kind_of("x.jsonl.zst") == "jsonl.zst"
    assert kind_of("x.jsonl") == "jsonl" and kind_of("x.json") == "json"
    assert kind_of("x.Parquet") == "parquet" and kind_of("x.csv") == "csv" and kind_of("x.tsv") == "tsv"
    assert kind_of("notes.TXT") == "txt" and kind_of("README.md") == "md"
    for name in ("x.docx", "x.gz", "x.json.gz", "x.zst", "jsonl", "x", ".jsonl", ".txt"):
        assert kind_of(name) is None, name
    assert accepted_text() == ".jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet, .csv, .tsv, .txt, .md"
    assert [unit_of(s[1:]) for s in ACCEPTED] == ["line", "line", "line", "item", "row", "row", "row", "line", "line"]


def test_unaccepted_suffix_names_the_accepted_ones(tmp_path):
    with pytest.raises(ContainerError, match=r"\.jsonl, \.jsonl\.gz, .*\.tsv"):
        open_records(write_bytes(tmp_path / "d.json.gz", gzip.compress(b"[]")))


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet"])
def test_same_records_from_every_structured_container(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        # every column in every row (absent ones null); messages is a list<struct<role, content>> column
        expected = [{k: r.get(k) for k in ("text", "prompt", "completion", "messages")} for r in ROWS]
        pq.write_table(pa.Table.from_pylist(expected, schema=SCHEMA), path)
    else:
        raw = json.dumps(ROWS).encode() if suffix == ".json" else jsonl_bytes(ROWS)
        raw = {".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}.get(suffix, bytes)(raw)
        write_bytes(path, raw)
        expected = ROWS
    records = open_records(path)
    assert records.kind == suffix[1:] and records.unit == unit_of(suffix[1:])
    assert records.fraction() == 0.0
    assert list(records) == list(enumerate(expected))
    assert records.fraction() == 1.0


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_rows(tmp_path, suffix, delimiter):
    path = write_csv(tmp_path / f"d{suffix}", FLAT, delimiter)
    records = open_records(path)
    assert records.unit == "row"
    assert list(records) == list(enumerate(FLAT))   # quoted newline stays inside its field
    assert records.fraction() == 1.0


def test_parquet_scalars_and_nested_values(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None], "n": [1, 2, 3], "score": [0.5, 1.5, 2.5]}), path,
                   row_group_size=2)
    assert read(path) == [(0, {"text": "a", "n": 1, "score": 0.5}), (1, {"text": "b", "n": 2, "score": 1.5}),
                          (2, {"text": None, "n": 3, "score": 2.5})]


def test_jsonl_indices_count_blank_lines_and_bad_records(tmp_path):
    data = b'{"text": "a"}\n\n   \n{"text": bad}\n\xff\xfe{"text": "x"}\n[1, 2]\r\n{"text": "last"}'
    assert read(write_bytes(tmp_path / "d.jsonl", data)) == [
        (0, {"text": "a"}),
        (3, BadRecord("invalid JSON (Expecting value at column 10)")),
        (4, BadRecord("not UTF-8 (byte 0)")),
        (5, [1, 2]),                   # not a dict: yielded as is, the caller rejects it
        (6, {"text": "last"}),         # a final line without "\n" still counts
    ]


def test_json_values_floats_and_empty(tmp_path):
    path = write_bytes(tmp_path / "d.json", b'  [{"text": "a", "w": 0.25}, "str", 3]  ')
    got = read(path)
    assert got == [(0, {"text": "a", "w": 0.25}), (1, "str"), (2, 3)]
    assert type(got[0][1]["w"]) is float
    assert read(write_bytes(tmp_path / "e.json", b"[ ]")) == []
    assert read(write_bytes(tmp_path / "blank.json", b"\n")) == []


def test_json_large_array_spans_chunks(tmp_path):
    rows = [{"text": f"example {i} " + "x" * (i % 500)} for i in range(20000)]   # ~5 MB: several 1 MiB chunks
    path = write_bytes(tmp_path / "d.json", json.dumps(rows).encode())
    assert [v for _, v in read(path)] == rows


def test_long_line_spanning_chunks(tmp_path):
    rows = [{"text": "a"}, {"text": "y" * (3 << 20)}, {"text": "b"}]
    assert read(write_bytes(tmp_path / "d.jsonl", jsonl_bytes(rows))) == list(enumerate(rows))


def test_zstd_several_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    data = c.compress(jsonl_bytes(ROWS[:2])) + c.compress(jsonl_bytes(ROWS[2:]))
    assert read(write_bytes(tmp_path / "d.jsonl.zst", data)) == list(enumerate(ROWS))


def test_gzip_several_members(tmp_path):
    data = gzip.compress(jsonl_bytes(ROWS[:1])) + gzip.compress(jsonl_bytes(ROWS[1:]))
    assert read(write_bytes(tmp_path / "d.jsonl.gz", data)) == list(enumerate(ROWS))


# ---------------------------------------------------------------- per-record problems in CSV

def test_csv_bad_rows_are_reported_and_reading_goes_on(tmp_path):
    data = b"text,meta\r\na,1\r\nb,2,extra\r\n\r\nc\xff\xfed,3\r\nlast,4\r\n"
    assert read(write_bytes(tmp_path / "d.csv", data)) == [
        (0, {"text": "a", "meta": "1"}),
        (1, BadRecord("the row has 3 fields, the header has 2")),
        (3, BadRecord("not UTF-8 (column 'text', byte 1)")),   # blank row 2 skipped but counted
        (4, {"text": "last", "meta": "4"}),
    ]


@pytest.mark.parametrize("data,message", [
    (b"", "no header row"),
    (b"\n", "no header row"),
    (b"text,text\na,b\n", "names a column twice"),
    (b"t\xffext\na\n", "header row is not UTF-8"),
])
def test_csv_header_problems(tmp_path, data, message):
    with pytest.raises(ContainerError, match=message):
        read(write_bytes(tmp_path / "d.csv", data))


def test_csv_huge_field(tmp_path):
    big = "z" * (1 << 20)   # over csv's default 128 KiB field limit
    path = write_csv(tmp_path / "d.csv", [{"text": big}, {"text": "small"}])
    assert read(path) == [(0, {"text": big}), (1, {"text": "small"})]


# ---------------------------------------------------------------- encodings

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".csv"])
def test_utf8_bom_is_accepted(tmp_path, suffix):
    raw = {".json": json.dumps(ROWS[:2]).encode(), ".csv": b"text\nhello\n"}.get(suffix, jsonl_bytes(ROWS[:2]))
    compress = {".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}.get(suffix, bytes)
    got = read(write_bytes(tmp_path / f"d{suffix}", compress(BOM + raw)))
    assert got == ([(0, {"text": "hello"})] if suffix == ".csv" else list(enumerate(ROWS[:2])))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".csv", ".tsv"])
@pytest.mark.parametrize("encoding,name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32"), ("utf-16-le", "UTF-16")])
def test_utf16_and_utf32_are_rejected(tmp_path, suffix, encoding, name):
    text = json.dumps(ROWS[:1]) if suffix == ".json" else "text\nhello\n" if suffix in (".csv", ".tsv") \
        else jsonl_bytes(ROWS[:1]).decode()
    raw = text.encode(encoding)   # utf-16-le: no BOM, caught by its NUL bytes
    if suffix == ".jsonl.gz":
        raw = gzip.compress(raw)
    with pytest.raises(ContainerError, match=rf"^the file is {name} \(.*\); save it as UTF-8$"):
        read(write_bytes(tmp_path / f"d{suffix}", raw))


# ---------------------------------------------------------------- whole-file problems

def test_truncated_gzip(tmp_path):
    full = gzip.compress(jsonl_bytes(ROWS * 1000))
    with pytest.raises(ContainerError, match=r"^the gzip stream is truncated \(.*\): was the file copied"):
        read(write_bytes(tmp_path / "d.jsonl.gz", full[: len(full) // 2]))
    with pytest.raises(ContainerError, match="truncated"):
        read(write_bytes(tmp_path / "e.jsonl.gz", full[:-4]))   # only the trailer missing


def test_not_gzip_and_corrupt_gzip(tmp_path):
    with pytest.raises(ContainerError, match=r"^not a gzip file"):
        read(write_bytes(tmp_path / "d.jsonl.gz", jsonl_bytes(ROWS)))
    full = bytearray(gzip.compress(jsonl_bytes(ROWS)))
    full[-8:-4] = b"\0\0\0\0"   # wrong CRC
    with pytest.raises(ContainerError, match=r"^the gzip stream is corrupt \(CRC"):
        read(write_bytes(tmp_path / "e.jsonl.gz", bytes(full)))


def test_truncated_zstd(tmp_path):
    full = zstandard.ZstdCompressor().compress(jsonl_bytes(ROWS * 1000))
    for cut in (full[: len(full) // 2], full[:-3]):
        with pytest.raises(ContainerError, match=r"^the zstd stream is truncated \(.*\): was the file copied"):
            read(write_bytes(tmp_path / "d.jsonl.zst", cut))


def test_not_zstd(tmp_path):
    with pytest.raises(ContainerError, match=r"^not a zstd file"):
        read(write_bytes(tmp_path / "d.jsonl.zst", jsonl_bytes(ROWS)))


@pytest.mark.parametrize("damage", ["truncated", "not parquet", "empty"])
def test_corrupt_parquet(tmp_path, damage):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), good)
    data = {"truncated": good.read_bytes()[:-20], "not parquet": jsonl_bytes(ROWS), "empty": b""}[damage]
    with pytest.raises(ContainerError, match=r"^not a readable Parquet file \(.+\)$"):
        read(write_bytes(tmp_path / "d.parquet", data))


@pytest.mark.parametrize("data", [b'{"text": "a"}', b'"text"', b"3", b'\n {"a": [1]}'])
def test_json_must_be_an_array(tmp_path, data):
    with pytest.raises(ContainerError) as e:
        read(write_bytes(tmp_path / "d.json", data))
    assert str(e.value) == ("a .json file must hold an array of examples ([{...}, {...}]); "
                            "for one example per line use .jsonl")


def test_json_malformed_item_names_it_after_yielding_the_good_ones(tmp_path):
    got = []
    with pytest.raises(ContainerError, match=r"^item 3: invalid JSON \(.+\)$"):
        for record in open_records(write_bytes(tmp_path / "d.json", b'[{"a": 1}, {"b": 2}, {"c": x}, {"d": 4}]')):
            got.append(record)
    assert got == [(0, {"a": 1}), (1, {"b": 2})]


def test_json_truncated_and_trailing_garbage(tmp_path):
    with pytest.raises(ContainerError, match=r"^the file ends inside item 2 \(.*\): was it copied completely"):
        read(write_bytes(tmp_path / "d.json", b'[{"a": 1}, {"b": '))
    with pytest.raises(ContainerError, match=r"^invalid JSON after the closing \] of the array"):
        read(write_bytes(tmp_path / "e.json", b'[{"a": 1}] [2]'))
    with pytest.raises(ContainerError, match=r"^item 1: invalid JSON"):
        read(write_bytes(tmp_path / "f.json", b'[{"a": "\xff"}]'))


# ---------------------------------------------------------------- progress and memory

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".csv", ".parquet"])
def test_fraction_is_monotonic_and_ends_at_one(tmp_path, suffix):
    rows = [{"text": f"row {i} " + os.urandom(200).hex()} for i in range(30000)]   # ~12 MB: many chunks
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5000)
    elif suffix == ".csv":
        write_csv(path, rows)
    else:
        raw = json.dumps(rows).encode() if suffix == ".json" else jsonl_bytes(rows)
        compress = {".jsonl.gz": lambda b: gzip.compress(b, 1),
                    ".jsonl.zst": zstandard.ZstdCompressor().compress}.get(suffix, bytes)
        write_bytes(path, compress(raw))
    records = open_records(path)
    seen, count = [records.fraction()], 0
    for _, value in records:
        count += 1
        seen.append(records.fraction())
    assert count == len(rows) and value == rows[-1]
    assert seen == sorted(seen) and seen[0] == 0.0 and records.fraction() == 1.0
    assert 0.05 < seen[len(seen) // 2] < 0.95   # it moves during the read, not only at the end


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".json"])
def test_memory_stays_bounded(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    line = {"text": None}
    n = 25000
    # ~50 MB of text (hex compresses only ~2x, so the compressed file is large too), written in pieces
    with open(path, "wb") as raw:
        out = {".jsonl.gz": lambda: gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1),
               ".jsonl.zst": lambda: zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False),
               ".json": lambda: open(os.dup(raw.fileno()), "wb")}[suffix]()
        with out:
            out.write(b"[" if suffix == ".json" else b"")
            for i in range(n):
                line["text"] = os.urandom(1000).hex()
                sep = b"," if suffix == ".json" and i < n - 1 else b"\n"
                out.write(json.dumps(line).encode() + sep)
            out.write(b"]" if suffix == ".json" else b"")
    size = path.stat().st_size
    assert size > 20e6
    tracemalloc.start()
    try:
        count = 0
        for _, value in open_records(path):
            count += 1
            assert len(value["text"]) == 2000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 12e6 and peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_memory_bounded_for_highly_compressible_files(tmp_path, suffix):
    path = tmp_path / f"rep{suffix}"
    with open(path, "wb") as raw:   # 60 lines of 1 MB of one letter: a few KB compressed
        out = (gzip.GzipFile(fileobj=raw, mode="wb") if suffix == ".jsonl.gz"
               else zstandard.ZstdCompressor().stream_writer(raw, closefd=False))
        with out:
            for _ in range(60):
                out.write(json.dumps({"text": "a" * (1 << 20)}).encode() + b"\n")
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        count = sum(1 for _, v in open_records(path) if v == {"text": "a" * (1 << 20)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 60
    assert peak < 16e6, f"peak {peak / 1e6:.1f} MB for 60 MB of text"


def test_command_line(tmp_path):
    import subprocess
    import sys

    path = write_bytes(tmp_path / "d.jsonl", b'{"text": "a"}\nnot json\n')
    done = subprocess.run([sys.executable, "-m", "evertrain.data.containers", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        "line 1 [100%]: {'text': 'a'}",
        "line 2 [100%]: BadRecord(reason='invalid JSON (Expecting value at column 1)')",
    ]
    bad = write_bytes(tmp_path / "d.jsonl.gz", b"plain")
    done = subprocess.run([sys.executable, "-m", "evertrain.data.containers", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith(f"{bad}: not a gzip file")


# ---------------------------------------------------------------- poison: long lines and deep nesting


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
