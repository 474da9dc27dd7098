"""FSDP2: the model and its optimizer sharded over the processes of a launch (torch's `fully_shard`).

Asked for the way accelerate users ask, `accelerate launch --use_fsdp --fsdp_version 2`; evertrain then shards
the model itself, the same way on CUDA (NCCL) and on CPU (gloo, where accelerate's own FSDP plugin does not
run), so the tests on CPU run the code a GPU runs. Every decoder layer is one FSDP unit, the root holds the rest.

A checkpoint stays an ordinary one: the full model is gathered to the main process and written as safetensors
(so export, `from_pretrained` and resume read it as any other), and the optimizer state is written sharded with
`torch.distributed.checkpoint`, every process its own shard, into `optimizer/` inside the same temporary folder
that is committed atomically. Resume loads the full model, shards it, and loads the optimizer shards (at another
number of processes too: torch.distributed.checkpoint reshards on load).

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m evertrain train --dataset F --output-dir D
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from evertrain.config import ConfigError

OPTIMIZER_DIR = "optimizer"  # inside a checkpoint of a sharded run


def asked() -> bool:
    """Did the launch ask for FSDP? Refuses (ConfigError) the settings evertrain cannot honour."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    problems = []
    if version != "2":
        problems.append(f"FSDP version {version} (evertrain shards with FSDP2: add --fsdp_version 2)")
    if strategy not in ("1", "FULL_SHARD"):
        problems.append(f"sharding strategy {strategy} (evertrain supports FULL_SHARD)")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        problems.append("CPU offload of parameters (not supported)")
    if problems:
        raise ConfigError("FSDP was asked for with " + "; ".join(problems) + ". Nothing was trained.")
    return True


def stand_aside() -> None:
    """Keep accelerate's own FSDP plugin out of it: evertrain shards the model itself (see the docstring)."""
    os.environ.pop("ACCELERATE_USE_FSDP", None)


def shard(model, device: torch.device, precision: str):
    """fully_shard every decoder layer, then the root; parameters become DTensors sharded over all processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kwargs = {"mesh": mesh}
    if precision in ("bf16", "fp16"):  # compute in half precision, keep fp32 master weights, reduce in fp32
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    units = set(getattr(base, "_no_split_modules", None) or [])
    if not units:
        raise ConfigError(f"FSDP: {type(base).__name__} names no decoder layer class (_no_split_modules)")
    model.to(device)
    for module in model.modules():
        if type(module).__name__ in units:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextmanager
def gradient_sync(model, sync: bool):
    """Micro-batches before the last of a step accumulate local gradients; the last reduce-scatters them."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model) -> dict:
    """The whole model's weights on the main process, in CPU memory (every process takes part; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(model, optimizer, checkpoint_dir: Path) -> None:
    """Every process writes its optimizer shard into checkpoint_dir/optimizer/ (called on all of them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(checkpoint_dir / OPTIMIZER_DIR))


def load_optimizer(model, optimizer, checkpoint_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to load into
    dcp.load(state, checkpoint_id=str(checkpoint_dir / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
