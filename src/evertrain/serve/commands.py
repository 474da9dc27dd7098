"""The `serve` subcommand of `evertrain` (cli.py adds it with `add_commands`).

    evertrain serve WS                                   # http://127.0.0.1:8000/v1, loopback only, no token
    evertrain serve WS --host 0.0.0.0                    # off loopback: a token is made and printed
    evertrain serve WS --collect-feedback --release      # feedback into the inbox; each accepted model exported
    evertrain serve WS --release --release-gguf          # each accepted model in WS/releases/latest (release.py)
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from evertrain import exits


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible API on the run's newest accepted model, followed as it "
                                     "trains")
    p.add_argument("dir", type=Path, help="a workspace or the --output-dir of `evertrain train`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; off loopback a token is required")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--token", help="the API key clients must send (Authorization: Bearer), 16 characters or more "
                                   "(default off loopback: a random one, printed)")
    p.add_argument("--name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--follow", choices=("accepted", "checkpoints"), default="accepted",
                   help="accepted: the checkpoint at the end of the newest file that passed the forgetting gate "
                        "(default); checkpoints: every complete checkpoint")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for a newer model")
    p.add_argument("--concurrency", type=int, default=1, help="answers generated at once (default: 1)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait; past it: 429 (default: 16)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens an answer may have (default: 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="most tokens a prompt may have")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds an answer may take to generate")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    f = p.add_argument_group("feedback (docs/serve.md: Feedback becomes training data)")
    f.add_argument("--collect-feedback", action="store_true",
                   help="keep every answer and take ratings and corrections on POST /v1/feedback; they become "
                        "files in the workspace's inbox/, trained by `evertrain run` (a workspace only)")
    f.add_argument("--feedback-every", type=int, default=50,
                   help="records (ratings and corrections) that make a file in the inbox (default: 50)")
    f.add_argument("--feedback-minutes", type=float, default=60.0,
                   help="the longest a record waits for its file, in minutes (default: 60)")
    f.add_argument("--feedback-max-mb", type=float, default=100.0,
                   help="the feedback log's size, in MiB: past it the oldest answers go (default: 100)")
    f.add_argument("--feedback-max-answers", type=int, default=100_000,
                   help="answers the feedback log keeps: past it the oldest go (default: 100000)")
    add_release_options(p)
    p.set_defaults(func=cmd_serve)


def add_release_options(p) -> None:
    from evertrain.export.gguf import QUANTS

    g = p.add_argument_group("releases for other servers (docs/serve.md)")
    g.add_argument("--release", action="store_true",
                   help="export each accepted model (as `evertrain export` does) to DIR/releases/step-N, with "
                        "DIR/releases/latest pointing at the newest, and tell notify_command")
    g.add_argument("--release-merge", action="store_true",
                   help="LoRA run: release the adapter merged into its base (a whole model) instead of the adapter")
    g.add_argument("--release-gguf", action="store_true", help="also write model-QUANT.gguf (Llama architecture)")
    g.add_argument("--release-quant", choices=QUANTS, help="GGUF tensor type (default: f16)")
    g.add_argument("--release-keep", type=int,
                   help="releases kept (default: 3); the one `latest` names is never deleted")
    g.add_argument("--release-base-id", help="LoRA adapter releases: the base model's hub id (needed when the run's "
                                             "base is a local folder)")
    g.add_argument("--notify-command", help="shell command run with one JSON event on stdin for each release "
                                            "(default: the workspace's [daemon] notify_command)")


def release_settings(args):
    """The ReleaseSettings the options ask for (None: no --release); ValueError names an option given alone."""
    from evertrain.serve.release import ReleaseSettings

    given = [name for name in ("release_merge", "release_gguf", "release_quant", "release_keep", "release_base_id",
                               "notify_command") if getattr(args, name) not in (None, False)]
    if not args.release:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --release")
        return None
    if args.release_keep is not None and args.release_keep < 1:
        raise ValueError("--release-keep must be at least 1")
    return ReleaseSettings(merge=args.release_merge, gguf=args.release_gguf, quant=args.release_quant or "f16",
                           keep=3 if args.release_keep is None else args.release_keep,
                           base_id=args.release_base_id, notify_command=args.notify_command,
                           command=shlex.join(["evertrain", *args.argv]))


def cmd_serve(args) -> int:
    from evertrain.locks import AlreadyRunning
    from evertrain.serve.feedback import FeedbackRefused
    from evertrain.serve.server import ServeSettings, serve
    from evertrain.web.access import TokenRefused

    if not args.dir.is_dir():
        print(f"evertrain: {args.dir}: no such folder", file=sys.stderr)
        return exits.BAD_INPUT
    for name, low in (("concurrency", 1), ("queue", 1), ("max_tokens", 1), ("max_prompt_tokens", 1),
                      ("feedback_every", 1), ("feedback_max_answers", 1)):
        if getattr(args, name) < low:
            print(f"evertrain: serve: --{name.replace('_', '-')} must be at least {low}", file=sys.stderr)
            return exits.BAD_INPUT
    if min(args.timeout, args.poll_seconds, args.feedback_minutes, args.feedback_max_mb) <= 0:
        print("evertrain: serve: --timeout, --poll-seconds, --feedback-minutes and --feedback-max-mb must be above "
              "0", file=sys.stderr)
        return exits.BAD_INPUT
    try:
        release = release_settings(args)
    except ValueError as e:
        print(f"evertrain: serve: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    settings = ServeSettings(root=args.dir, host=args.host, port=args.port, token=args.token,
                             name=args.name or args.dir.resolve().name, follow=args.follow,
                             poll_seconds=args.poll_seconds, concurrency=args.concurrency, queue=args.queue,
                             max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                             timeout=args.timeout, threads=args.threads, release=release,
                             collect_feedback=args.collect_feedback,
                             feedback_every=args.feedback_every, feedback_minutes=args.feedback_minutes,
                             feedback_max_bytes=int(args.feedback_max_mb * 2**20),
                             feedback_max_answers=args.feedback_max_answers)
    logging.getLogger("evertrain.serve").setLevel(logging.INFO)
    try:
        return serve(settings)
    except (TokenRefused, FeedbackRefused, AlreadyRunning) as e:
        print(f"evertrain: serve: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except OSError as e:
        print(f"evertrain: serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return exits.FAILED
