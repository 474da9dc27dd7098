"""The project's one logger, "evertrain": what a person reads on the console also goes to the run's log file.

`train` writes OUTPUT_DIR/logs/evertrain.log, the daemon WORKSPACE/logs/evertrain.log (rotated at 10 MB, 5 old
ones kept). A progress line (every `log_steps`) goes to the console only when no progress bar shows the same.

    evertrain train --dataset F --output-dir D && tail D/logs/evertrain.log
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from contextlib import contextmanager
from pathlib import Path

LOG_BYTES, LOG_BACKUPS = 10 << 20, 5
LOG = logging.getLogger("evertrain")
LOG.setLevel(logging.INFO)
LOG.propagate = False


class _Console(logging.Handler):
    """stdout, looked up at every line (a test or a rich bar may have replaced it); a closed pipe ends the
    console output quietly, never the training."""

    bar_showing = False

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "progress", False) and self.bar_showing:
            return
        try:
            print(record.getMessage(), flush=True)
        except BrokenPipeError:  # `evertrain train ... | head`: the reader left; the log file still gets it
            quiet_stdout()
        except OSError as e:  # stdout is a file on a full disk: the line is lost, not the run
            from evertrain import disk

            if not disk.is_full(e):
                raise


CONSOLE = _Console()
LOG.addHandler(CONSOLE)


def quiet_stdout() -> None:
    """Send what is still written to stdout nowhere (also what Python flushes at exit)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def say(text: str, *, progress: bool = False) -> None:
    LOG.info(text, extra={"progress": progress})


@contextmanager
def to_file(logs_dir: Path):
    """Also write every line to logs_dir/evertrain.log while the block runs."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(logs_dir / "evertrain.log", maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    try:
        yield
    finally:
        LOG.removeHandler(handler)
        handler.close()


def exception(text: str) -> None:
    LOG.exception(text)


def duration(seconds: float) -> str:
    """1h 12m, 4m 5s, 12s: what a person reads at a glance (the page's fmt.secs says the same)."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


class _LogFile(logging.handlers.RotatingFileHandler):
    """logs/evertrain.log, which a full disk silences (said once on stderr) instead of a traceback a line."""

    full = False    # said once, until a line goes through again
    failed = False  # this line

    def emit(self, record):
        self.failed = False
        super().emit(record)
        if not self.failed:
            self.full = False

    def handleError(self, record):
        from evertrain import disk

        if not disk.is_full(sys.exc_info()[1]):
            return super().handleError(record)
        self.failed = True
        if not self.full:
            self.full = True
            try:
                sys.stderr.write(f"evertrain: disk full: {self.baseFilename} not written until there is room\n")
            except OSError:
                pass


class Bar:
    """A progress bar (rich) for the file in training when stdout is a terminal: global step, file step, loss,
    tokens/s (the recent rate) and time left. Without one, the plain progress lines (every log_steps) are what the
    console gets; the log file gets those lines either way."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
            from rich.text import Text

            class Left(ProgressColumn):
                """Time left as everywhere else in evertrain ("1h 12m"), not rich's 1:12:00."""

                def render(self, task):
                    left = task.time_remaining
                    return Text("" if left is None else f"{duration(left)} left")

            self.progress = Progress(TextColumn("step {task.fields[step]}"), TextColumn("{task.description}"),
                                     BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                     TextColumn("{task.fields[speed]} tok/s"), Left(),
                                     redirect_stdout=True, transient=True)
            self.progress.start()
            CONSOLE.bar_showing = True
        self.task = None

    def start(self, name: str, total: int, done: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(name, total=total, completed=done, loss="-", speed="-", step="-")

    def update(self, record) -> None:
        """After an optimizer step (a loop.StepRecord)."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=record.file_step, loss=f"{record.loss:.4f}",
                                 speed=f"{record.tokens_per_second:.0f}", step=record.step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            CONSOLE.bar_showing = False
