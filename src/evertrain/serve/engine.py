"""Generating answers for the server: a bounded queue in front of a few worker threads.

    evertrain serve WS --concurrency 1 --queue 16 --max-tokens 512 --timeout 120

`concurrency` generations run at once (threads; one is the default: on one GPU, answers generated side by side
take as long in all as one after the other); `queue` more wait; past that a request is refused at once (the API
answers 429 with Retry-After). Each generation takes the model version current when it starts and keeps it to
its end (versions.py), so a swap never changes the weights under an answer. An answer ends at the model's
end-of-sequence token, at a stop string (not included in the answer, as OpenAI does), at its max_tokens, when
its time runs out (`timeout`), or when its client goes away (the `cancel` event: at the next token).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evertrain.serve.versions import Version, Versions

log = logging.getLogger("evertrain.serve")


@dataclass
class Ask:
    """One request's generation: what to answer and how, and where its events go (called from a worker thread)."""

    messages: list[dict] | None          # a chat (None: a plain `prompt`, for base models)
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    emit: Callable[[dict], None]
    timeout: float
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)


class Engine:
    """The worker threads and their queue."""

    def __init__(self, versions: Versions, *, concurrency: int = 1, queue_size: int = 16, threads: int | None = None):
        self.versions = versions
        self.waiting: queue.Queue[Ask] = queue.Queue(queue_size)
        self.workers = [threading.Thread(target=self.work, name=f"evertrain-serve-{i}", daemon=True)
                        for i in range(concurrency)]
        self.threads = threads
        self.active = 0
        self.lock = threading.Lock()
        self.sampling = threading.Lock()  # a seed is torch's one global generator: seeded answers one at a time
        for w in self.workers:
            w.start()

    def submit(self, ask: Ask) -> bool:
        """False when the queue is full (the caller answers 429)."""
        try:
            self.waiting.put_nowait(ask)
        except queue.Full:
            return False
        return True

    def work(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            ask = self.waiting.get()
            if ask.cancel.is_set():  # its client left while it waited
                ask.emit({"type": "end", "reason": "cancelled"})
                continue
            version = self.versions.acquire()
            with self.lock:
                self.active += 1
            try:
                answer(version, ask, self.sampling)
            except Exception as e:  # noqa: BLE001 - one request's failure, said to it; the server goes on
                log.exception("serve: generating an answer failed")
                ask.emit({"type": "error", "message": f"generation failed: {type(e).__name__}"})
            finally:
                with self.lock:
                    self.active -= 1
                self.versions.release(version)


def answer(version: Version, ask: Ask, sampling: threading.Lock) -> None:
    """Generate `ask`'s answer with `version`, emitting {"type": "start"}, {"type": "text"}..., then
    {"type": "end", "reason": "stop" | "length", "prompt_tokens": N, "completion_tokens": M}."""
    from transformers import MaxTimeCriteria, StoppingCriteriaList

    from evertrain.export.chat import Generation, prompt_ids

    tokenizer = version.tokenizer
    if ask.messages is not None:
        inputs = prompt_ids(tokenizer, ask.messages)
    else:
        inputs = tokenizer(ask.prompt, return_tensors="pt")
    inputs = {k: v.to(version.model.device) for k, v in inputs.items()}
    sample = ask.temperature > 0
    kwargs = {"max_new_tokens": ask.max_tokens, "do_sample": sample, **version.generate_kwargs(),
              "stopping_criteria": StoppingCriteriaList([MaxTimeCriteria(ask.timeout)]),
              **({"temperature": ask.temperature, "top_p": ask.top_p} if sample else {})}
    generation = Generation(version.model, tokenizer, inputs, kwargs, ask.cancel)
    ask.emit({"type": "start", "version": version, "prompt_tokens": generation.prompt_tokens})
    held = threading.Lock() if not (sample and ask.seed is not None) else sampling
    with held:
        if sample and ask.seed is not None:
            import torch

            torch.manual_seed(ask.seed)
        stopped = _stream(generation, ask)
    reason = "stop" if stopped or generation.ended_by_eos() else "length"
    ask.emit({"type": "end", "reason": reason, "prompt_tokens": generation.prompt_tokens,
              "completion_tokens": generation.completion_tokens})


def _stream(generation, ask: Ask) -> bool:
    """Emit the answer's text as it comes, holding back what could be the start of a stop string; True when a
    stop string ended it (its text, and what follows, are not emitted)."""
    text, sent = "", 0
    for piece in generation:
        text += piece
        cut = min((i for i in (text.find(s, max(sent - len(s), 0)) for s in ask.stop) if i >= 0), default=-1)
        if cut >= 0:
            if cut > sent:
                ask.emit({"type": "text", "text": text[sent:cut]})
            ask.cancel.set()  # the model stops at its next token
            return True
        safe = len(text) - _open_prefix(text, ask.stop)
        if safe > sent:
            ask.emit({"type": "text", "text": text[sent:safe]})
            sent = safe
    if len(text) > sent:
        ask.emit({"type": "text", "text": text[sent:]})
    return False


def _open_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string (to hold back for now)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
