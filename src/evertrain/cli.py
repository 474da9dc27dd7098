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
import os
import signal
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from evertrain import __version__, collective, disk, exits, logs
from evertrain.config import LONG_TEXT, SAMPLE_BY, ConfigError, TrainConfig, add_arguments, overrides_from_args
from evertrain.daemon.commands import add_commands as add_daemon_commands, add_from_base
from evertrain.export.commands import add_commands as add_export_commands
from evertrain.files import not_a_regular_file
from evertrain.models import ModelError
from evertrain.runs import Run, saved_settings
from evertrain.train import checkpoint

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
        return exits.BAD_INPUT
    except BrokenPipeError:  # `evertrain check FILE | head`: the reader left; nothing is wrong
        logs.quiet_stdout()
        return exits.OK
    except Exception as e:  # noqa: BLE001 - out of space anywhere (`pause` on a full disk): one line, no traceback
        if not disk.is_full(e):
            raise
        print(f"evertrain: {disk.DiskFull.of(e, Path.cwd())}: free space and run it again",
              file=sys.stderr)
        return exits.DISK_FULL


def resolve_config(output_dir: Path, overrides: dict, resume: checkpoint.Checkpoint | None) -> TrainConfig:
    """The run's saved settings (when continuing a run), with the options given now on top."""
    base = saved_settings(resume.path) if resume is not None else {}
    return TrainConfig.from_dict({**base, **overrides}, source=str(output_dir))


def cmd_train(args) -> int:
    from evertrain import locks

    if not readable_file(args.dataset):
        return exits.BAD_INPUT
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
            return exits.BAD_INPUT
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
        with logs.to_file(Run.at(args.output_dir).logs) if main_rank else nullcontext():
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
    from evertrain.train import driver
    from evertrain.train.session import RunMismatch
    from evertrain.train.setup import setup

    try:
        session = setup(config, Run.at(args.output_dir), resume=resume)
    except RunMismatch as e:
        print(f"evertrain: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    try:
        opened = driver.open_file(session, args.dataset, allow_repeat=args.allow_repeat)
        if opened.status != driver.READY:
            return refused(args.dataset, opened)
        return _train_file(opened.session, args, opened.data)
    finally:
        session.observers.finish()


def refused(path: Path, outcome) -> int:
    """Why a file was not trained at all (a driver.Outcome): one line, and its exit code."""
    from evertrain.train import driver

    if outcome.status == driver.DUPLICATE:
        earlier, sha = outcome.earlier, outcome.data.sha256
        print(f"evertrain: {path}: this content (sha256 {sha[:12]}) was already trained in this run as "
              f"{earlier.name}, global steps {earlier.first_step}-{earlier.last_step}; use --allow-repeat to train "
              "it again", file=sys.stderr)
        return exits.DUPLICATE
    print(f"evertrain: {outcome.error or 'preparing the file was stopped'}", file=sys.stderr)
    return exits.BAD_INPUT


def _train_file(session, args, data) -> int:
    """Train the file, stopping at the step boundary after SIGINT/SIGTERM; its outcome as an exit code."""
    from evertrain.data.summary import counted, kinds
    from evertrain.logs import Bar, duration
    from evertrain.train import driver
    from evertrain.train.session import STOP

    config = session.config
    for warning in data.warnings:
        session.say(f"evertrain: {args.dataset.name}: warning: {warning}")
    G = session.global_batch
    session.say(f"evertrain: {args.dataset.name}: {counted(data.records, len(data.examples), data)} "
                f"({kinds(data)}), "
                f"{data.tokens} tokens, {data.truncated} truncated to {config.max_length}, "
                f"{len(data.held_out)} held out, {len(data.rows)} rows, global batch {G}, "
                f"{data.total_steps(G, config.epochs)} steps")
    asked = []

    def on_signal(signum, _frame):
        asked.append(signal.Signals(signum).name)  # only a flag: the loop acts at its next step boundary

    def decide(record):
        bar.update(record)
        return STOP if asked else None

    bar = Bar(session.is_main and sys.stdout.isatty())
    cursor = session.progress.cursors.get(data.sha256)
    bar.start(args.dataset.name, data.total_steps(G, config.epochs), cursor.file_step if cursor else 0)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcome = driver.run(session, data, decide)
    finally:  # `train` may run inside another program (the tests, a notebook): give its handlers back
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    session, result, name = outcome.session, outcome.result, args.dataset.name
    if outcome.status == driver.MISMATCH:
        print(f"evertrain: {outcome.error}", file=sys.stderr)
        return exits.BAD_INPUT
    if outcome.status == driver.FAILED:
        print(f"evertrain: {name}: {outcome.error}; the file is recorded as failed and NOT done, with the "
              f"{session.progress.files[-1].steps} steps it trained (global step {session.progress.global_step}); "
              "to train it from its start, run the same command again", file=sys.stderr)
        return exits.GUARD
    if outcome.status == driver.ROLLED_BACK:
        print(f"evertrain: {name}: {outcome.error}; rolled back to "
              f"{session.last_checkpoint.name if session.last_checkpoint else 'the initial model'} (global step "
              f"{session.progress.global_step}); the file is recorded as failed and NOT done", file=sys.stderr)
        return exits.GUARD
    if asked:
        session.say(f"evertrain: {asked[0]}: checkpointed at the step boundary")
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    session.say(f"evertrain: {name} {result.status}: {result.steps} steps this call "
                f"(file {result.file_step}/{result.expected_steps}), global step {result.step_before} -> "
                f"{result.step_after}, mean loss {loss}, {result.tokens} tokens, {duration(result.seconds)}, "
                f"checkpoint {result.checkpoint}")
    if outcome.status == driver.INTERRUPTED:
        return exits.INTERRUPTED
    if outcome.status == driver.REJECTED:
        where = result.checkpoint.name if result.checkpoint else "the base model"
        if session.is_main:  # one line from a launch of several processes, not one per process
            print(f"evertrain: {name} REJECTED by the forgetting gate: {result.gate['reason']}; the run is back at "
                  f"global step {result.step_after} ({where}), as before the file; train it anyway with "
                  "--forgetting-action alert", file=sys.stderr)
        return exits.REJECTED
    if result.gate and result.gate["tripped"] and session.is_main:
        print(f"evertrain: {name}: ALERT: {result.gate['reason']} (forgetting_action alert: kept)", file=sys.stderr)
    for p in outcome.problems:
        print(f"evertrain: {name} NOT done: {p}", file=sys.stderr)
    return exits.GUARD if outcome.status == driver.NOT_DONE else exits.OK


def readable_file(path: Path) -> bool:
    """Whether `path` is a regular file; if not, say what it is instead."""
    why = not_a_regular_file(path)
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
        return exits.BAD_INPUT
    config = TrainConfig(model=args.model, chat_template=args.chat_template, columns=args.columns,
                         max_length=args.max_length, long_text=args.long_text, window_overlap=args.window_overlap,
                         text_sample_by=args.text_sample_by, held_out_fraction=0.0)
    tokenizer = models.load_tokenizer(config.model, config.chat_template)
    try:
        data = load_file(args.file, tokenizer, config)
    except DataError as e:
        print(f"evertrain: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    print(describe(data, config.max_length))
    for e in data.examples[:args.examples]:
        window = "" if e.part is None else f", window {e.part + 1}"
        print(f"\n{data.unit} {e.line + 1} ({e.format}{window}), trained tokens between {OPEN} and {CLOSE}:")
        print(marked(e, tokenizer))
    return exits.OK


def cmd_report(args) -> int:
    from evertrain.observe.evals import report

    if not args.dir.is_dir():
        print(f"evertrain: {args.dir}: no such folder", file=sys.stderr)
        return exits.BAD_INPUT
    print(report(args.dir))
    return exits.OK


def cmd_dashboard(args) -> int:
    from evertrain.dashboard import auth, server

    if not args.dir.is_dir():
        print(f"evertrain: {args.dir}: no such folder", file=sys.stderr)
        return exits.BAD_INPUT
    try:
        return server.serve(args.dir, args.host, args.port, args.token)
    except auth.TokenRefused as e:
        print(f"evertrain: dashboard: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except OSError as e:
        print(f"evertrain: dashboard: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return exits.FAILED


if __name__ == "__main__":
    sys.exit(main())
