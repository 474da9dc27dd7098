"""The daemon's subcommands of `evertrain` (cli.py adds them with `add_commands`): make a workspace, run it, and
steer it from outside (pause, stop, skip, pin, add a file, look at its status, repair its ledger).

    evertrain init DIR --model M; evertrain run DIR; evertrain status DIR; evertrain --help
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from evertrain import exits
from evertrain.config import add_arguments, overrides_from_args


def add_commands(sub) -> None:
    from evertrain.daemon.workspace import PRIORITIES, DaemonConfig

    def workspace_arg(p):
        p.add_argument("dir", nargs="?", type=Path, default=Path("."), help="the workspace (default: .)")

    p = sub.add_parser("init", help="create a workspace: evertrain.toml (these options) and its folders")
    p.add_argument("dir", type=Path, help="the workspace folder to create")
    add_arguments(p)
    add_arguments(p, DaemonConfig)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="train every file dropped into DIR/inbox, until SIGINT/SIGTERM or `stop`")
    workspace_arg(p)
    p.add_argument("--once", action="store_true", help="train everything waiting, then exit")
    add_from_base(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("repair", help="rebuild a lost or damaged ledger.sqlite from the checkpoints and the disk")
    workspace_arg(p)
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("add", help="copy a file into the workspace's queue (safe while the daemon runs)")
    p.add_argument("file", type=Path)
    workspace_arg(p)
    p.add_argument("--priority", choices=PRIORITIES, default="normal",
                   help="urgent pre-empts the file in training at its next step (default: normal)")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("status", help="the daemon's state, the queue and the last files")
    workspace_arg(p)
    p.add_argument("--json", action="store_true", help="the status and every ledger row, as JSON")
    p.set_defaults(func=cmd_status)

    for name, text in (("pause", "pause training at the next optimizer step (survives a restart)"),
                       ("resume", "resume after `pause`"),
                       ("stop", "checkpoint at the next optimizer step and stop the daemon"),
                       ("skip", "end the file in training now; it is marked skipped with the steps it got")):
        p = sub.add_parser(name, help=text)
        workspace_arg(p)
        p.set_defaults(func=cmd_control, action=name)

    p = sub.add_parser("pin", help="keep checkpoint-STEP forever (retention never deletes it)")
    p.add_argument("step", type=int)
    workspace_arg(p)
    p.add_argument("--remove", action="store_true", help="unpin it (retention may then delete it)")
    p.set_defaults(func=cmd_pin)


def cmd_init(args) -> int:
    from evertrain.daemon import workspace

    ws = workspace.init(args.dir, overrides_from_args(args), overrides_from_args(args, workspace.DaemonConfig))
    print(f"evertrain: created workspace {ws.root}\n  settings: {ws.config_file}\n  drop data files into "
          f"{ws.inbox} (write elsewhere, then mv), then: evertrain run {args.dir}")
    return exits.OK


def add_from_base(p) -> None:
    p.add_argument("--from-base", action="store_true",
                   help="when checkpoints exist and none loads, move them to damaged/ and start again from the "
                        "base model (without it: refused, exit 2)")


def cmd_run(args) -> int:
    from evertrain.daemon import service

    return _locked(lambda: service.run(args.dir, once=args.once, from_base=args.from_base))


def cmd_repair(args) -> int:
    from evertrain.daemon import repair

    return _locked(lambda: repair.repair(args.dir))


def _locked(command) -> int:
    """A command that holds the workspace's lock: refused while a daemon runs there."""
    from evertrain.daemon import workspace

    try:
        return command()
    except workspace.AlreadyRunning as e:
        print(f"evertrain: {e}", file=sys.stderr)
        return exits.BAD_INPUT


@contextmanager
def _open(args):
    from evertrain.daemon import workspace
    from evertrain.daemon.ledger import Ledger

    ws, _train, _daemon = workspace.load(args.dir)
    ledger = Ledger.open(ws)
    try:
        yield ws, ledger
    finally:  # closed here, not at exit: the commands also run inside other programs (the tests)
        ledger.close()


def cmd_add(args) -> int:
    from evertrain.daemon.inbox import enqueue
    from evertrain.daemon.workspace import printable
    from evertrain.data.containers import accepted_text, kind_of
    from evertrain.files import not_a_regular_file, sha256_file

    why = not_a_regular_file(args.file)
    if why:
        print(f"evertrain: {args.file}: {why}", file=sys.stderr)
        return exits.BAD_INPUT
    if kind_of(args.file.name) is None:
        print(f"evertrain: {args.file}: not a dataset file; evertrain takes {accepted_text()}", file=sys.stderr)
        return exits.BAD_INPUT
    with _open(args) as (ws, ledger):
        file_id = enqueue(ws, ledger, args.file, printable(str(args.file)), sha=sha256_file(args.file),
                          size=args.file.stat().st_size, priority=args.priority, move=False)
        name = ledger.get(file_id)["name"]
    print(f"evertrain: queued {args.file} as queue/{name} (id {file_id}, {args.priority})")
    return exits.OK


def cmd_status(args) -> int:
    from evertrain.daemon import status

    with _open(args) as (ws, ledger):
        print(status.show(ws, ledger, as_json=args.json))
    return exits.OK


def cmd_control(args) -> int:
    from evertrain.daemon import controls, status, workspace

    ws, _train, _daemon = workspace.load(args.dir)  # the ledger is not needed: `stop` works even when it is damaged
    pid = workspace.daemon_pid(ws)
    if args.action == "pause":
        controls.pause(ws)
        print("evertrain: paused" + (" at the next optimizer step" if pid else " (no daemon is running now; "
                                      "it will stay paused when started)"))
    elif args.action == "resume":
        was = controls.resume(ws)
        print("evertrain: resumed" if was else "evertrain: it was not paused")
    elif pid is None:
        print(f"evertrain: no daemon is running on {ws.root}; nothing to {args.action}", file=sys.stderr)
        return exits.FAILED
    elif args.action == "stop":
        controls.stop(ws)
        print(f"evertrain: asked the daemon (pid {pid}) to checkpoint and stop at the next optimizer step")
    else:
        current = (status.read(ws) or {}).get("current_file_id")
        if current is None:
            print("evertrain: no file is in training; nothing to skip", file=sys.stderr)
            return exits.FAILED
        controls.skip(ws, current)
        print(f"evertrain: asked the daemon to skip file id {current} at the next optimizer step")
    return exits.OK


def cmd_pin(args) -> int:
    with _open(args) as (ws, ledger):
        return _pin(args, ws, ledger)


def _pin(args, ws, ledger) -> int:
    from evertrain.daemon import controls

    ok, message = controls.pin(ws, ledger, args.step, on=not args.remove)
    print(f"evertrain: {message}", file=sys.stdout if ok else sys.stderr)
    return exits.OK if ok else exits.BAD_INPUT
