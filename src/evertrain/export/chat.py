"""`evertrain chat`: talk to a checkpoint (or the base model) through its chat template, tokens as they come.

    evertrain chat runs/main                          # the newest complete checkpoint, interactive
    evertrain chat runs/main --compare base           # every prompt answered by the base model too
    evertrain chat /srv/ws --step 120 --prompt "Capital of Veltrana?"   # one answer, then exit (scripts)

In the chat: /reset (forget the conversation), /step N (talk to checkpoint N; `/step base`), /set NAME VALUE
(temperature, top_p, max_new_tokens, repetition_penalty), /settings, /quit. The dashboard's "Ask the model"
box uses the same `Speaker` and `stream`. Only complete checkpoints are read: it runs beside a training daemon.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from evertrain.export import ExportError, Source, open_source

BASE = "base"


@dataclass
class Settings:
    """Generation settings; temperature 0 is greedy (the same answer every time)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0

    LIMITS = {"temperature": (0.0, 5.0), "top_p": (0.01, 1.0), "max_new_tokens": (1, 4096),
              "repetition_penalty": (0.5, 3.0)}

    def set(self, name: str, value: str) -> None:
        f = next((f for f in fields(self) if f.name == name), None)
        if f is None:
            raise ValueError(f"no setting {name!r}; the settings are {', '.join(x.name for x in fields(self))}")
        kind = int if f.type in (int, "int") else float
        try:
            v = kind(value)
        except ValueError:
            raise ValueError(f"{name} takes a number, not {value!r}") from None
        low, high = self.LIMITS[name]
        if not low <= v <= high:
            raise ValueError(f"{name} must be between {low} and {high}")
        setattr(self, name, v)

    def describe(self) -> str:
        greedy = " (greedy)" if self.temperature == 0 else ""
        return (f"temperature {self.temperature:g}{greedy}, top_p {self.top_p:g}, max_new_tokens "
                f"{self.max_new_tokens}, repetition_penalty {self.repetition_penalty:g}")

    def generate_kwargs(self) -> dict:
        sample = self.temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
                "repetition_penalty": self.repetition_penalty,
                **({"temperature": self.temperature, "top_p": self.top_p} if sample else {})}


@dataclass
class Speaker:
    """A model to talk to: a complete checkpoint of the run, or the run's base model."""

    label: str           # "checkpoint-12 (step 12)" or "base (HuggingFaceTB/SmolLM2-135M-Instruct)"
    step: int | None     # None: the base model
    model: object
    tokenizer: object


def speaker(root: Path, which: int | str | None = None) -> Speaker:
    """`which`: a global step, None for the newest complete checkpoint, or "base"."""
    from evertrain import models
    from evertrain.export import hub_id
    from evertrain.export.export import load_model, load_tokenizer

    if which == BASE:
        config, tokenizer = base_settings(root)
        model = models.load_model(models.resolve_model(config.model), config.dtype)
        model.eval()
        return Speaker(f"base ({hub_id(config) or config.model})", None, model, tokenizer)
    source: Source = open_source(root, which)
    return Speaker(f"{source.ckpt.name} (step {source.step})", source.step, load_model(source),
                   load_tokenizer(source))


def base_settings(root: Path):
    """The run's settings and tokenizer (its chat template): from its newest checkpoint, or, for a workspace
    that has trained nothing yet, from its evertrain.toml."""
    from evertrain import models
    from evertrain.export.export import load_tokenizer
    from evertrain.runs import CONFIG_FILE, open_run
    from evertrain.train import checkpoint

    run = open_run(root)
    config_file = Path(root) / CONFIG_FILE
    if checkpoint.newest_complete(run.run_dir, warn=lambda _text: None) is None and config_file.is_file():
        from evertrain.config import TrainConfig
        from evertrain.daemon.workspace import read_settings

        train, _daemon = read_settings(config_file)
        config = TrainConfig.from_dict(train, source=f"{config_file} [train]")
        return config, models.load_tokenizer(config.model, config.chat_template)
    source = open_source(root)
    return source.config, load_tokenizer(source)


def parse_which(text: str) -> int | str:
    if text == BASE:
        return BASE
    if not (text.isascii() and text.isdigit()):
        raise ExportError(f"a checkpoint is a global step number or 'base', not {text!r}")
    return int(text)


class Cancelled:
    """A stopping criterion: generation ends at the next token once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def prompt_ids(tokenizer, messages: list[dict]):
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    # A base model without a template (trained on text): continue the conversation's text.
    return tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")


def stream(who: Speaker, messages: list[dict], settings: Settings,
           cancel: threading.Event | None = None) -> Iterator[str]:
    """The answer to `messages`, piece by piece as the model generates it."""
    return iter(Generation(who.model, who.tokenizer, prompt_ids(who.tokenizer, messages), settings.generate_kwargs(),
                           cancel))


class Generation:
    """One answer generated in a thread of its own (transformers' `generate`), read piece by piece as text;
    once read to its end, its token counts and why it ended. `cancel` set: it ends at the next token.
    `kwargs` go to `generate` (max_new_tokens, sampling, a LoRA version's adapter_names, ...)."""

    def __init__(self, model, tokenizer, inputs: dict, kwargs: dict, cancel: threading.Event | None = None):
        self.model, self.tokenizer, self.inputs, self.kwargs = model, tokenizer, inputs, kwargs
        self.cancel = cancel
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.completion_ids: list[int] = []

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)

    def ended_by_eos(self) -> bool:
        """Whether the model itself ended the answer (an end-of-sequence token), not a limit or a cancel."""
        ends = self.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [ends]) | {self.tokenizer.eos_token_id}
        return bool(self.completion_ids) and self.completion_ids[-1] in ends

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        generation = self

        class Streamer(TextIteratorStreamer):
            def put(self, value):  # the prompt first (skipped), then each new token: counted here
                if not self.next_tokens_are_prompt:
                    generation.completion_ids.extend(value.reshape(-1).tolist())
                super().put(value)

        streamer = Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(self.kwargs)
        stop = StoppingCriteriaList([*kwargs.pop("stopping_criteria", []),
                                     *([Cancelled(self.cancel)] if self.cancel is not None else [])])
        failed: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**self.inputs, **kwargs, streamer=streamer, stopping_criteria=stop,
                                        pad_token_id=self.tokenizer.pad_token_id)
            except BaseException as e:  # handed to the reader: a thread's exception would otherwise vanish
                failed.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failed:
            raise failed[0]


# ------------------------------------------------------------------------------------------------- the terminal

HELP = ("/reset forgets the conversation, /step N (or /step base) talks to another checkpoint, "
        "/set NAME VALUE changes a setting, /settings shows them, /quit leaves")


class Chat:
    def __init__(self, root: Path, which, compare, settings: Settings, out=None):
        self.root, self.settings, self.out = root, settings, out or sys.stdout
        self.speakers = [speaker(root, which)] + ([speaker(root, compare)] if compare is not None else [])
        self.histories: list[list[dict]] = [[] for _ in self.speakers]

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def introduce(self) -> None:
        for s in self.speakers:
            self.say(f"evertrain: talking to {s.label} of {self.root}")
        self.say(f"evertrain: {self.settings.describe()}")

    def answer(self, text: str) -> None:
        """Each speaker answers, in turn, streamed; each keeps its own side of the conversation."""
        for s, history in zip(self.speakers, self.histories):
            history.append({"role": "user", "content": text})
            if len(self.speakers) > 1:
                self.say(f"[{s.label}]")
            reply = []
            for piece in stream(s, history, self.settings):
                reply.append(piece)
                self.say(piece, end="")
            self.say()
            history.append({"role": "assistant", "content": "".join(reply)})

    def command(self, line: str) -> bool:
        """A /command; False when it is /quit."""
        name, _, rest = line[1:].partition(" ")
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.histories = [[] for _ in self.speakers]
            self.say("evertrain: conversation forgotten")
        elif name == "step":
            try:
                self.speakers[0] = speaker(self.root, parse_which(rest.strip()))
            except ExportError as e:
                self.say(f"evertrain: {e}")
            else:
                self.say(f"evertrain: now talking to {self.speakers[0].label} (the conversation goes on)")
        elif name == "set":
            key, _, value = rest.strip().partition(" ")
            try:
                self.settings.set(key, value.strip())
                self.say(f"evertrain: {self.settings.describe()}")
            except ValueError as e:
                self.say(f"evertrain: {e}")
        elif name == "settings":
            self.say(f"evertrain: {self.settings.describe()}")
        else:
            self.say(f"evertrain: unknown command /{name}; {HELP}")
        return True

    def loop(self, read=input) -> None:
        self.say(f"evertrain: {HELP}")
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                self.say()
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.answer(line)
