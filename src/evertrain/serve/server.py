"""`evertrain serve`: the pieces put together, in the order they start.

    evertrain serve WS --port 8000
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
               print(c.chat.completions.create(model='ws', messages=[{'role': 'user', 'content': 'Hi'}]))"

1. the access rules (a weak --token refuses to start, before anything listens);
2. the model to serve now (versions.find_target), loaded;
3. the follower thread, which swaps to each newer accepted model;
4. the generation workers (engine.py) and the API (api.py), on the shared HTTP listener (web/listener.py);
5. with --release, the releaser thread (release.py), told of every swap, which exports each accepted model.
With --collect-feedback, before all of them: the feedback log (feedback.py; a folder that is no workspace is
refused before any model loads).
The server only reads the run: it never holds the run's lock, so it runs beside the daemon and outlives its
restarts (a restart only means no new checkpoint for a while).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from evertrain.serve.api import Limits, build_app
from evertrain.serve.engine import Engine
from evertrain.serve.feedback import Log
from evertrain.serve.release import Releaser, ReleaseSettings
from evertrain.serve.versions import ACCEPTED, Follower, Versions, find_target
from evertrain.web.access import Access
from evertrain.web.listener import Listener, room_for_connections

log = logging.getLogger("evertrain.serve")


@dataclass
class ServeSettings:
    root: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    name: str = "evertrain"
    follow: str = ACCEPTED
    poll_seconds: float = 2.0
    concurrency: int = 1
    queue: int = 16
    max_tokens: int = 512
    max_prompt_tokens: int = 4096
    timeout: float = 120.0
    threads: int | None = None
    release: ReleaseSettings | None = None   # None: no releases
    collect_feedback: bool = False
    feedback_every: int = 50             # records that make a file in the inbox
    feedback_minutes: float = 60.0       # the longest a record waits for its file
    feedback_max_bytes: int = 100 << 20
    feedback_max_answers: int = 100_000


class ModelServer(Listener):
    """Listening from construction on (port 0: one the OS chose); `serve_forever` answers."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.access = Access.for_binding(settings.host, settings.token)
        self.feedback = self.releaser = None
        try:
            # Before the model loads: a folder that cannot collect feedback, a release that could never succeed,
            # are refused at once.
            if settings.collect_feedback:
                self.feedback = Log(settings.root, every=settings.feedback_every, minutes=settings.feedback_minutes,
                                    max_bytes=settings.feedback_max_bytes, max_answers=settings.feedback_max_answers)
            self.releaser = Releaser(settings.root, settings.release) if settings.release else None
            self.versions = Versions(settings.root)
            first = self.versions.load(find_target(settings.root, settings.follow))
            self.versions.install(first)
            self.follower = Follower(self.versions, settings.follow, settings.poll_seconds, on_swap=self.swapped)
            self.engine = Engine(self.versions, concurrency=settings.concurrency, queue_size=settings.queue,
                                 threads=settings.threads)
            limits = Limits(settings.max_tokens, settings.max_prompt_tokens, settings.timeout)
            super().__init__(build_app(settings.name, self.versions, self.engine, self.access, limits,
                                       self.feedback), settings.host, settings.port)
        except BaseException:
            if self.releaser is not None:
                self.releaser.close()  # its lock, for the next try
            if self.feedback is not None:  # its lock and thread go with it: a second try may collect
                self.feedback.close()
            raise
        if self.releaser is not None:
            self.releaser.start()
            self.releaser.offer()  # the model served now, unless it is released already
        self.follower.start()

    def swapped(self, version) -> None:
        print(f"evertrain: serving {version.label} ({version.target.checkpoint or 'the base model'}, loaded in "
              f"{version.load_seconds:.1f} s)", flush=True)
        if self.releaser is not None:
            self.releaser.offer()

    @property
    def url(self) -> str:
        host = self.socket.getsockname()[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    def close(self) -> None:
        self.follower.stop.set()
        self.follower.wake.set()
        super().close()
        if self.releaser is not None:
            self.releaser.close()
        if self.feedback is not None:
            self.feedback.close()


def serve(settings: ServeSettings) -> int:
    server = ModelServer(settings)
    room_for_connections()
    v = server.versions.current
    print(f"evertrain: serving {settings.name!r} ({v.label}, {v.target.checkpoint or 'the base model'}) of "
          f"{Path(settings.root).resolve()} at {server.url}", flush=True)
    if server.releaser is not None:
        print(f"evertrain: releasing each accepted model to {server.releaser.folder} (the newest: "
              f"{server.releaser.folder / 'latest'})", flush=True)
    if server.feedback is not None:
        print(f"evertrain: collecting feedback (POST /v1/feedback) into {server.feedback.ws.inbox}: a file every "
              f"{settings.feedback_every} records or {settings.feedback_minutes:g} minutes", flush=True)
    if server.access.token:
        print(f"evertrain: clients must send this API key (Authorization: Bearer; the OpenAI client's api_key): "
              f"{server.access.token}", flush=True)
    server.serve_until_stopped()
    return 0
