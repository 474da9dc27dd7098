"""Setting a run up: the accelerator, the model and optimizer (new, or resumed from a checkpoint), the session.

    evertrain train --dataset FILE --output-dir DIR     # setup -> prepare the file -> fit, step by step
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from evertrain import collective, logs, models
from evertrain.config import ConfigError, TrainConfig
from evertrain.observe import metrics
from evertrain.observe.observers import Observers
from evertrain.runs import Run, saved_settings
from evertrain.train import chunked_loss, checkpoint, sharding
from evertrain.train.objectives import Objectives
from evertrain.train.replay import Replay
from evertrain.train.saving import restore_rng
from evertrain.train.session import Retention, RunMismatch, Session, Writing
from evertrain.train.state import TrainingProgress


def setup(config: TrainConfig, run: Run, *, resume: checkpoint.Checkpoint | None | str = "newest",
          cpu: bool = False, from_base: bool = False, retention: Retention | None = None) -> Session:
    """Build the accelerator, then load `resume` (by default the newest complete checkpoint of the run folder, as
    the main process finds it: every process loads that one).

    When checkpoints exist and none loads, this raises checkpoint.NoUsableCheckpoint, unless `from_base`
    (then the damaged ones are set aside and the run starts again from the base model)."""
    from accelerate import Accelerator

    output_dir = run.run_dir
    # Launched as several processes on a machine without CUDA: accelerate only picks gloo when told "cpu".
    cpu = cpu or ("LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    sharded = sharding.asked()  # FSDP2, which evertrain does itself; accelerate then runs plain processes
    if sharded:
        sharding.stand_aside()
    refuse_unhonoured_sharding()
    if config.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matrix products; set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    trackers = metrics.log_with(config.report_to, default=config.report_to == TrainConfig.report_to)
    accelerator = Accelerator(mixed_precision=resolved_precision(config.precision), cpu=cpu, log_with=trackers or None,
                              project_dir=str(run.trackers))
    refuse_unhonoured_sharding(accelerator.distributed_type.value)
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if main and resume == "newest":
        try:
            resume = checkpoint.newest_complete(output_dir, warn=logs.say,
                                                damaged=checkpoint.resume_policy(from_base, True))
        except checkpoint.NoUsableCheckpoint as e:
            resume = e
    resume = collective.from_main(accelerator, resume)  # every process loads the main process's choice
    if isinstance(resume, Exception):
        raise resume
    accelerator.wait_for_everyone()
    newest = resume

    saved_config = saved_settings(newest.path) if newest is not None else None
    if saved_config is not None and "held_out_min_file" not in saved_config:
        # A run begun before tiny files got a held-out slice keeps choosing as it did: a file interrupted part-way
        # must find the same held-out examples (its cursor's settings), and later files the same rule.
        config = dataclasses.replace(config, held_out_min_file=0)
    if saved_config is not None and "long_text" not in saved_config:
        # A run begun before long texts were windowed keeps truncating them, for the same reason: a file
        # interrupted part-way must find the same rows.
        config = dataclasses.replace(config, long_text="truncate", window_overlap=0)
    world = accelerator.num_processes
    asked = config.batch_size * world * config.gradient_accumulation
    precision = accelerator.mixed_precision
    # A run from before these were recorded keeps the ones it is resumed with.
    saved = ({"global_batch": asked, "precision": precision, "sharding": "none", **newest.state["run"]}
             if newest is not None else {})
    accumulation = keep_global_batch(config, world, saved.get("global_batch", asked), output_dir)
    # The sharding decides the optimizer state's format on disk, so a run keeps the one it began with.
    identity = {**config.identity(), "global_batch": saved.get("global_batch", asked), "precision": precision,
                "sharding": "fsdp2" if sharded else "none"}
    if newest is not None:
        if saved != identity:
            diff = ", ".join(f"{k}: run has {saved.get(k)!r}, asked {identity.get(k)!r}"
                             for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k))
            raise RunMismatch(f"{output_dir} holds a run with other settings ({diff}). Keep the run's settings, "
                              "or start a new run in a new output folder.")
        tokenizer = models.load_tokenizer(str(newest.path))
        if config.lora:
            model = models.load_lora(load_base(config), newest.path)
        else:
            model = models.load_model(str(newest.path), config.dtype, config.attention)
        progress = TrainingProgress.from_state_dict(newest.state["evertrain"])
    else:
        torch.manual_seed(config.seed)  # LoRA's initialisation
        tokenizer = models.load_tokenizer(config.model, config.chat_template)
        model = load_base(config)
        if config.lora:
            model = models.add_lora(model, config)
        progress = TrainingProgress()
    model, optimizer = ready_to_train(config, accelerator, model, newest, sharded)

    objectives = Objectives(config, accelerator, sharded=sharded)
    observers = Observers(config, run, accelerator, tokenizer, sharded=sharded,
                          saved=newest.state.get("observers") if newest else None,
                          legacy=newest.state["evertrain"] if newest else None,
                          judge=lambda model, examples: objectives.evaluate(model, examples, tokenizer.pad_token_id))
    session = Session(config, run, accelerator, model, tokenizer, optimizer, progress, identity, accumulation,
                      observers, objectives, Replay(config, run, main), retention or Retention(),
                      Writing(last_checkpoint=newest.path if newest else None,
                              saved_step=newest.step if newest else None))
    if main:
        run.logs.mkdir(parents=True, exist_ok=True)
    observers.metrics.start(config.to_dict())
    if newest is not None:
        restore_rng(newest.path, accelerator.process_index)
        session.say(f"evertrain: resumed {newest.path} at global step {progress.global_step}")
    if sharded and config.snapshot_budget:
        session.say("evertrain: FSDP: no evolution snapshots (one process takes them, and a sharded model needs "
                    "every process for a forward pass); held-out evaluations run as usual")
    if accumulation != config.gradient_accumulation:
        session.say(f"evertrain: {world} process(es) x batch_size {config.batch_size}: gradient accumulation "
                    f"{config.gradient_accumulation} -> {accumulation}, to keep the run's global batch of "
                    f"{session.global_batch} rows per optimizer step")
    if observers.trace is not None and main:
        observers.trace.truncate(progress.global_step, set(progress.cursors) | {f.sha256 for f in progress.files})
    return session


def ready_to_train(config: TrainConfig, accelerator, model, resume: checkpoint.Checkpoint | None, sharded: bool):
    """The model made ready (kernels, memory savers, FSDP2) and its optimizer (resumed): both as training uses them."""
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora:  # frozen embeddings: give the checkpointed blocks an input that requires grad
            model.enable_input_require_grads()
    if config.chunked_loss:
        chunked_loss.refuse_unsupported(model, sharded=sharded)
    if config.compile:
        # Packed rows vary in length: dynamic shapes, or a recompile for every new row width.
        model.forward = torch.compile(model.forward, dynamic=True)
    if sharded:
        if accelerator.num_processes == 1:
            raise ConfigError("FSDP shards the model over the processes of a launch; one process holds it whole: "
                              "launch several, or train without --use_fsdp")
        model = sharding.shard(model, accelerator.device, accelerator.mixed_precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=config.fused_optimizer and fused_adamw_supported(trainable))
    if sharded:
        if resume is not None:
            sharding.load_optimizer(model, optimizer, resume.path)
        return model, optimizer
    if resume is not None:
        optimizer.load_state_dict(torch.load(resume.path / "optimizer.pt", weights_only=True))
    return accelerator.prepare(model, optimizer)


def refuse_unhonoured_sharding(distributed_type: str | None = None) -> None:
    """Sharding evertrain does not do (DeepSpeed; FSDP by accelerate's plugin) is refused, before the accelerator
    (`distributed_type` None) and after it: never dropped in silence. FSDP2 is asked for with `--use_fsdp
    --fsdp_version 2` and done by `sharding`, which has taken the request out of accelerate's way by then."""
    asked = "DeepSpeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") else None
    if distributed_type in ("FSDP", "DEEPSPEED"):
        asked = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}[distributed_type]
    if asked:
        raise ConfigError(f"{asked} was asked for. evertrain shards with FSDP2 (accelerate launch --use_fsdp "
                          "--fsdp_version 2) or trains DDP; DeepSpeed's sharded state is not supported.")


def keep_global_batch(config: TrainConfig, world: int, global_batch: int, output_dir: Path) -> int:
    """The gradient accumulation that makes `global_batch` at this number of processes; RunMismatch if none does."""
    per_round = config.batch_size * world
    if global_batch % per_round:
        fits = [b for b in range(1, global_batch // world + 1) if global_batch % (b * world) == 0]
        raise RunMismatch(
            f"{output_dir} holds a run with a global batch of {global_batch} rows per optimizer step; {world} "
            f"process(es) x batch_size {config.batch_size} = {per_round} rows per micro-batch round does not "
            f"divide it, so no gradient accumulation keeps it. "
            + (f"With {world} process(es) use a batch_size of {', '.join(map(str, fits[-4:]))}, "
               f"or another number of processes." if fits else
               f"{global_batch} rows cannot be split over {world} processes; use a number of processes that "
               f"divides {global_batch}."))
    return global_batch // per_round


def load_base(config: TrainConfig):
    """The run's base model, with its attention kernel (and 4-bit weights for QLoRA, made ready to train)."""
    model = models.load_model(models.resolve_model(config.model), config.dtype, config.attention,
                              config.load_in_4bit)
    return models.prepare_4bit(model, config) if config.load_in_4bit else model


def fused_adamw_supported(params: list) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU, CUDA and a few others, all on one kind."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda", "mps", "xpu", "hpu"} and all(p.is_floating_point()
                                                                                     for p in params)


def resolved_precision(name: str) -> str:
    """auto: bf16 on GPUs that have it, fp16 (with accelerate's loss scaler) on older GPUs, none on CPU."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
