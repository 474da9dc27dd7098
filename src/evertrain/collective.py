"""Decisions every process of a launch must share, taken once and sent to all of them.

Under `accelerate launch` or `torchrun` each process runs the same loop; a stop seen by one process only (a
signal, a control file read on the main process) must stop all of them at the same optimizer step, or the
others wait forever in the next collective. One process alone: every function here is a plain return.

    accelerate launch --num_processes 2 -m evertrain train --dataset F --output-dir D   # then Ctrl-C
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

import torch


def agree(accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on any process is true on all of them (one small all-reduce per call)."""
    if accelerator.num_processes == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(bool(f)) for f in flags], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def from_main(accelerator, value=None):
    """The main process's `value` on every process (a picklable object; the others pass anything)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def launched() -> bool:
    """Whether this process joined a launch's process group (accelerate launch, torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def end_process(code: int) -> NoReturn:
    """End a process of a launch with `code`, as an exit would, but without the interpreter's teardown.

    Its threads are waited for and its exit handlers run (the log's files, the trackers' flushes), while the
    interpreter is whole; then the process ends at once. In the teardown, the process group would go last: gloo's
    worker threads keep their last work, tensors included, until then, and a tensor freed with the interpreter
    half gone aborts the process ("terminate called without an active exception", SIGABRT: pytorch/pytorch#179291)
    in place of its exit code, which a launcher then reports; or it hangs, and `torchrun` on the other machines
    waits out its exit barrier. The connections to the other processes are closed by the operating system."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
