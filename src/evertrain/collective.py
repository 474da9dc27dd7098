"""Decisions every process of a launch must share, taken once and sent to all of them.

Under `accelerate launch` or `torchrun` each process runs the same loop; a stop seen by one process only (a
signal, a control file read on the main process) must stop all of them at the same optimizer step, or the
others wait forever in the next collective. One process alone: every function here is a plain return.

    accelerate launch --num_processes 2 -m evertrain train --dataset F --output-dir D   # then Ctrl-C
"""

from __future__ import annotations

import gc

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


def close() -> None:
    """Leave the launch's process group, if this process joined one: every command ends here.

    Each process closes its connections to the others itself, as PyTorch asks, rather than leaving them to the
    interpreter's exit. A process that fails on its way out would leave `torchrun` on the other machines
    waiting out their exit barrier (five minutes) before they end too.

    The garbage collected on both sides: the group's last users (a DDP model of a session the run is done with,
    a rolled-back one's) go first, then the group itself, while the interpreter is whole. Gloo's worker threads
    keep their last work, tensors included, until their group goes; freed at the interpreter's finalization
    instead, a tensor takes the GIL of an interpreter going away, and the process dies of SIGABRT in place of
    its exit code (pytorch/pytorch#179291)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()
        gc.collect()
