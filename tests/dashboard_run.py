"""Real runs for the dashboard tests, built once per session in pytest's base temp folder (both dashboard test
modules share them): two files trained by the real `evertrain train` into an output folder, and the same two
files dropped into a daemon workspace and trained by the real `evertrain run`. Then the dashboard served in this
process, and the page as headless chromium leaves it (`--dump-dom`, read into a Tree)."""

from __future__ import annotations

import json
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

from conftest import cli, write_jsonl

FILES = {"capitals.jsonl": [("The capital of France is", " Paris."), ("The capital of Spain is", " Madrid."),
                            ("The capital of Italy is", " Rome."), ("The capital of Japan is", " Tokyo."),
                            ("The capital of Peru is", " Lima."), ("The capital of Chile is", " Santiago.")],
         "colours.jsonl": [("The sky is", " blue."), ("Grass is", " green."), ("Snow is", " white."),
                           ("Coal is", " black."), ("Blood is", " red."), ("A lemon is", " yellow.")]}
PROBE = ("The capital of Peru is", " Lima.")
TOKEN = "s3cret-token-for-tests"  # a token good enough for the dashboard off loopback
REPEAT = 3  # each pair several times (distinct lines): enough examples for a held-out slice and some steps


def COMMON(tiny_model: Path) -> tuple:  # noqa: N802  (the settings both runs share)
    # Snapshots may cost what they like here: the tiny model trains so fast that the default budget of 3%
    # would leave too few of them to look at.
    return ("--model", tiny_model, "--batch-size", 4, "--no-packing", "--learning-rate", 3e-3,
            "--warmup-steps", 2, "--held-out-fraction", 0.2, "--save-steps", 4, "--keep-checkpoints", 3,
            "--snapshot-budget", 100, "--snapshot-per-file", 2, "--snapshot-new-tokens", 6)


def trained_run(tmp_path_factory, tiny_model: Path) -> Path:
    root = tmp_path_factory.getbasetemp() / "dashboard-run"
    run = root / "run"
    if (root / ".trained").exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    write_jsonl(run / "probes.jsonl", [{"prompt": PROBE[0], "completion": PROBE[1]}])
    for name, pairs in FILES.items():
        rows = [{"prompt": f"{p} ({i})", "completion": c} for i in range(REPEAT) for p, c in pairs]
        f = write_jsonl(root / name, rows)
        assert cli("train", "--dataset", f, "--output-dir", run, *COMMON(tiny_model)) == 0
    (root / ".trained").touch()
    return run


def trained_workspace(tmp_path_factory, tiny_model: Path) -> Path:
    """A daemon workspace (`evertrain init`, files dropped into inbox/, `evertrain run --once`)."""
    root = tmp_path_factory.getbasetemp() / "dashboard-workspace"
    ws = root / "ws"
    if (root / ".trained").exists():
        return ws
    assert cli("init", ws, *COMMON(tiny_model), "--stable-seconds", 0, "--no-watch") == 0
    write_jsonl(ws / "probes.jsonl", [{"prompt": PROBE[0], "completion": PROBE[1]}])
    for name, pairs in FILES.items():  # one after the other: the queue is first come, first served
        rows = [{"prompt": f"{p} ({i})", "completion": c} for i in range(REPEAT) for p, c in pairs]
        staged = write_jsonl(root / name, rows)
        staged.rename(ws / "inbox" / name)  # the documented safe way: write elsewhere, then move in
        assert cli("run", ws, "--once") == 0
    (root / ".trained").touch()
    return ws


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Serving:
    """A web Listener (the real uvicorn server) answering from a thread of this process."""

    def __init__(self, listener):
        self.server = listener
        self.port = listener.port
        self.thread = threading.Thread(target=listener.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.close()


class Served(Serving):
    """The dashboard of the run in `root`, on a port the OS chose."""

    def __init__(self, root: Path, host: str = "127.0.0.1", token: str | None = None):
        from evertrain.dashboard.server import make_server

        super().__init__(make_server(root, host, 0, token))


def chromium(browser: str, profile: Path, url: str, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children, self.parts = tag, attrs, [], []

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def find(self, **attrs) -> "Node":
        found = self.find_all(**attrs)
        assert found, f"no element with {attrs}"
        return found[0]

    def find_all(self, tag: str | None = None, **attrs) -> list["Node"]:
        attrs = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}  # class_ -> class, data_x -> data-x
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k) == v or (k == "class" and v in (n.attrs.get("class") or "").split())
                        for k, v in attrs.items())]


class Tree(HTMLParser):
    """The dumped DOM as a tree: enough to ask for an element's attributes and its text."""

    VOID = {"meta", "link", "input", "br", "img", "hr", "col", "source", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        self.stack[-1].parts.append(data)
