"""Every dataset shape -> Record: golden outputs for real-world records, every refusal, the column mapping."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evertrain.config import parse_columns
from evertrain.data.formats import Record, RecordError, parse_record

WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def err(obj, columns=None) -> str:
    with pytest.raises(RecordError) as e:
        parse_record(obj, columns)
    return str(e.value)


def test_no_torch_needed():
    code = "import sys, evertrain.data.formats; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ---------------------------------------------------------------- text and prompt/completion

def test_text():
    assert parse_record({"text": "Once upon a time", "id": 7, "source": "tinystories"}) == Record(
        "text", text="Once upon a time", ignored=("id", "source"))


@pytest.mark.parametrize("answer", ["completion", "response"])
def test_prompt_completion(answer):
    r = parse_record({"prompt": "Q: 2+2=\nA:", answer: " 4", "meta": {"x": 1}})
    assert r == Record("prompt_completion", prompt="Q: 2+2=\nA:", completion=" 4", ignored=("meta",))


def test_prompt_may_be_empty_and_completion_beats_response():
    r = parse_record({"prompt": "", "completion": "Hello", "response": "unused"})
    assert (r.prompt, r.completion, r.ignored) == ("", "Hello", ("response",))


# ---------------------------------------------------------------- OpenAI messages

def test_openai_tools_calls_names_weights_and_parts():
    obj = {"messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Weather in "},
                                                       {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": "Probably sunny.", "weight": 0},
        {"role": "user", "content": "Please check."},
        {"role": "assistant", "content": None, "refusal": None, "audio": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
        {"role": "assistant", "content": "It is 18 °C in Paris.", "weight": 1, "annotations": ["kept quiet"]},
    ], "tools": [{"type": "function", "function": WEATHER}], "id": "conv-1"}
    r = parse_record(obj)
    assert r.kind == "messages"
    assert r.messages == [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": "Probably sunny."},
        {"role": "user", "content": "Please check."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp_c\": 18}", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
    ]
    assert r.train == [False, False, False, False, True, False, True]
    assert r.tools == [{"type": "function", "function": WEATHER}]
    assert r.ignored == ("id",)
    assert (r.text, r.prompt, r.completion) == (None, None, None)


def test_openai_legacy_functions_function_call_and_function_role():
    obj = {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"role": "function", "name": "get_weather", "content": "-3"},
        {"role": "assistant", "content": "-3 °C."},
    ], "functions": [WEATHER]}
    r = parse_record(obj)
    assert r.messages[1:3] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "-3", "name": "get_weather"}]
    assert r.train == [False, True, False, True]
    assert r.tools == [{"type": "function", "function": WEATHER}]


def test_plain_chat_has_no_tools():
    r = parse_record({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    assert (r.kind, r.train, r.tools, r.ignored) == ("messages", [False, True], None, ())


# ---------------------------------------------------------------- ShareGPT

def test_sharegpt_system_function_call_observation_and_string_tools():
    obj = {"conversations": [
        {"from": "human", "value": "What's the weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "{\"temp_c\": 18}"},
        {"from": "gpt", "value": "It is 18 °C in Paris."},
    ], "system": "You are a helpful assistant.", "tools": json.dumps([WEATHER]), "source": "glaive"}
    r = parse_record(obj)
    assert r.kind == "sharegpt"
    assert r.messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp_c\": 18}"},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
    ]
    assert r.train == [False, False, True, False, True]
    assert r.tools == [{"type": "function", "function": WEATHER}]
    assert r.ignored == ("source",)


def test_sharegpt_roles_free_text_function_call_and_messages_key():
    obj = {"messages": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hi"},
                        {"from": "chatgpt", "value": "Hey."}, {"from": "human", "value": "Call it"},
                        {"from": "function_call", "value": "get_weather(Paris)"}, {"from": "tool", "value": "18"},
                        {"role": "assistant", "content": "18 °C."}]}
    r = parse_record(obj)
    assert r.kind == "sharegpt" and r.tools is None
    assert [(m["role"], m["content"]) for m in r.messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey."), ("user", "Call it"),
        ("assistant", "get_weather(Paris)"), ("tool", "18"), ("assistant", "18 °C.")]
    assert r.train == [False, False, True, False, True, False, True]


# ---------------------------------------------------------------- Alpaca and TRL conversational

def test_alpaca_with_input():
    r = parse_record({"instruction": "Translate the sentence into French.", "input": "The cat sleeps.",
                      "output": "Le chat dort.", "text": "Below is an instruction..."})
    assert r.kind == "alpaca"
    assert r.messages == [{"role": "user", "content": "Translate the sentence into French.\n\nThe cat sleeps."},
                          {"role": "assistant", "content": "Le chat dort."}]
    assert r.train == [False, True]
    assert r.ignored == ("text",)


def test_alpaca_with_system_and_history():
    r = parse_record({"instruction": "And the capital of Italy?", "input": "", "output": "Rome.",
                      "system": "Answer in one word.",
                      "history": [["Capital of France?", "Paris."], ["Capital of Spain?", "Madrid."]]})
    assert r.messages == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Capital of Spain?"}, {"role": "assistant", "content": "Madrid."},
        {"role": "user", "content": "And the capital of Italy?"}, {"role": "assistant", "content": "Rome."}]
    assert r.train == [False] * 6 + [True]


def test_trl_conversational_prompt_completion():
    r = parse_record({
        "prompt": [{"role": "system", "content": "You are kind."},
                   {"role": "user", "content": "What color is the sky?"},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "And at sunset?"}],
        "completion": [{"role": "assistant", "content": "Orange and red."}],
        "tools": [WEATHER]})
    assert r.kind == "chat_prompt_completion"
    assert [m["content"] for m in r.messages] == [
        "You are kind.", "What color is the sky?", "Blue.", "And at sunset?", "Orange and red."]
    assert r.train == [False, False, False, False, True]
    assert r.tools == [{"type": "function", "function": WEATHER}]


# ---------------------------------------------------------------- priority, nulls, the column mapping

def test_priority():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    everything = {"messages": chat, "conversations": [{"from": "gpt", "value": "x"}], "instruction": "i",
                  "output": "o", "prompt": "p", "completion": "c", "text": "t"}
    r = parse_record(everything)
    assert (r.kind, r.ignored) == ("messages", ("completion", "conversations", "instruction", "output",
                                                "prompt", "text"))
    del everything["messages"]
    assert parse_record(everything).kind == "sharegpt"
    del everything["conversations"]
    assert parse_record(everything).kind == "alpaca"
    del everything["instruction"]
    assert parse_record(everything).kind == "prompt_completion"
    del everything["prompt"]
    assert parse_record(everything).kind == "text"


def test_ultrafeedback_shape_trains_its_messages():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    r = parse_record({"prompt": "Hi", "chosen": chat, "rejected": chat, "messages": chat, "score_chosen": 8.0})
    assert (r.kind, r.ignored) == ("messages", ("chosen", "prompt", "rejected", "score_chosen"))


def test_nulls_count_as_absent():
    # A Parquet file mixing shapes fills each row's unused columns with null.
    r = parse_record({"text": "plain", "messages": None, "prompt": None, "completion": None})
    assert (r.kind, r.text, r.ignored) == ("text", "plain", ())


def test_column_mapping():
    cols = {"question": "prompt", "answer": "completion"}
    r = parse_record({"question": "2+2?", "answer": "4", "id": 1}, cols)
    assert r == Record("prompt_completion", prompt="2+2?", completion="4", ignored=("id",))
    # A mapped key the record lacks is simply absent; the record is detected on what it has.
    assert parse_record({"answer": "4", "text": "raw"}, cols) == Record("text", text="raw", ignored=("answer",))
    # A mapped column replaces the dataset's own column of the target name, which is then ignored.
    r = parse_record({"question": "mapped", "prompt": "own", "answer": "4"}, cols)
    assert (r.prompt, r.ignored) == ("mapped", ("prompt",))
    # Swapping works because every mapping applies at once.
    r = parse_record({"prompt": "B", "completion": "A"}, {"prompt": "completion", "completion": "prompt"})
    assert (r.prompt, r.completion) == ("A", "B")
    # Two sources of one key: the first listed wins.
    r = parse_record({"q": "first", "question": "second", "a": "4"},
                     {"q": "prompt", "question": "prompt", "a": "completion"})
    assert (r.prompt, r.ignored) == ("first", ("question",))
    r = parse_record({"convo": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
                     parse_columns("convo=conversations"))
    assert r.kind == "sharegpt"
    assert err({"question": "2+2?"}, cols) == (
        "fits no format (keys: ['question']); expected text, prompt+completion (or response), messages, "
        "conversations (ShareGPT), instruction+output (Alpaca), or prompt+completion as message lists; or, to "
        "learn by judgment, chosen+rejected answers (a preference pair) or an answer with a true/false label")


