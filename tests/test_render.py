"""Golden tests of what carries loss: every format, packing on and off, the tiny tokenizer and SmolLM2's template.

A golden is the example's whole text as `evertrain check` prints it, with every trained stretch between ⟦ and ⟧;
the trained text (the tokens whose label is not IGNORE, decoded) must be exactly what the brackets hold. Then:
the one-pass span finder against the prefix-rendering fallback on generated conversations, tool calls under
SmolLM2's own template and the built-in ChatML, --chat-template (library and CLI), and `evertrain check`.

Only SmolLM2's tokenizer is loaded (once per module), never its weights.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from itertools import groupby

import pytest
from conftest import cli, write_jsonl
from tiny import make_tokenizer

from evertrain.train import checkpoint
from evertrain.config import ConfigError, TrainConfig
from evertrain.data import IGNORE, DataError, load_file
from evertrain.data.formats import parse_record
from evertrain.data.render import (CHARS_PER_TOKEN, CHATML, Rendered, Renderer, _template_message,
                                   apply_chat_template_option)
from evertrain.data.summary import CLOSE, OPEN, marked
from evertrain.data.packing import collate
from evertrain.models import load_tokenizer

SMOL_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n")  # what SmolLM2's template puts first when a conversation has no system message
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
CHATML_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# ---------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(None)  # SmolLM2-135M-Instruct's tokenizer (converted once, then cached)


@pytest.fixture(params=["tiny", "smol"])
def tk(request, tiny_model):
    """(name, tokenizer, model) for both tokenizers."""
    tok = request.getfixturevalue({"tiny": "tok", "smol": "smol_tok"}[request.param])
    return request.param, tok, str(tiny_model) if request.param == "tiny" else None


def trained_text(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE])


def trained_runs(tok, example) -> list[str]:
    """Each contiguous trained stretch, decoded (one per trained turn in a conversation)."""
    pairs = zip(example.input_ids, example.labels)
    return [tok.decode([t for t, _ in g]) for on, g in groupby(pairs, key=lambda p: p[1] != IGNORE) if on]


def bracketed(golden: str) -> str:
    return "".join(re.findall(f"{OPEN}(.*?){CLOSE}", golden, flags=re.S))


def check_labels_are_ids(example) -> None:
    """Labels are the input ids themselves (transformers shifts), IGNORE elsewhere; the first is never trained."""
    assert len(example.labels) == len(example.input_ids)
    assert example.labels[0] == IGNORE
    assert all(lab in (IGNORE, i) for i, lab in zip(example.input_ids, example.labels))


# ---------------------------------------------------------------- goldens, one file per format

def T(role: str, content: str) -> str:
    """A ChatML turn that carries no loss."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def A(content: str) -> str:
    """A trained ChatML assistant turn: its header is context; its content, <|im_end|> and newline are trained."""
    return f"<|im_start|>assistant\n{OPEN}{content}<|im_end|>\n{CLOSE}"


# name -> (the format counted, [(record, golden)]); a golden is a string for both tokenizers or {tokenizer: golden}.
# SmolLM2's template renders like the tiny ChatML one, but with its default system turn first when none is given
# (see expected()).
CASES = {
    "text": ("text", [
        ({"text": "A plain text"}, f"A{OPEN} plain text<|im_end|>{CLOSE}"),
        ({"text": "A story<|im_end|>"}, f"A{OPEN} story<|im_end|>{CLOSE}"),  # ends with EOS: not doubled
    ]),
    "prompt_completion": ("prompt_completion", [
        ({"prompt": "Q: two?", "completion": " A: 2"}, f"Q: two?{OPEN} A: 2<|im_end|>{CLOSE}"),
        # no prompt: the completion's first token is the example's first, which nothing predicts
        ({"prompt": "", "completion": "Hello"}, {"tiny": f"H{OPEN}ello<|im_end|>{CLOSE}",
                                                 "smol": f"Hello{OPEN}<|im_end|>{CLOSE}"}),
    ]),
    "prompt_response": ("prompt_completion", [
        ({"prompt": "Q: three?", "response": " A: 3"}, f"Q: three?{OPEN} A: 3<|im_end|>{CLOSE}"),
        ({"prompt": "Translate: cat", "response": " chat", "id": 7}, f"Translate: cat{OPEN} chat<|im_end|>{CLOSE}"),
    ]),
    "openai_messages": ("messages", [
        ({"messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Weather in "},
                                                           {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": "Probably sunny.", "weight": 0},
            {"role": "user", "content": "Please check."},
            {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "sunny."}]},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome.", "weight": 1}]},
         "<|im_start|>system\nYou are a weather bot.<|im_end|>\n"
         "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
         "<|im_start|>assistant\nProbably sunny.<|im_end|>\n"
         "<|im_start|>user\nPlease check.<|im_end|>\n"
         f"<|im_start|>assistant\n{OPEN}It is sunny.<|im_end|>\n{CLOSE}"
         "<|im_start|>user\nThanks!<|im_end|>\n"
         f"<|im_start|>assistant\n{OPEN}You are welcome.<|im_end|>\n{CLOSE}"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
         T("user", "hi") + A("hello")),
    ]),
    # Neither the tiny template nor SmolLM2's renders tool calls: the call turn is an empty assistant turn.
    "openai_tools": ("messages", [
        ({"messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
            {"role": "assistant", "content": "It is 18 °C in Paris."}],
          "tools": [{"type": "function", "function": WEATHER}]},
         T("system", "You are a weather bot.") + T("user", "Weather in Paris?") + A("")
         + T("tool", "{\"temp_c\": 18}") + A("It is 18 °C in Paris.")),
        ({"messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather",
                                                                     "arguments": {"city": "Oslo"}}},
            {"role": "function", "name": "get_weather", "content": "-3"},
            {"role": "assistant", "content": "-3 °C."}], "functions": [WEATHER]},
         T("user", "Weather in Oslo?") + A("") + T("tool", "-3") + A("-3 °C.")),
    ]),
    "sharegpt": ("sharegpt", [
        ({"conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey."},
            {"from": "human", "value": "What's the weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "{\"temp_c\": 18}"},
            {"from": "gpt", "value": "It is 18 °C in Paris."}],
          "system": "You are a helpful assistant.", "tools": json.dumps([WEATHER])},
         T("system", "You are a helpful assistant.") + T("user", "Hi") + A("Hey.")
         + T("user", "What's the weather in Paris?") + A("") + T("tool", "{\"temp_c\": 18}")
         + A("It is 18 °C in Paris.")),
        ({"conversations": [  # a function_call that is not JSON is plain assistant text
            {"from": "human", "value": "Call it"}, {"from": "function_call", "value": "get_weather(Paris)"},
            {"from": "observation", "value": "18"}, {"from": "gpt", "value": "18 °C."}]},
         T("user", "Call it") + A("get_weather(Paris)") + T("tool", "18") + A("18 °C.")),
    ]),
    "alpaca": ("alpaca", [
        ({"instruction": "Translate the sentence into French.", "input": "The cat sleeps.", "output": "Le chat dort."},
         T("user", "Translate the sentence into French.\n\nThe cat sleeps.") + A("Le chat dort.")),
        ({"instruction": "And the capital of Italy?", "input": "", "output": "Rome.", "system": "Answer in one word.",
          "history": [["Capital of France?", "Paris."], ["Capital of Spain?", "Madrid."]]},
         T("system", "Answer in one word.") + T("user", "Capital of France?") + T("assistant", "Paris.")
         + T("user", "Capital of Spain?") + T("assistant", "Madrid.") + T("user", "And the capital of Italy?")
         + A("Rome.")),
    ]),
    "trl": ("chat_prompt_completion", [
        ({"prompt": [{"role": "system", "content": "You are kind."},
                     {"role": "user", "content": "What color is the sky?"},
                     {"role": "assistant", "content": "Blue."},
                     {"role": "user", "content": "And at sunset?"}],
          "completion": [{"role": "assistant", "content": "Orange and red."}]},
         T("system", "You are kind.") + T("user", "What color is the sky?") + T("assistant", "Blue.")
         + T("user", "And at sunset?") + A("Orange and red.")),
        ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hey"}]},
         T("user", "Hi") + A("Hey")),
    ]),
}


def expected(which: str, golden) -> str:
    golden = golden[which] if isinstance(golden, dict) else golden
    conversation = golden.startswith("<|im_start|>")
    if which == "smol" and conversation and not golden.startswith("<|im_start|>system\n"):
        return SMOL_SYSTEM + golden
    return golden


def test_goldens_of_the_two_tokenizers_differ_only_where_said(smol_tok, tok):
    """Sanity of the goldens' premise: SmolLM2's template is the tiny ChatML one plus a default system turn."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tiny = tok.apply_chat_template(chat, tokenize=False)
    assert tiny == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert smol_tok.apply_chat_template(chat, tokenize=False) == SMOL_SYSTEM + tiny
    system = [{"role": "system", "content": "s"}] + chat
    assert smol_tok.apply_chat_template(system, tokenize=False) == tok.apply_chat_template(system, tokenize=False)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_golden_tokens_carry_loss(tmp_path, tk, case, packing):
    which, tok, model = tk
    kind, rows = CASES[case]
    f = write_jsonl(tmp_path / f"{case}.jsonl", [r for r, _ in rows])
    config = TrainConfig(model=model, packing=packing, held_out_fraction=0.0)
    data = load_file(f, tok, config)
    assert dict(data.formats) == {kind: len(rows)}
    assert [e.line for e in data.examples] == list(range(len(rows)))
    assert data.truncated == 0 and not data.held_out
    for e, (_, golden) in zip(data.examples, rows):
        want = expected(which, golden)
        assert marked(e, tok) == want
        assert trained_text(tok, e) == bracketed(want)
        check_labels_are_ids(e)
        assert e.format == kind
    if not packing:
        assert list(data.rows) == [[i] for i in range(len(rows))]
        return
    # Packed: both examples in one row, each whole; the row's labels are the examples' own labels end to end.
    assert list(data.rows) == [list(range(len(rows)))]
    examples = [data.examples[i] for i in data.rows[0]]
    batch = collate([examples], tok.pad_token_id, "cpu")
    n = sum(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (1, n) and n <= config.max_length
    assert batch["input_ids"][0].tolist() == [t for e in examples for t in e.input_ids]
    assert batch["labels"][0].tolist() == [t for e in examples for t in e.labels]
    starts = [0]
    for e in examples[:-1]:
        starts.append(starts[-1] + len(e.input_ids))
    positions = batch["position_ids"][0].tolist()
    assert [k for k, p in enumerate(positions) if p == 0] == starts  # attention restarts at every example
    assert all(batch["labels"][0, s].item() == IGNORE for s in starts)  # no loss across an example boundary
    row = tok.decode([t for t in batch["labels"][0].tolist() if t != IGNORE])
    assert row == "".join(bracketed(expected(which, g)) for _, g in rows)


def test_every_format_in_one_file_packs_into_several_rows_without_loss_leaks(tmp_path, tk):
    which, tok, model = tk
    records = [(r, g) for _, rows in CASES.values() for r, g in rows]
    f = write_jsonl(tmp_path / "all.jsonl", [r for r, _ in records])
    unpacked = load_file(f, tok, TrainConfig(model=model, packing=False, held_out_fraction=0.0))
    lengths = [len(e.input_ids) for e in unpacked.examples]
    cap = max(lengths) + 8  # every example fits, but no row can take them all
    packed = load_file(f, tok, TrainConfig(model=model, packing=True, max_length=cap, held_out_fraction=0.0))
    assert packed.truncated == 0 and 1 < len(packed.rows) < len(records)
    assert sorted(i for r in packed.rows for i in r) == list(range(len(records)))
    for r in packed.rows:
        examples = [packed.examples[i] for i in r]
        assert sum(len(e.input_ids) for e in examples) <= cap
        labels = collate([examples], tok.pad_token_id, "cpu")["labels"][0].tolist()
        assert labels == [t for e in examples for t in e.labels]
        for i in r:  # each example whole, and trained exactly as alone
            assert packed.examples[i].input_ids == unpacked.examples[i].input_ids
            assert packed.examples[i].labels == unpacked.examples[i].labels
            assert marked(packed.examples[i], tok) == expected(which, records[i][1])


# ---------------------------------------------------------------- the one-pass span finder = the prefix fallback

ODD = ["assistant", "user", "system", "\n", "\n\n", " ", "<|im_start|>", "<|im_end|>", "<|im_end|>\n",
       "<|im_start|>assistant", "<|im_start|>assistant\n", "assistant\n", "im_start", "hello", "hello", "ok\n\n"]
GENERATION_PROMPT = "<|im_start|>assistant\n"


def conversations(seed: int, n: int = 50) -> list[dict]:
    """Seeded awkward conversations: system or not, 1-4 turns, assistant contents that are role names, newlines,
    ChatML fragments or repeats of each other and also appear in user turns (the full generation prompt too),
    empty user turns, weight-0 turns, conversations that open with the assistant.
    """
    rng, out = random.Random(seed), []
    while len(out) < n:
        messages = []
        if rng.random() < 0.15:
            messages.append({"role": "assistant", "content": rng.choice(["Hi! How can I help?", "hello", "user"])})
        elif rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(["be brief", "assistant", "hello", ""])})
        for t in range(rng.randint(1, 4)):
            answer = rng.choice(ODD + [f"answer {t}", "hello"])
            if rng.random() < 0.05:
                answer = ""  # an empty trained turn: the fast path gives up, the fallback places it
            user = rng.choice(["", "", "hi", "say hello", "assistant", "user\n", "<|im_start|>", "<|im_end|>",
                               answer, answer + answer, f"{answer} and {answer}", "hello",
                               GENERATION_PROMPT + answer, f"what does {GENERATION_PROMPT}{answer} mean?"])
            messages.append({"role": "user", "content": user})
            turn = {"role": "assistant", "content": answer}
            if rng.random() < 0.2:
                turn["weight"] = 0
            messages.append(turn)
        if rng.random() < 0.2:  # the same turn twice in a row
            messages += [dict(messages[-2]), dict(messages[-1])]
        try:
            parse_record({"messages": messages})
        except ValueError:  # every trained turn empty, or all weight 0: not trainable, not interesting
            continue
        out.append({"messages": messages})
    return out


def labels_of(renderer: Renderer, rec, full: str, spans) -> list[int]:
    encoded = renderer.tokenize(Rendered([rec], [], [], [full], [spans]))
    return [i if m else IGNORE for i, m in zip(encoded.ids.tolist(), encoded.mask.tolist())]


def test_one_pass_span_finder_equals_prefix_rendering(tk):
    which, tok, _ = tk
    renderer = Renderer(tok, 4096)
    fast_found = 0
    for obj in conversations(seed=1234):
        rec = parse_record(obj)
        messages = [_template_message(m) for m in rec.messages]
        full, spans = renderer.conversation(rec)
        fast = renderer._find_spans(full, messages, rec.train)
        slow = renderer._spans_by_prefix(full, messages, rec.train, rec.tools)
        assert spans == slow, obj
        if fast is not None:
            fast_found += 1
            assert labels_of(renderer, rec, full, fast) == labels_of(renderer, rec, full, slow), obj
            assert fast == slow, obj
        # every span is an assistant turn's content followed by the end of turn
        assert [full[a:b] for a, b in spans] == [m["content"] + "<|im_end|>\n"
                                                 for m, t in zip(messages, rec.train) if t], obj
    assert fast_found >= 40  # the property is about the fast path: most conversations take it


def test_generation_prompt_inside_a_user_turn_does_not_move_the_trained_span(tmp_path, tk):
    which, tok, model = tk
    user = "What does <|im_start|>assistant\nhello mean?"
    f = write_jsonl(tmp_path / "chatml-question.jsonl",
                    [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "hello"}]}])
    (e,) = load_file(f, tok, TrainConfig(model=model, packing=False, held_out_fraction=0.0)).examples
    # an answer is looked for only after the turns before it: not inside the question that quotes it
    assert marked(e, tok) == expected(which, T("user", user) + A("hello"))


def test_fallback_trains_only_the_content_of_a_first_assistant_turn(tmp_path, tk):
    which, tok, model = tk
    # The tool call sends the conversation to the prefix fallback; the greeting is the first message.
    f = write_jsonl(tmp_path / "greeting.jsonl", [{"messages": [
        {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "18"},
        {"role": "assistant", "content": "18 °C"}]}])
    (e,) = load_file(f, tok, TrainConfig(model=model, packing=False, held_out_fraction=0.0)).examples
    # the answer only: not its role header, not SmolLM2's default system turn before it
    assert marked(e, tok) == expected(which, A("Hi! How can I help?") + T("user", "Weather?") + A("")
                                      + T("tool", "18") + A("18 °C"))


# ---------------------------------------------------------------- tool calls

TOOL_MESSAGES = [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "18"},
                 {"role": "assistant", "content": "It is 18 °C."}]
TOOLS = [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize("template", ["own", "chatml"])
def test_a_tool_call_turn_trains_exactly_its_rendering(tmp_path, tk, template):
    which, tok, model = tk
    if template == "chatml":
        tok = copy.deepcopy(tok)
        apply_chat_template_option(tok, "chatml")
        assert tok.chat_template == CHATML
    f = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_MESSAGES, "tools": TOOLS}])
    data = load_file(f, tok, TrainConfig(model=model, packing=False, held_out_fraction=0.0))
    (e,) = data.examples
    # A template that drops tool calls is said out loud: the turn would teach an empty answer.
    assert bool(data.warnings) == (template != "chatml")
    assert all("tool calls that the chat template does not render" in w for w in data.warnings)
    call_turn, answer = trained_runs(tok, e)
    # The turn as the template renders it, independently: what one more message adds after the generation prompt.
    as_template_wants = [m if not m.get("tool_calls") else
                         {**m, "content": "", "tool_calls": [{**CALL, "function": {"name": "get_weather",
                                                                                   "arguments": {"city": "Paris"}}}]}
                         for m in TOOL_MESSAGES]
    before = tok.apply_chat_template(as_template_wants[:1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    upto = tok.apply_chat_template(as_template_wants[:2], tools=TOOLS, tokenize=False)
    assert upto.startswith(before)
    assert call_turn == upto[len(before):]
    if template == "chatml":
        assert call_turn == CHATML_CALL + "<|im_end|>\n"
        tools_turn = ("<|im_start|>system\nYou can call these tools:\n<tools>\n"
                      + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools><|im_end|>\n")
        assert marked(e, tok) == (tools_turn + T("user", "Weather in Paris?") + A(CHATML_CALL) + T("tool", "18")
                                  + A("It is 18 °C."))
    else:  # SmolLM2's and the tiny template drop tool calls (and tools): the call turn trains an empty answer
        assert call_turn == "<|im_end|>\n"
        assert "get_weather" not in tok.decode(e.input_ids)
    assert answer == "It is 18 °C.<|im_end|>\n"


# ---------------------------------------------------------------- --chat-template

@pytest.fixture(scope="module")
def bare_model(tiny_model, tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template (a base model)."""
    d = tmp_path_factory.mktemp("bare-model")
    for p in tiny_model.iterdir():
        if p.is_file() and not p.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(p, d / p.name)
    tok = make_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(d)
    assert load_tokenizer(str(d)).chat_template is None
    return d


CHAT_ROWS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(4)]


def test_no_chat_template_fails_a_conversation_file_once_naming_the_option(tmp_path, bare_model):
    tok = load_tokenizer(str(bare_model))
    cfg = TrainConfig(model=str(bare_model), packing=False, held_out_fraction=0.0)
    f = write_jsonl(tmp_path / "chat.jsonl", [{"text": "A plain text"}] + CHAT_ROWS)
    with pytest.raises(DataError) as err:
        load_file(f, tok, cfg)
    assert len(err.value.problems) == 1  # one problem, not one per conversation
    (problem,) = err.value.problems
    assert problem.startswith("line 2 is a conversation") and "--chat-template chatml" in problem
    # the tokenizer object alone does the same (no model folder involved)
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError) as err:
        load_file(f, bare, cfg)
    assert len(err.value.problems) == 1 and "--chat-template" in err.value.problems[0]
    # text still works
    text = load_file(write_jsonl(tmp_path / "text.jsonl", [{"text": "A plain text"}]), tok, cfg)
    assert [marked(e, tok) for e in text.examples] == [f"A{OPEN} plain text<|im_end|>{CLOSE}"]


def test_chat_template_option_chatml_and_jinja_file(tmp_path, bare_model):
    cfg = TrainConfig(model=str(bare_model), packing=False, held_out_fraction=0.0)
    f = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    tok = load_tokenizer(str(bare_model), "chatml")
    assert tok.chat_template == CHATML
    data = load_file(f, tok, cfg)
    assert [marked(e, tok) for e in data.examples] == [T("user", f"hi {i}") + A(f"hello {i}") for i in range(4)]

    jinja = tmp_path / "plain.jinja"  # a template unlike ChatML, to see that it is the one used
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = load_tokenizer(str(bare_model), str(jinja))
    data = load_file(f, tok, cfg)
    assert [marked(e, tok) for e in data.examples] == [f"user: hi {i}\nassistant: {OPEN}hello {i}\n{CLOSE}"
                                                       for i in range(4)]
    tok = make_tokenizer()
    apply_chat_template_option(tok, "")  # empty: the model's own template stays
    assert tok.chat_template and tok.chat_template != CHATML
    with pytest.raises(ConfigError, match="no such file"):
        apply_chat_template_option(tok, str(tmp_path / "missing.jinja"))


def test_cli_train_with_chat_template_saves_it_and_a_change_is_refused(tmp_path, bare_model, capsys):
    from transformers import AutoTokenizer

    out, f = tmp_path / "run", write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    common = ("--output-dir", out, "--batch-size", 4)
    assert cli("train", "--dataset", f, *common, "--model", bare_model) == 2  # no template: refused up front
    assert "--chat-template" in capsys.readouterr().err
    assert checkpoint.newest_complete(out) is None
    assert cli("train", "--dataset", f, *common, "--model", bare_model, "--chat-template", "chatml") == 0
    first = checkpoint.newest_complete(out)
    assert first.step == 1 and (first.path / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(first.path).chat_template == CHATML
    assert json.loads((first.path / "evertrain_config.json").read_text())["chat_template"] == "chatml"
    capsys.readouterr()

    jinja = tmp_path / "other.jinja"
    jinja.write_text(CHATML)  # even the same text under another name: the option is part of the run's identity
    g = write_jsonl(tmp_path / "more.jsonl", CHAT_ROWS[:2])
    assert cli("train", "--dataset", g, *common, "--chat-template", jinja) == 2
    err = capsys.readouterr().err
    assert "chat_template: run has 'chatml'" in err and "new output folder" in err
    assert checkpoint.newest_complete(out).step == 1
    # without the option, the run's own template carries on
    assert cli("train", "--dataset", g, *common) == 0
    assert checkpoint.newest_complete(out).step == 2
    assert AutoTokenizer.from_pretrained(checkpoint.newest_complete(out).path).chat_template == CHATML


# ---------------------------------------------------------------- evertrain check

def test_check_prints_the_summary_and_the_first_example_marked(tmp_path, tiny_model, capsys):
    f = write_jsonl(tmp_path / "msgs.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "A plain text"}])
    assert cli("check", f, "--model", tiny_model) == 0
    out = capsys.readouterr().out
    # 28 + 13 tokens (byte-level: "user\nhi", "assistant\nhello", 2 newlines and 4 special tokens; 12 bytes + EOS)
    summary, rest = out.split("\n", 1)
    assert summary.startswith("msgs.jsonl: 2 examples (messages 1, text 1), 41 tokens")
    assert summary.endswith(", 0 truncated to 1024, 0 held out, 1 rows")
    assert rest == (f"\nline 1 (messages), trained tokens between {OPEN} and {CLOSE}:\n"
                    f"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{OPEN}hello<|im_end|>\n{CLOSE}\n")
    assert cli("check", f, "--model", tiny_model, "--examples", 2) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"\nline 2 (text), trained tokens between {OPEN} and {CLOSE}:\n"
                        f"A{OPEN} plain text<|im_end|>{CLOSE}\n")


def test_check_a_bad_file_exits_2_naming_the_line(tmp_path, tiny_model, bare_model, capsys):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"messages": [{"role": "user", "content": "hi"}]}])
    assert cli("check", f, "--model", tiny_model) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bad.jsonl" in captured.err and "line 2: no assistant turn" in captured.err
    # a conversation and a model without a template: the option is named; with it, the file checks
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:1])
    assert cli("check", chat, "--model", bare_model) == 2
    assert "--chat-template" in capsys.readouterr().err
    assert cli("check", chat, "--model", bare_model, "--chat-template", "chatml") == 0
    assert capsys.readouterr().out.endswith(T("user", "hi 0") + A("hello 0") + "\n")


# ---------------------------------------------------------------- poison: tokenization sees a bounded prefix

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
