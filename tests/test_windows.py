"""Long texts in windows, every token trained once; plain .txt and .md files; runs from before windows.

    pytest -q tests/test_windows.py
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import pytest
from conftest import cli, run_and_kill_after, settings_saved_without, text_rows, write_jsonl
from daemon_helpers import by_name, drop, make_ws

from evertrain.config import TrainConfig
from evertrain.data import IGNORE, load_file
from evertrain.files import sha256_file
from evertrain.observe import trace
from evertrain.train import checkpoint
from evertrain.data.order import held_out_lines

LENGTH = 64   # tokens per row: the tiny tokenizer has one token per byte, so a text of n bytes has n + 1 (EOS)


def document(i: int, words: int) -> str:
    return f"Document {i}. " + " ".join(f"w{i}.{j}" for j in range(words))


def train(data, out, model, *extra) -> int:
    return cli("train", "--dataset", data, "--output-dir", out, "--model", model, "--max-length", LENGTH,
               "--batch-size", 4, "--trace", "--held-out-fraction", 0, *extra)


def windows_of(examples) -> dict:
    """Example id -> (line, input_ids, labels), for the windows and whole examples a FileData holds."""
    return {e.id: (e.line, e.input_ids, e.labels) for e in examples}


def stitched(parts: list) -> list[int]:
    """A text's tokens again from its windows: the first whole, then what each later one adds after its context."""
    ids = list(parts[0][1])
    for _, window, labels in parts[1:]:
        context = next(i for i, x in enumerate(labels) if x != IGNORE)
        assert ids[-context:] == window[:context]   # the context is the end of the window before
        ids += window[context:]
    return ids


@pytest.mark.parametrize("overlap", [0, 5])
def test_a_long_document_trains_every_token_once(tmp_path, tiny_model, tok, capsys, overlap):
    docs = [document(i, 40 + 60 * i) for i in range(4)] + ["short"]   # 200 to 1,100 tokens, and one of 6
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "run"
    assert train(f, out, tiny_model, "--window-overlap", overlap) == 0
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=LENGTH, window_overlap=overlap,
                                         held_out_fraction=0))
    every = windows_of(data.examples)
    assert f"docs.jsonl: 5 examples in {len(every)} windows" in capsys.readouterr().out

    (counts,) = trace.coverage(out / "trace.jsonl").values()
    assert counts == Counter(dict.fromkeys(every, 1))   # each window once, the short text whole
    for line, text in enumerate(docs):
        parts = [every[k] for k in every if every[k][0] == line]
        whole = tok.backend_tokenizer.encode(text).ids + [tok.eos_token_id]
        assert stitched(parts) == whole   # no token lost, none added
        assert all(len(ids) <= LENGTH for _, ids, _ in parts) and parts[-1][1][-1] == tok.eos_token_id
        if len(parts) > 1:
            assert all(labels.count(IGNORE) == overlap + 1 for _, _, labels in parts[1:])
    # every token of a document is predicted exactly once: all but its first
    trained = sum(sum(x != IGNORE for x in every[k][2]) for k in counts)
    assert trained == sum(len(tok.backend_tokenizer.encode(d).ids) + 1 - 1 for d in docs)


def test_a_text_longer_than_a_tokenizing_piece_keeps_every_token_and_one_over_the_limit_is_refused(tmp_path, tok,
                                                                                                     tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evertrain.data import DataError
    from evertrain.data.render import PIECE_CHARS

    text = " ".join(f"word{j}\n" if j % 17 == 0 else f"word{j}" for j in range(40_000))   # 3 pieces
    assert len(text) > 2 * PIECE_CHARS
    f = write_jsonl(tmp_path / "big.jsonl", [{"text": text}])
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), held_out_fraction=0))
    every = windows_of(data.examples)
    assert stitched(list(every.values())) == tok.backend_tokenizer.encode(text).ids + [tok.eos_token_id]

    table = tmp_path / "rows.parquet"   # Parquet has no line to bound: the text itself is
    pq.write_table(pa.table({"text": ["fine", "x" * 2000]}), table)
    with pytest.raises(DataError) as e:
        load_file(table, tok, TrainConfig(model=str(tiny_model), max_line_bytes=1024))
    assert e.value.problems == ["row 2: the text is 2,000 characters, over max_line_bytes (1,024): split it, or "
                                "raise --max-line-bytes"]


def test_a_held_out_document_holds_out_all_its_windows(tmp_path, tiny_model, tok):
    docs = [document(i, 20 + 2 * i) for i in range(12)]   # 12 records, 2 to 5 windows each
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "run"
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--max-length", LENGTH,
               "--batch-size", 4, "--trace") == 0   # 2% of 12 is none; held_out_min_file (10) gives one record
    config = TrainConfig(model=str(tiny_model), max_length=LENGTH)
    data = load_file(f, tok, config)
    everything = windows_of(load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=LENGTH,
                                                          held_out_fraction=0)).examples)
    (held,) = held_out_lines(data.sha256, config.seed, 12, config.held_out_fraction, config.held_out_max,
                             config.held_out_min_file)
    its_windows = {k for k, v in everything.items() if v[0] == held}
    assert len(its_windows) > 1 and {e.id for e in data.held_out} == its_windows
    assert data.held_out_lines == [held] and data.records == 11

    records = trace.read(out / "trace.jsonl")
    assert {"file": data.sha256, "held_out": [held]} in records
    (counts,) = trace.coverage(out / "trace.jsonl").values()
    assert counts == Counter(dict.fromkeys(set(everything) - its_windows, 1))


NOTES = ("# Notes\n"
         "\n"
         "The first paragraph,\n"
         "on two lines.\n"
         "\n"
         "   \n"                          # blank: skipped as a line, but a paragraph may begin with it
         + "A long paragraph. " * 12 +    # 216 characters: 4 windows of max_length 64
         "\n\n\n"
         "The end, with no newline")


@pytest.mark.parametrize("suffix", [".md", ".txt"])
@pytest.mark.parametrize("sample_by,ids,examples", [
    ("line", [0, 2, 3, "6/0", "6/1", "6/2", "6/3", 9], "5 examples in 8 windows"),
    ("paragraph", [0, 2, "5/0", "5/1", "5/2", "5/3", 9], "4 examples in 7 windows"),
    ("document", [f"0/{k}" for k in range(5)], "1 examples in 5 windows"),
])
def test_a_text_file_trains_and_checks_by_line_paragraph_or_document(tmp_path, tiny_model, capsys, suffix,
                                                                       sample_by, ids, examples):
    f = tmp_path / f"notes{suffix}"
    f.write_bytes(NOTES.replace("\n", "\r\n").encode() if suffix == ".txt" else NOTES.encode())  # both endings
    assert cli("check", f, "--model", tiny_model, "--max-length", LENGTH, "--text-sample-by", sample_by) == 0
    assert capsys.readouterr().out.startswith(f"notes{suffix}: {examples} (text ")
    out = tmp_path / "run"
    assert train(f, out, tiny_model, "--text-sample-by", sample_by) == 0
    (counts,) = trace.coverage(out / "trace.jsonl").values()
    assert sorted(counts, key=trace.in_file_order) == ids and set(counts.values()) == {1}


def test_a_text_file_names_the_line_of_a_bad_record(tmp_path, tiny_model, capsys):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\n\nnot utf-8 \xe9 here\nstill the second paragraph\n\n" + b"x" * 2000 + b"\n")
    assert cli("check", f, "--model", tiny_model) == 2
    assert capsys.readouterr().err.splitlines()[1:] == ["  line 3: not UTF-8 (byte 10)"]
    # a paragraph is named by the line it starts on; one over max_line_bytes is refused, not read
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "run", "--model", tiny_model,
               "--text-sample-by", "paragraph", "--max-line-bytes", 1024) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  line 3: not UTF-8 (byte 10)", "  line 6: longer than 1024 characters (max_line_bytes): skipped unread"]


def test_a_run_interrupted_in_a_windowed_file_resumes_each_window_once(tmp_path, tiny_model, tok):
    docs = [document(i, 125 + 10 * i) for i in range(4)]   # 58 windows: 29 steps of 2 rows
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "run"
    command = [sys.executable, "-m", "evertrain", "train", "--dataset", str(f), "--output-dir", str(out),
               "--model", str(tiny_model), "--max-length", str(LENGTH), "--batch-size", "2", "--no-packing",
               "--save-steps", "5", "--trace", "--held-out-fraction", "0"]
    run_and_kill_after(command, out, 8)
    assert checkpoint.newest_complete(out).step < 29   # really killed mid-file
    assert cli(*command[3:]) == 0
    every = windows_of(load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=LENGTH,
                                                     held_out_fraction=0)).examples)
    assert len(every) == 58
    assert [r["step"] for r in trace.read(out / "trace.jsonl")] == list(range(1, 30))
    (counts,) = trace.coverage(out / "trace.jsonl").values()
    assert counts == Counter(dict.fromkeys(every, 1))


def test_a_run_begun_before_windows_keeps_truncating(tmp_path, tiny_model):
    out = tmp_path / "run"
    with settings_saved_without("long_text", "window_overlap", "text_sample_by"):
        assert train(write_jsonl(tmp_path / "a.jsonl", text_rows(6)), out, tiny_model) == 0
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": document(0, 100)}, {"text": "short"}])
    assert train(long, out, tiny_model) == 0
    saved = json.loads((checkpoint.newest_complete(out).path / "evertrain_config.json").read_text())
    assert saved["long_text"] == "truncate"   # and the run now says so
    sha = sha256_file(long)
    assert trace.coverage(out / "trace.jsonl")[sha] == Counter({0: 1, 1: 1})   # truncated, as before

    fresh = tmp_path / "fresh"
    assert train(long, fresh, tiny_model) == 0
    assert len(trace.coverage(fresh / "trace.jsonl")[sha]) > 2   # a new run windows it


def test_the_daemon_takes_a_markdown_file_without_a_final_newline(tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--text-sample-by", "paragraph", "--max-length", LENGTH,
                 "--incomplete-timeout", "600")
    drop(ws, "notes.md", NOTES)   # no final newline: a .jsonl would be waited for, up to 600 s
    start = time.monotonic()
    assert cli("run", ws, "--once") == 0
    assert time.monotonic() - start < 300   # taken when stable, not after the incomplete timeout
    row = by_name(ws)["notes.md"]
    assert row["state"] == "done"
    counts = trace.coverage(ws / "current_model" / "trace.jsonl")[row["sha256"]]
    assert sorted(counts, key=trace.in_file_order) == [0, 2, "5/0", "5/1", "5/2", "5/3", 9]
