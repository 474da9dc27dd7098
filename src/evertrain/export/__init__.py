"""Taking the model out of a run: a clean Hugging Face folder (or GGUF file), its lineage, a chat with it.

    evertrain export RUN OUT [--step N] [--merge] [--gguf [--quant q8_0]] [--base-id ID]
    evertrain lineage RUN [--step N] [--json]
    evertrain chat RUN [--step N] [--compare STEP|base] [--prompt TEXT]

RUN is a workspace or the --output-dir of `evertrain train`. Everything here only reads complete checkpoints
(their manifest verified), so it runs beside a daemon training the same run and never holds its lock.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from evertrain.config import ConfigError, TrainConfig
from evertrain.runs import Run, open_run, saved_settings
from evertrain.train import checkpoint

# The embedded default model (models.EMBEDDED_NAME) is this model of the hub, converted from its GGUF file.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ExportError(ConfigError):
    """Bad input to export, lineage or chat: one line, exit 2 (exits.BAD_INPUT)."""


@dataclass
class Source:
    """One complete checkpoint of a run, with the run's settings as that checkpoint saved them."""

    run: Run
    ckpt: checkpoint.Checkpoint
    config: TrainConfig

    @property
    def step(self) -> int:
        return self.ckpt.step


def open_source(root: Path, step: int | None = None) -> Source:
    """The newest complete checkpoint of the run in `root`, or the one of global step `step`; verified."""
    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"{root}: no such folder (give a workspace or the --output-dir of `evertrain train`)")
    run = open_run(root)
    found = checkpoint.candidates(run.run_dir)
    if step is None:
        ckpt = checkpoint.newest_complete(run.run_dir, warn=lambda text: print(text, file=sys.stderr))
        if ckpt is None:
            raise ExportError(f"{run.run_dir}: no complete checkpoint" + (
                " (" + "; ".join(f"{c.name}: {checkpoint.verify(c, full=False) or 'does not verify'}"
                                 for c in found) + ")" if found else ""))
        return Source(run, ckpt, saved_config(ckpt))
    ckpt = next((c for c in found if c.step == step), None)
    if ckpt is None:
        have = ", ".join(str(c.step) for c in reversed(found)) or "none"
        raise ExportError(f"{run.run_dir}: no checkpoint of global step {step} (steps there: {have})")
    problem = checkpoint.verify(ckpt)
    if problem is not None:
        raise ExportError(f"{ckpt.path}: incomplete or damaged checkpoint ({problem}); nothing was read from it")
    return Source(run, ckpt, saved_config(ckpt))


def saved_config(ckpt: checkpoint.Checkpoint) -> TrainConfig:
    """The settings the checkpoint was written with; refused when it has none (every checkpoint has them)."""
    values = saved_settings(ckpt.path)
    if not values:
        raise ExportError(f"{ckpt.path}: its settings (evertrain_config.json) are missing or unreadable")
    return TrainConfig.from_dict(values, source=str(ckpt.path))


def hub_id(config: TrainConfig) -> str | None:
    """The base model's hub id when the run names one: the embedded model's, or a --model that is no local path."""
    if config.model in (None, "embedded"):
        return EMBEDDED_HUB_ID
    if not Path(config.model).expanduser().exists() and config.model.count("/") == 1:
        return config.model
    return None
