"""config.py: the --columns option parsed into a mapping, and each mistake in it said. The mapping applied to
records: tests/test_formats.py.

    pytest -q tests/test_config.py
"""

from __future__ import annotations

import pytest

from evertrain.config import FORMAT_KEYS, parse_columns


def test_parse_columns():
    assert parse_columns("question=prompt,answer=completion") == {"question": "prompt", "answer": "completion"}
    assert parse_columns(" q = instruction , a=output, ") == {"q": "instruction", "a": "output"}
    assert parse_columns("") == {}
    assert set(FORMAT_KEYS) >= {"text", "prompt", "completion", "response", "messages", "conversations", "tools",
                                "functions", "instruction", "input", "output", "system", "history"}


@pytest.mark.parametrize("text, message", [
    ("question", 'column mapping item "question" has no "=" (expected source=target, e.g. question=prompt)'),
    ("=prompt", 'column mapping item "=prompt" has an empty side (expected source=target)'),
    ("question=", 'column mapping item "question=" has an empty side (expected source=target)'),
    ("q=prompt,q=completion", 'column mapping names "q" twice'),
    ("q=answer", 'column mapping target "answer" is not a format key (known: text, prompt, completion, response, '
                 'messages, conversations, tools, functions, instruction, input, output, system, history, chosen, '
                 'rejected, label)'),
])
def test_parse_columns_errors(text, message):
    with pytest.raises(ValueError) as e:
        parse_columns(text)
    assert str(e.value) == message
