"""load_file (data/__init__.py): the data formats and their labels, truncation, every kind of bad input (library
and CLI), and any other failure while reading a DataError with its place, but never a full disk. Packing:
tests/test_packing.py.

    pytest -q tests/test_data.py
"""

import json

import pytest
from conftest import cli, explode_on_boom, text_rows, write_jsonl

from evertrain.config import TrainConfig
from evertrain.data import IGNORE, DataError, load_file
from evertrain.data.formats import parse_record


def labelled_text(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE])


def test_formats_and_loss_masks(tmp_path, tok, tiny_model):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "plain text"},
        {"prompt": "Q: two?", "completion": " A: 2"},
        {"prompt": "Q: three?", "response": " A: 3"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "hello again"}]},
    ])
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), packing=False))
    text, pc, pr, chat = data.examples
    assert dict(data.formats) == {"text": 1, "prompt_completion": 2, "messages": 1}
    eos = tok.eos_token
    # text: every token but the first (which nothing predicts) is a target, and EOS is appended
    assert labelled_text(tok, text) == "lain text" + eos
    assert pc.input_ids[-1] == tok.eos_token_id and labelled_text(tok, pc) == " A: 2" + eos
    assert labelled_text(tok, pr) == " A: 3" + eos
    # messages: exactly the assistant turns, both of them, each with its end-of-turn marker
    assert labelled_text(tok, chat) == f"hello{eos}\nhello again{eos}\n"
    assert [e.line for e in data.examples] == [0, 1, 2, 3]


def test_truncation_is_counted_not_dropped(tmp_path, tok, tiny_model):
    f = write_jsonl(tmp_path / "long.jsonl", [{"text": "y" * 100}, {"text": "short"},
                                              {"prompt": "p" * 20, "completion": "c"}])
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=16, packing=False, long_text="truncate"))
    assert len(data.examples) == 3 and data.truncated == 2
    assert len(data.examples[0].input_ids) == 16
    windowed = load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=16, packing=False))
    assert windowed.truncated == 1 and windowed.records == 3   # the text is windowed; the prompt is still cut
    assert [e.id for e in windowed.examples] == [f"0/{k}" for k in range(7)] + [1, 2]


BAD = {
    "invalid_json": (b'{"text": "ok"}\n{"text": broken\n', "line 2: invalid JSON"),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8"),
    "unknown_keys": (b'{"text": "ok"}\n{"txt": "typo"}\n', "line 2: fits no format (keys: ['txt'])"),
    "non_string": (b'{"prompt": "q", "completion": 42}\n', 'line 1: "completion" must be a string, got int'),
    "non_string_content": (b'{"messages": [{"role": "assistant", "content": 42}]}\n',
                           "line 1: messages[0].content must be a string or a list of text parts"),
    "no_assistant": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: no assistant turn"),
    "bad_role": (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', "line 1: messages[0] has unknown role"),
    "not_object": (b'["text"]\n', "line 1: expected a JSON object, got list"),
    "nested_too_deeply": (b'{"text": "ok"}\n' + b"[" * 100000 + b"]" * 100000 + b"\n",
                          "line 2: nested too deeply (over 100"),
    "empty_file": (b"", "holds no examples"),
    "blank_only": (b"\n  \n", "holds no examples"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_names_file_and_line(tmp_path, tok, tiny_model, kind):
    content, message = BAD[kind]
    f = tmp_path / f"{kind}.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_file(f, tok, TrainConfig(model=str(tiny_model)))
    assert str(f) in str(err.value) and message in str(err.value)


def test_every_bad_line_is_reported(tmp_path, tok, tiny_model):
    f = write_jsonl(tmp_path / "many.jsonl", ['{"text": "good"}', "nope", '{"text": 1}', '{"text": "good"}', "{"])
    with pytest.raises(DataError) as err:
        load_file(f, tok, TrainConfig(model=str(tiny_model)))
    assert [p.split(":")[0] for p in err.value.problems] == ["line 2", "line 3", "line 5"]


def test_cli_rejects_bad_file_and_trains_nothing(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert cli("train", "--dataset", write_jsonl(tmp_path / "good.jsonl", text_rows(5)), "--output-dir", out,
               "--model", tiny_model) == 0
    before = sorted(p.name for p in out.iterdir())
    bad = write_jsonl(tmp_path / "bad.jsonl", text_rows(3) + ['{"text": 7}'])
    assert cli("train", "--dataset", bad, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 4" in err
    assert sorted(p.name for p in out.iterdir()) == before  # no new checkpoint, nothing trained


# LLaMA-Factory's data/mllm_demo.json and data/kto_en_demo.json, one record each, as those .json arrays hold them
MLLM_DEMO = {"messages": [{"content": "<image>Who are they?", "role": "user"},
                          {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
                          {"content": "What are they doing?", "role": "user"},
                          {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
             "images": ["mllm_demo_data/1.jpg"]}
KTO_DEMO = {"messages": [{"content": "How would you identify potential customers for a new product?\n",
                          "role": "user"},
                         {"content": "Ooh ooh ah ah! *giggle* Customers are like bananas!", "role": "assistant"}],
            "label": False}


def test_a_llama_factory_multimodal_file_is_refused(tmp_path, tiny_model, capsys):
    reason = ('item 1: "images" lists media for this record: evertrain trains text only (images, video and audio '
              "are not supported)")
    f = tmp_path / "demo.json"
    f.write_text(json.dumps([MLLM_DEMO], ensure_ascii=False, indent=2))
    assert cli("check", f, "--model", tiny_model) == 2
    assert reason in capsys.readouterr().err
    out = tmp_path / "run"
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model) == 2
    assert reason in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*"))


def test_a_llama_factory_kto_file_is_rated_answers_its_bad_one_never_trained_as_a_good_one(tmp_path, tiny_model,
                                                                                            capsys):
    f = tmp_path / "kto.json"
    good = {"messages": [KTO_DEMO["messages"][0], {"role": "assistant", "content": "Ask who needs it."}],
            "label": True}
    f.write_text(json.dumps([KTO_DEMO, good], ensure_ascii=False, indent=2))
    assert cli("check", f, "--model", tiny_model, "--examples", 2) == 0
    out = capsys.readouterr().out
    assert "2 rated answers (messages_feedback 2)" in out
    assert "rated bad:" in out and "rated good:" in out  # each answer with its rating, never as a plain example


def dolly_rows(n: int) -> list[dict]:
    """databricks-dolly-15k's shape."""
    return [{"instruction": f"When did airline {i} start operating?", "context": f"Airline {i} began in {1990 + i}.",
             "response": f"In {1990 + i}.", "category": "closed_qa"} for i in range(n)]


def test_a_dolly_file_is_told_its_problem_once_and_the_columns_that_fit(tmp_path, tiny_model, capsys):
    f = write_jsonl(tmp_path / "dolly.jsonl", dolly_rows(175))
    said = (f"{f}: not trained, 175 problem(s):\n"
            "  lines 1, 2, 3, 4, 5 and 170 more (175 records): fits no format (keys: ['category', 'context', "
            "'instruction', 'response']); expected text, prompt+completion (or response), messages, conversations "
            "(ShareGPT), instruction+output (Alpaca), or prompt+completion as message lists; or, to learn by judgment, "
            "chosen+rejected answers (a preference pair) or an answer with a true/false label; it fits as alpaca "
            "with --columns context=input,response=output, or in evertrain.toml:\n"
            "    [data.columns]\n"
            '    context = "input"\n'
            '    response = "output"\n')
    assert cli("check", f, "--model", tiny_model) == 2
    assert capsys.readouterr().err == f"evertrain: {said}"
    out = tmp_path / "run"
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model) == 2
    assert capsys.readouterr().err == f"evertrain: {said}"
    # What it suggests trains: the option, and the table as a settings file
    assert cli("check", f, "--model", tiny_model, "--columns", "context=input,response=output") == 0
    assert "175 examples (alpaca 175)" in capsys.readouterr().out
    (tmp_path / "evertrain.toml").write_text(said.split("evertrain.toml:\n")[1])
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model,
               "--config", tmp_path / "evertrain.toml") == 0
    assert list(out.glob("checkpoint-*"))


def test_each_distinct_problem_once_at_most_twenty_and_every_bad_record_counted(tmp_path, tok, tiny_model):
    rows = [{"text": 1}] * 3 + [{f"key{i}": "x"} for i in range(25)] + [{"text": "good"}, "nope", {"text": 2}]
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_file(f, tok, TrainConfig(model=str(tiny_model)))
    e = err.value
    assert e.total == 30  # the bad records, all of them
    assert e.problems[0] == 'lines 1, 2, 3 and 31: "text" must be a string, got int'
    assert e.problems[1].startswith("line 4: fits no format (keys: ['key0'])")
    assert len(e.problems) == 20 and e.covered == 23  # the 20 first distinct problems; 7 records beyond them
    assert str(e).endswith("\n  ... and 7 more")


# ---------------------------------------------------------------- poison: cut texts counted, anything else a DataError

def test_load_file_counts_cut_texts(tmp_path, tok, tiny_model):
    f = write_jsonl(tmp_path / "cut.jsonl", [{"text": "v" * 300}, {"text": "short"}])
    data = load_file(f, tok, TrainConfig(model=str(tiny_model), max_length=8, packing=False, held_out_fraction=0,
                                         long_text="truncate"))
    assert data.truncated == 1 and [len(e.input_ids) for e in data.examples] == [8, 6]


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
