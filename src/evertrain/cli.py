"""The `evertrain` command.

    evertrain train --dataset FILE --output-dir DIR     # train one file into a continuing run
    evertrain init DIR --model M; evertrain run DIR     # the daemon: train every file dropped into DIR/inbox
    evertrain repair DIR                                # rebuild a workspace's lost or damaged ledger
    evertrain check FILE                                # what a file will teach, before training it
    evertrain report DIR                                # forgetting matrix of a run
    evertrain dashboard DIR                             # live web page of a run, http://127.0.0.1:8777/
    evertrain export DIR OUT; evertrain chat DIR        # take the model out; talk to a checkpoint
    evertrain --help; evertrain --version
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import stat
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

from evertrain import __version__, checkpoint, collective, disk, exits, logs
from evertrain.config import LONG_TEXT, SAMPLE_BY, ConfigError, TrainConfig, add_arguments, overrides_from_args
from evertrain.export.commands import add_commands as add_export_commands
from evertrain.models import ModelError

# Exit codes a script can rely on: the one table is exits.py.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DUPLICATE, EXIT_GUARD, EXIT_INTERRUPTED = (
    exits.OK, exits.FAILED, exits.BAD_INPUT, exits.DUPLICATE, exits.GUARD, exits.INTERRUPTED)


class Parser(argparse.ArgumentParser):
    """No abbreviated options, on every command: `--lr 1e-4` would otherwise be taken as `--lr-schedule`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


def command() -> int:
    """The `evertrain` program (its console script, `python -m evertrain`); main() is the same in a caller's process.

    A run that seems stuck: `kill -USR1 PID` writes where each of its threads is to its standard error."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        code = main()
    except BaseException:
        if not collective.launched():
            raise
        traceback.print_exc()
        code = exits.FAILED
    if collective.launched():  # a process of a launch: its exit code, never a crash in the interpreter's teardown
        collective.end_process(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="evertrain", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"evertrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)  # the sub-commands' parsers are Parser too

    p = sub.add_parser("train", help="train one data file into the run in --output-dir (continuing it)")
    p.add_argument("--dataset", type=Path, required=True, help="the data file to train (" + _accepted() + ")")
    p.add_argument("--output-dir", type=Path, required=True, help="the run's folder (checkpoints, trace)")
    p.add_argument("--allow-repeat", action="store_true", help="train a file even if its content was trained")
    p.add_argument("--config", type=Path, help="a TOML file of settings: a [train] table and a [data.columns] "
                                              "table, as in a workspace's evertrain.toml (options given here win)")
    add_from_base(p)
    add_arguments(p)
    p.set_defaults(func=cmd_train)
    add_daemon_commands(sub)

    p = sub.add_parser("check", help="check a data file and show what would be trained (nothing is trained)")
    p.add_argument("file", type=Path, help="a data file (" + _accepted() + ")")
    p.add_argument("--model", default=None, help="model whose tokenizer to use (default: the embedded SmolLM2)")
    p.add_argument("--chat-template", default="", help="chatml, or a FILE.jinja (default: the model's own)")
    p.add_argument("--columns", default="", help="map field names onto a format, e.g. question=prompt,answer=completion")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row (default: 1024)")
    p.add_argument("--long-text", default="window", choices=LONG_TEXT,
                   help="a text longer than max_length: window (split, every token trained once) or truncate")
    p.add_argument("--window-overlap", type=int, default=0, help="tokens a window repeats from the one before")
    p.add_argument("--text-sample-by", default="line", choices=SAMPLE_BY,
                   help="a .txt or .md file's examples: line, paragraph or document (default: line)")
    p.add_argument("--examples", type=int, default=1, help="how many examples to show marked (default: 1)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="print the forgetting matrix and each file's held-out loss before/after")
    p.add_argument("dir", type=Path, nargs="?", default=Path("."), help="a workspace or a train --output-dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="serve a live web page of a workspace or train output dir")
    p.add_argument("dir", type=Path, nargs="?", default=Path("."), help="workspace or --output-dir (default: .)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; off loopback a token is required")
    p.add_argument("--port", type=int, default=8777, help="port (0: any free one)")
    p.add_argument("--token", help="the token clients must send, 16 characters or more "
                                   "(default off loopback: a random one, printed)")
    p.set_defaults(func=cmd_dashboard)
    add_export_commands(sub)

    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `export` writes its own command into the card
    try:
        return args.func(args)
    except (ConfigError, ModelError) as e:
        print(f"evertrain: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `evertrain check FILE | head`: the reader left; nothing is wrong
        logs.quiet_stdout()
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - out of space anywhere (`pause` on a full disk): one line, no traceback
        if not disk.is_full(e):
            raise
        print(f"evertrain: {disk.DiskFull.of(e, Path.cwd())}: free space and run it again",
              file=sys.stderr)
        return exits.DISK_FULL


def resolve_config(output_dir: Path, overrides: dict, resume: checkpoint.Checkpoint | None) -> TrainConfig:
    """The run's saved settings (when continuing a run), with the options given now on top."""
    base = {}
    if resume is not None and (resume.path / "evertrain_config.json").exists():
        base = json.loads((resume.path / "evertrain_config.json").read_text())
    return TrainConfig.from_dict({**base, **overrides}, source=str(output_dir))


def cmd_train(args) -> int:
    from evertrain import locks

    if not readable_file(args.dataset):
        return EXIT_BAD_INPUT
    overrides = overrides_from_args(args)
    if args.config is not None:
        from evertrain.daemon.workspace import read_settings

        values = read_settings(args.config, ("train", "data"))[0]
        TrainConfig.from_dict(values, source=f"{args.config} [train]")  # its own mistakes, named by its own name
        overrides = {**values, **overrides}
    lock = None
    if locks.is_main_launch_process():
        args.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = locks.hold(args.output_dir / locks.LOCK_NAME, "train",
                              "wait for it to finish, or stop it (Ctrl-C, SIGTERM)")
        except locks.AlreadyRunning as e:
            print(f"evertrain: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        checkpoint.remove_debris(args.output_dir)  # the lock is ours: a dead process left whatever temps are there
    try:
        main_rank = locks.is_main_launch_process()
        starting_over = args.from_base and checkpoint.present(args.output_dir)
        resume = checkpoint.newest_complete(args.output_dir,
                                            damaged=checkpoint.resume_policy(args.from_base, main_rank))
        if resume is None and starting_over and main_rank:
            print(f"evertrain: no checkpoint loads in {args.output_dir}: starting again from the base model "
                  "(--from-base)")
        config = resolve_config(args.output_dir, overrides, resume)
        with logs.to_file(args.output_dir / "logs") if main_rank else nullcontext():
            return _train(args, config, resume)
    except Exception as e:
        if not disk.is_full(e):
            raise
        if locks.is_main_launch_process():  # under a launch every process stops; one says why
            newest = checkpoint.newest_complete(args.output_dir, warn=lambda _text: None)
            print(f"evertrain: {disk.DiskFull.of(e, args.output_dir)}: stopped; the newest complete checkpoint is "
                  f"{newest.path if newest else 'none yet'}, the partial one was removed; free space and run the "
                  f"same command again to resume from it", file=sys.stderr)
        return exits.DISK_FULL
    finally:
        if lock is not None:
            os.close(lock)


def _train(args, config, resume) -> int:
    """`train` with the output folder locked (cmd_train)."""
    from evertrain import loop, metrics
    from evertrain.data import DataError

    try:
        session = loop.setup(config, args.output_dir, resume=resume)
        data = loop.prepare(session, args.dataset)
    except (loop.RunMismatch, DataError) as e:
        if disk.is_full(e):  # the token store found no room: not the file's fault
            raise
        print(f"evertrain: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    earlier = session.progress.finished(data.sha256)
    if earlier and not args.allow_repeat:
        print(f"evertrain: {args.dataset}: this content (sha256 {data.sha256[:12]}) was already trained in this "
              f"run as {earlier.name}, global steps {earlier.first_step}-{earlier.last_step}; "
              "use --allow-repeat to train it again", file=sys.stderr)
        return EXIT_DUPLICATE
    try:
        return _train_file(session, args, config, data)
    finally:
        metrics.finish(session)


def _train_file(session, args, config, data) -> int:
    """Train the file, stopping at the step boundary after SIGINT/SIGTERM; a non-finite loss is rolled back."""
    from evertrain import loop
    from evertrain.daemon.status import Bar
    from evertrain.data.summary import counted
    from evertrain.logs import duration

    for warning in data.warnings:
        session.say(f"evertrain: {args.dataset.name}: warning: {warning}")
    G = session.global_batch
    session.say(f"evertrain: {args.dataset.name}: {counted(data.records, len(data.examples), data)} "
                f"{dict(data.formats)}, "
                f"{data.tokens} tokens, {data.truncated} truncated to {config.max_length}, "
                f"{len(data.held_out)} held out, {len(data.rows)} rows, global batch {G}, "
                f"{data.total_steps(G, config.epochs)} steps")
    asked = []

    def on_signal(signum, _frame):
        asked.append(signal.Signals(signum).name)  # only a flag: the loop acts at its next step boundary

    def decide(record):
        bar.update(record)
        return loop.STOP if asked else None

    bar = Bar(session.is_main and sys.stdout.isatty())
    cursor = session.progress.cursors.get(data.sha256)
    bar.start(args.dataset.name, data.total_steps(G, config.epochs), cursor.file_step if cursor else 0)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        session, result = loop.run_file(session, data, decide)
    except loop.RunMismatch as e:
        print(f"evertrain: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except loop.NonFiniteLoss as e:
        session = loop.roll_back(session, data)
        print(f"evertrain: {args.dataset.name}: {e}; rolled back to "
              f"{session.last_checkpoint.name if session.last_checkpoint else 'the initial model'} (global step "
              f"{session.progress.global_step}); the file is recorded as failed and NOT done", file=sys.stderr)
        return EXIT_GUARD
    finally:  # `train` may run inside another program (the tests, a notebook): give its handlers back
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if asked:
        session.say(f"evertrain: {asked[0]}: checkpointed at the step boundary")
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    session.say(f"evertrain: {args.dataset.name} {result.status}: {result.steps} steps this call "
                f"(file {result.file_step}/{result.expected_steps}), global step {result.step_before} -> "
                f"{result.step_after}, mean loss {loss}, {result.tokens} tokens, {duration(result.seconds)}, "
                f"checkpoint {result.checkpoint}")
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    if result.status == "rejected":
        where = result.checkpoint.name if result.checkpoint else "the base model"
        if session.is_main:  # one line from a launch of several processes, not one per process
            print(f"evertrain: {args.dataset.name} REJECTED by the forgetting gate: {result.gate['reason']}; the run "
                  f"is back at global step {result.step_after} ({where}), as before the file; train it anyway with "
                  "--forgetting-action alert", file=sys.stderr)
        return exits.REJECTED
    if result.gate and result.gate["tripped"] and session.is_main:
        print(f"evertrain: {args.dataset.name}: ALERT: {result.gate['reason']} (forgetting_action alert: kept)",
              file=sys.stderr)
    problems = loop.guard_problems(session, result)
    for p in problems:
        print(f"evertrain: {args.dataset.name} NOT done: {p}", file=sys.stderr)
    return EXIT_GUARD if problems else EXIT_OK


def readable_file(path: Path) -> bool:
    """Whether `path` is a regular file; if not, say what it is instead ("no such file" only when it is so)."""
    try:
        mode = path.stat().st_mode
        why = (None if stat.S_ISREG(mode) else "a folder, not a regular file" if stat.S_ISDIR(mode)
               else "not a regular file (a FIFO)" if stat.S_ISFIFO(mode) else "not a regular file")
    except FileNotFoundError:
        why = "no such file"
    except OSError as e:
        why = f"cannot read it: {e.strerror or e}"
    if why:
        print(f"evertrain: {path}: {why}", file=sys.stderr)
    return why is None


def _accepted() -> str:
    from evertrain.data.containers import accepted_text

    return accepted_text()


def cmd_check(args) -> int:
    from evertrain import models
    from evertrain.data import DataError, load_file
    from evertrain.data.summary import CLOSE, OPEN, describe, marked

    if not readable_file(args.file):
        return EXIT_BAD_INPUT
    config = TrainConfig(model=args.model, chat_template=args.chat_template, columns=args.columns,
                         max_length=args.max_length, long_text=args.long_text, window_overlap=args.window_overlap,
                         text_sample_by=args.text_sample_by, held_out_fraction=0.0)
    tokenizer = models.load_tokenizer(config.model, config.chat_template)
    try:
        data = load_file(args.file, tokenizer, config)
    except DataError as e:
        print(f"evertrain: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(describe(data, config.max_length))
    for e in data.examples[:args.examples]:
        window = "" if e.part is None else f", window {e.part + 1}"
        print(f"\n{data.unit} {e.line + 1} ({e.format}{window}), trained tokens between {OPEN} and {CLOSE}:")
        print(marked(e, tokenizer))
    return EXIT_OK


def cmd_report(args) -> int:
    from evertrain.evals import report

    if not args.dir.is_dir():
        print(f"evertrain: {args.dir}: no such folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report(args.dir))
    return EXIT_OK


def cmd_dashboard(args) -> int:
    from evertrain.dashboard import auth, server

    if not args.dir.is_dir():
        print(f"evertrain: {args.dir}: no such folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return server.serve(args.dir, args.host, args.port, args.token)
    except auth.TokenRefused as e:
        print(f"evertrain: dashboard: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"evertrain: dashboard: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED


# ------------------------------------------------------------------------------------------------- the daemon

def add_daemon_commands(sub) -> None:
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
    return EXIT_OK


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
        return EXIT_BAD_INPUT


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
    from evertrain.data import sha256_file

    from evertrain.data.containers import accepted_text, kind_of

    if not readable_file(args.file):
        return EXIT_BAD_INPUT
    if kind_of(args.file.name) is None:
        print(f"evertrain: {args.file}: not a dataset file; evertrain takes {accepted_text()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with _open(args) as (ws, ledger):
        file_id = enqueue(ws, ledger, args.file, printable(str(args.file)), sha=sha256_file(args.file),
                          size=args.file.stat().st_size, priority=args.priority, move=False)
        name = ledger.get(file_id)["name"]
    print(f"evertrain: queued {args.file} as queue/{name} (id {file_id}, {args.priority})")
    return EXIT_OK


def cmd_status(args) -> int:
    from evertrain.daemon import status

    with _open(args) as (ws, ledger):
        print(status.show(ws, ledger, as_json=args.json))
    return EXIT_OK


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
        return EXIT_FAILED
    elif args.action == "stop":
        controls.stop(ws)
        print(f"evertrain: asked the daemon (pid {pid}) to checkpoint and stop at the next optimizer step")
    else:
        current = (status.read(ws) or {}).get("current_file_id")
        if current is None:
            print("evertrain: no file is in training; nothing to skip", file=sys.stderr)
            return EXIT_FAILED
        controls.skip(ws, current)
        print(f"evertrain: asked the daemon to skip file id {current} at the next optimizer step")
    return EXIT_OK


def cmd_pin(args) -> int:
    with _open(args) as (ws, ledger):
        return _pin(args, ws, ledger)


def _pin(args, ws, ledger) -> int:
    from evertrain.daemon import controls

    ok, message = controls.pin(ws, ledger, args.step, on=not args.remove)
    print(f"evertrain: {message}", file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
