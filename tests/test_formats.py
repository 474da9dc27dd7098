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
        "conversations (ShareGPT), instruction+output (Alpaca), or prompt+completion as message lists")


# ---------------------------------------------------------------- every refusal

U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
KTO = ('KTO data (examples with a true/false "label") is for KTO preference training; evertrain trains '
       'supervised examples only: keep the examples labelled true, without "label"')


@pytest.mark.parametrize("obj, message", [
    ([1, 2], "expected a JSON object, got list"),
    ("text", "expected a JSON object, got str"),
    ({"foo": 1, "txt": "x"}, "fits no format (keys: ['foo', 'txt']); expected text, prompt+completion (or response), "
     "messages, conversations (ShareGPT), instruction+output (Alpaca), or prompt+completion as message lists"),
    ({"text": None, "id": 3}, "fits no format (keys: ['id'], null: ['text']); expected text, prompt+completion "
     "(or response), messages, conversations (ShareGPT), instruction+output (Alpaca), or prompt+completion as "
     "message lists"),
    ({"chosen": "good", "rejected": "bad", "prompt": "Q"},
     'preference data (chosen/rejected) is for preference training such as DPO; evertrain trains supervised '
     'examples only: keep the chosen answer as "completion" or "messages"'),
    ({"prompt": "Q", "completion": "A", "label": False}, KTO),
    # text, prompt/completion
    ({"text": 5}, '"text" must be a string, got int'),
    ({"text": "  \n"}, '"text" is empty'),
    ({"prompt": "Q", "completion": 4}, '"completion" must be a string, got int'),
    ({"prompt": 1, "response": "A"}, '"prompt" must be a string, got int'),
    ({"prompt": "Q", "completion": " "}, '"completion" is empty'),
    ({"prompt": "Q", "response": ""}, '"response" is empty'),
    # OpenAI messages
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": "hi"}, '"messages" must be a non-empty list'),
    ({"messages": ["hi"]}, "messages[0] must be an object, got str"),
    ({"messages": [{"content": "hi"}]}, 'messages[0] has no "role"'),
    ({"messages": [U, {"role": "bot", "content": "x"}]},
     "messages[1] has unknown role 'bot' (expected one of system, user, assistant, tool)"),
    ({"messages": [{"role": "user", "content": 3}, A]},
     "messages[0].content must be a string or a list of text parts, got int"),
    ({"messages": [{"role": "user", "content": None}, A]},
     "messages[0].content must be a string or a list of text parts, got null"),
    ({"messages": [U, {"role": "assistant"}]}, 'messages[1] has no "content"'),
    ({"messages": [U, A, {"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]}, A]},
     "messages[2] has a image_url part: evertrain trains text only (images, video and audio are not supported)"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, A]},
     "messages[0] has a input_audio part: evertrain trains text only (images, video and audio are not supported)"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}, A]},
     'messages[0].content[0] must be a part {"type": "text", "text": "..."}, got {"type": "text", "text": 1}'),
    ({"messages": [U, {"role": "assistant", "content": "x", "weight": 0.5}]},
     "messages[1].weight must be 0 or 1, got 0.5"),
    ({"messages": [U, {"role": "assistant", "content": "x", "name": 2}]},
     "messages[1].name must be a string, got int"),
    ({"messages": [U, {"role": "tool", "content": "18", "tool_call_id": 7}, A]},
     "messages[1].tool_call_id must be a string, got int"),
    ({"messages": [U, {"role": "assistant", "content": None, "tool_calls": {"id": 1}}]},
     "messages[1].tool_calls must be a list, got dict"),
    ({"messages": [U, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {}}]}]},
     'messages[1].tool_calls[0] must be {"type": "function", "function": {"name": str, '
     '"arguments": a JSON string or object}}'),
    ({"messages": [U]}, "no assistant turn to train on (the conversation has no assistant message)"),
    ({"messages": [U, {"role": "assistant", "content": "x", "weight": 0}]},
     "no assistant turn to train on (every assistant message has weight 0)"),
    ({"messages": [U, {"role": "assistant", "content": " "}]},
     "no assistant turn to train on (every trained assistant message is empty)"),
    ({"messages": [U, A], "tools": {"name": "f"}}, '"tools" must be a list of objects, got dict'),
    ({"messages": [U, A], "tools": ["f"]}, '"tools" must be a list of objects, got a list holding other values'),
    ({"messages": [U, A], "tools": "[oops"}, '"tools" is a string but not valid JSON'),
    ({"messages": [U, A], "functions": "f"}, '"functions" must be a list of objects, got str'),
    # ShareGPT
    ({"conversations": []}, '"conversations" must be a non-empty list'),
    ({"conversations": [{"value": "Hi"}]}, 'conversations[0] has no "from"'),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
     "conversations[1] has unknown role 'bot' (expected one of human, user, gpt, assistant, chatgpt, bing, bard, "
     "system, function_call, observation, tool, function)"),
    ({"conversations": [{"from": "human", "value": ["Hi"]}]}, "conversations[0].value must be a string, got list"),
    ({"conversations": [{"from": "human", "value": "Hi"}]},
     "no assistant turn to train on (the conversation has no assistant message)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
     "no assistant turn to train on (every trained assistant message is empty)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "system": 1},
     '"system" must be a string, got int'),
    # Alpaca
    ({"instruction": "Do it", "output": ["a"]}, '"output" must be a string, got list'),
    ({"instruction": 1, "output": "a"}, '"instruction" must be a string, got int'),
    ({"instruction": "Do it", "input": 2, "output": "a"}, '"input" must be a string, got int'),
    ({"instruction": "Do it", "output": "  "}, '"output" is empty'),
    ({"instruction": "Do it", "output": "a", "history": "no"},
     '"history" must be a list of [instruction, response] pairs, got str'),
    ({"instruction": "Do it", "output": "a", "history": [["q"]]},
     "history[0] must be an [instruction, response] pair of strings"),
    # TRL conversational
    ({"prompt": "Hi", "completion": [A]}, '"prompt" must be a list of messages when "completion" is one, got str'),
    ({"prompt": [U], "completion": [U]},
     'no assistant turn to train on (the "completion" holds no assistant message)'),
    ({"prompt": [U, A], "completion": [{"role": "user", "content": "more"}]},
     'no assistant turn to train on (the "completion" holds no assistant message)'),
    ({"prompt": [], "completion": [A]}, '"prompt" must be a non-empty list'),
    ({"prompt": [U], "completion": [{"role": "assistant", "content": 1}]},
     "completion[0].content must be a string or a list of text parts, got int"),
])
def test_refusals(obj, message):
    assert err(obj) == message


def test_preference_data_trains_once_its_chosen_answer_is_mapped():
    r = parse_record({"prompt": "Q", "chosen": "good", "rejected": "bad"}, parse_columns("chosen=completion"))
    assert r == Record("prompt_completion", prompt="Q", completion="good", ignored=("rejected",))


def test_a_non_boolean_label_is_just_ignored():
    r = parse_record({"prompt": "Q", "completion": "A", "label": 3})
    assert (r.kind, r.ignored) == ("prompt_completion", ("label",))


# ---------------------------------------------------------------- multimodal and KTO records

TEXT_ONLY = "evertrain trains text only (images, video and audio are not supported)"
# LLaMA-Factory's data/mllm_demo.json, first record
MLLM_DEMO = {"messages": [{"role": "user", "content": "<image>Who are they?"},
                          {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."}],
             "images": ["mllm_demo_data/1.jpg"]}


@pytest.mark.parametrize("obj, columns, message", [
    (MLLM_DEMO, None, f'"images" lists media for this record: {TEXT_ONLY}'),
    ({"conversations": [{"from": "human", "value": "<image>Who are they?"}, {"from": "gpt", "value": "Kane."}],
      "images": ["1.jpg"]}, None, f'"images" lists media for this record: {TEXT_ONLY}'),
    ({"instruction": "<video>What happens?", "output": "A goal.", "videos": ["1.mp4"]}, None,
     f'"videos" lists media for this record: {TEXT_ONLY}'),
    ({"text": "a caption", "audios": "1.wav"}, None, f'"audios" lists media for this record: {TEXT_ONLY}'),
    # the placeholders, when the media went under another name (or nowhere)
    ({"messages": [U, A, {"role": "user", "content": "And <image>?"}, A]}, None,
     f"messages[2].content holds the placeholder <image>: {TEXT_ONLY}"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<audio>"}]}, A]}, None,
     f"messages[0].content[0].text holds the placeholder <audio>: {TEXT_ONLY}"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<video>"}],
      "image_paths": ["1.jpg"]}, None, f"conversations[1].value holds the placeholder <video>: {TEXT_ONLY}"),
    ({"instruction": "Describe it", "input": "<image>", "output": "A cat."}, None,
     f'"input" holds the placeholder <image>: {TEXT_ONLY}'),
    ({"instruction": "Next?", "output": "x", "history": [["<image>What is it?", "A cat."]]}, None,
     f"history[0][0] holds the placeholder <image>: {TEXT_ONLY}"),
    ({"prompt": "<audio>Transcribe:", "completion": "Hello."}, None,
     f'"prompt" holds the placeholder <audio>: {TEXT_ONLY}'),
    ({"prompt": [U], "completion": [{"role": "assistant", "content": "<image>"}]}, None,
     f"completion[0].content holds the placeholder <image>: {TEXT_ONLY}"),
    ({"q": "<image>What is it?", "a": "A cat."}, {"q": "prompt", "a": "completion"},
     f'"q" holds the placeholder <image>: {TEXT_ONLY}'),
])
def test_multimodal_records_are_refused(obj, columns, message):
    assert err(obj, columns) == message


def test_text_with_media_tags_and_empty_media_lists_train():
    # An HTML page's <video> tag is text; an empty or null media list is what a mixed file gives text-only records.
    assert parse_record({"text": "<video><audio>src</audio></video>"}).kind == "text"
    chat = {"messages": [U, A], "images": [], "videos": None, "audios": ""}
    assert parse_record(chat).kind == "messages"


@pytest.mark.parametrize("obj", [
    # LLaMA-Factory's data/kto_en_demo.json shape
    {"messages": [{"role": "user", "content": "Is the sky green?"}, {"role": "assistant", "content": "Yes."}],
     "label": False},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go away."}], "label": False},
    {"instruction": "Say hi", "output": "hi", "label": True},
    {"prompt": [U], "completion": [A], "label": True},
    {"text": "a good one", "label": True},
])
def test_kto_label_is_refused_in_every_shape(obj):
    assert err(obj) == KTO
