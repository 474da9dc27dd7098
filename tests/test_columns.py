"""data/columns.py: the --columns mapping suggested for a record that fits no format, and the hint as printed, which
reads back as the same mapping. The mapping applied to records: tests/test_formats.py.

    pytest -q tests/test_columns.py
"""

from __future__ import annotations

import pytest

from evertrain.data.columns import hint, suggest
from evertrain.data.formats import FitsNoFormat, parse_record


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
DOLLY = {"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia ... 2000.",
         "response": "Virgin Australia commenced services on 31 August 2000.", "category": "closed_qa"}


@pytest.mark.parametrize("obj, columns, mapping, kind", [
    (DOLLY, {}, {"context": "input", "response": "output"}, "alpaca"),  # 3 keys used, not prompt+response's 2
    ({"question": "2+2?", "answer": "4", "id": 1}, {}, {"question": "prompt", "answer": "completion"},
     "prompt_completion"),
    ({"Query": "2+2?", "Reply": "4"}, {}, {"Query": "prompt", "Reply": "completion"}, "prompt_completion"),
    ({"title": "T", "content": "Body", "url": None}, {}, {"content": "text"}, "text"),
    ({"dialog": CHAT}, {}, {"dialog": "messages"}, "messages"),
    # the person's own mapping is kept, and completed
    ({"q": "2+2?", "answer": "4"}, {"q": "prompt"}, {"q": "prompt", "answer": "completion"}, "prompt_completion"),
])
def test_suggest(obj, columns, mapping, kind):
    with pytest.raises(FitsNoFormat):
        parse_record(obj, columns)
    assert suggest(obj, columns) == (mapping, kind)
    assert parse_record(obj, mapping).kind == kind


@pytest.mark.parametrize("obj", [{"foo": "x", "bar": "y"}, {"answer": "4"}, {"question": "2+2?", "answer": ""}])
def test_nothing_to_suggest(obj):
    assert suggest(obj, {}) is None and hint(obj, {}) is None


def test_hint_as_printed_reads_back_as_the_same_columns(tmp_path):
    from evertrain.daemon.workspace import read_settings

    text = hint(DOLLY, {})
    first, toml = text.split("\n", 1)
    assert first == "it fits as alpaca with --columns context=input,response=output, or in evertrain.toml:"
    (tmp_path / "evertrain.toml").write_text(toml)
    assert read_settings(tmp_path / "evertrain.toml")[0] == {"columns": "context=input,response=output"}
