"""Shared pieces of the `evertrain serve` tests: the real model server in a thread, an OpenAI client on it."""

from __future__ import annotations

import threading
from pathlib import Path

from dashboard_run import Serving


class ServedModel(Serving):
    """`evertrain serve ROOT` (serve.server.ModelServer, the real uvicorn server) answering from a thread of this
    process, on a port the OS chose; it looks for a newer model every `poll_seconds`."""

    def __init__(self, root: Path, **settings):
        from evertrain.serve.server import ModelServer, ServeSettings

        settings = {"port": 0, "poll_seconds": 0.1, "name": "ws", **settings}
        super().__init__(ModelServer(ServeSettings(root=Path(root), **settings)))
        self.url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def versions(self):
        return self.server.versions

    def client(self, api_key: str = "-", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, **kwargs)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.server.follower.stop.set()


def ask(client, question: str, *, model: str = "ws", max_tokens: int = 24, **kwargs):
    """One greedy chat answer (the whole response object)."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=max_tokens, **kwargs)


class Asking:
    """`clients` threads asking `question` again and again, from start() until stop(): the model version of each
    answer in `seen`, each failure in `failures` (every one a finding)."""

    def __init__(self, client, question: str, clients: int = 1):
        self.client, self.question = client, question
        self.seen: list[str] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._ask) for _ in range(clients)]

    def _ask(self) -> None:
        while not self.stopping.is_set():
            try:
                self.seen.append(ask(self.client, self.question).model)
            except Exception as e:  # noqa: BLE001
                self.failures.append(repr(e))

    def start(self) -> "Asking":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
