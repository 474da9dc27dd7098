"""Training settings: one typed dataclass, documented field by field.

The same fields become the options of `evertrain train` and `evertrain init` (see `add_arguments`),
the keys of a workspace's `evertrain.toml`, and `evertrain_config.json` beside every checkpoint.

    python -c "from evertrain.config import TrainConfig; print(TrainConfig())"
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

LR_SCHEDULES = ("constant", "inverse_sqrt", "wsd")
PRECISIONS = ("auto", "no", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
DTYPES = ("float32", "bfloat16", "float16")
MAX_LINE_BYTES, MAX_JSON_DEPTH = 16 << 20, 100  # the defaults of the two limits below (the containers use them too)
REPLAY_STRATEGIES = ("uniform", "weighted")
OVERLAP = ("auto", "on", "off")
FORGETTING_ACTIONS = ("off", "alert", "rollback", "retry")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio", "aim", "none")
# The keys of the data shapes (data/formats.py) that the `columns` setting may map a dataset's own fields onto.
FORMAT_KEYS: tuple[str, ...] = ("text", "prompt", "completion", "response", "messages", "conversations", "tools",
                                "functions", "instruction", "input", "output", "system", "history", "chosen",
                                "rejected", "label")
PREFERENCE_LOSSES = ("sigmoid", "ipo")
LONG_TEXT = ("window", "truncate")
SAMPLE_BY = ("line", "paragraph", "document")


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


def _opt(default, help: str, *, low=None, high=None, choices=None, flag: str | None = None, identity=False):
    """A config field; `low`/`high` bound numbers, `identity` marks settings that define the run."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "flag": flag, "identity": identity}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- the run's identity: fixed at the first step, a change is refused ---
    model: str | None = _opt(
        None, "local model directory or hub id; default: the embedded SmolLM2-135M-Instruct", identity=True)
    lora: bool = _opt(False, "train a LoRA adapter (--lora) instead of all weights (--full)", flag="lora/full",
                      identity=True)
    lora_r: int = _opt(16, "LoRA rank", low=1, identity=True)
    lora_alpha: int = _opt(32, "LoRA scaling numerator (scale = alpha / r)", low=1, identity=True)
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input", low=0.0, high=0.9, identity=True)
    lora_target_modules: str = _opt("all-linear", "comma-separated module names, or all-linear", identity=True)
    dtype: str = _opt("float32", "dtype the weights are loaded and kept in", choices=DTYPES, identity=True)
    load_in_4bit: bool = _opt(False, "QLoRA: load the base model's weights in 4 bits (bitsandbytes NF4; LoRA only) "
                              "so a 7-8B model fits a 24 GB card", flag="load-in-4bit/no-load-in-4bit",
                              identity=True)
    chat_template: str = _opt("", "chat template for conversations: empty = the model's own, chatml = a built-in "
                              "ChatML template (base models have none), or a FILE.jinja; saved with the tokenizer",
                              identity=True)

    # --- data ---
    columns: str = _opt("", "map a dataset's own field names onto a format's, e.g. question=prompt,answer=completion "
                        "(in evertrain.toml: a [data.columns] table)")
    max_line_bytes: int = _opt(MAX_LINE_BYTES, "a JSONL line longer than this many bytes is a bad record, skipped "
                               "without being read into memory (a longer CSV line or .json item fails its file)",
                               low=1024)
    max_json_depth: int = _opt(MAX_JSON_DEPTH, "a record nested deeper than this many arrays/objects is a bad record "
                               "(checked before it is parsed)", low=2, high=10000)
    long_text: str = _opt("window", "a text example longer than max_length: window (split into consecutive windows "
                          "of max_length tokens, every token trained once) or truncate (its first max_length tokens); "
                          "conversations and prompt/completion examples are always truncated", choices=LONG_TEXT)
    window_overlap: int = _opt(0, "long_text = window: tokens each window after the first repeats from the one "
                               "before as context (not trained again), below half of max_length", low=0)
    text_sample_by: str = _opt("line", "how a .txt or .md file splits into text examples, as the datasets library's "
                               "text builder does: line (each non-blank line), paragraph (text between empty "
                               "lines) or document (the whole file)", choices=SAMPLE_BY)

    # --- batches and steps ---
    batch_size: int = _opt(8, "rows per micro-batch on each process", low=1)
    gradient_accumulation: int = _opt(1, "micro-batches per optimizer step on each process", low=1)
    epochs: int = _opt(1, "times every example of a file is trained", low=1)
    max_length: int = _opt(1024, "tokens per row; longer texts are split into windows (long_text), other longer "
                           "examples are truncated (and counted)", low=8)
    packing: bool = _opt(True, "pack several examples into one row to avoid padding", flag="packing/no-packing")
    held_out_fraction: float = _opt(
        0.02, "fraction of each file's examples held out from training, to measure forgetting", low=0.0, high=0.5)
    held_out_max: int = _opt(64, "at most this many held-out examples per file", low=0)
    held_out_min_file: int = _opt(10, "a file of at least this many examples for which held_out_fraction gives no "
                                  "held-out example still holds out one, to measure its forgetting (0: only what "
                                  "the fraction gives; files the fraction gives a slice are not changed)", low=0)
    replay_fraction: float = _opt(0.25, "extra rows per step replayed from earlier files (and the anchor set, "
                                  "with anchor_replay), as a fraction of the global batch; 0.25 halves the "
                                  "forgetting in bench/forgetting.py (0: no replay)", low=0.0, high=1.0)
    replay_buffer: int = _opt(1024, "at most this many earlier examples kept for replay", low=1)
    replay_min_every: int = _opt(4, "with replay on: at least one replayed row every this many steps, however small "
                                 "the global batch (0: no floor)", low=0)
    replay_strategy: str = _opt("weighted", "uniform (every kept example alike), or weighted (toward the files whose "
                                "held-out loss rose most at the last forgetting gate)", choices=REPLAY_STRATEGIES)

    # --- the forgetting guard (gate.py, anchor.py) ---
    anchor_size: int = _opt(16, "prompts in the anchor set: taken at the run's first step from the first file and "
                            "the probes, answered by the base model itself; its loss and KL to the base measure "
                            "drift from what the base knew (0: no anchor)", low=0, high=1024)
    anchor_new_tokens: int = _opt(32, "tokens of each anchor answer the base model generates", low=1, high=512)
    anchor_replay: bool = _opt(True, "mix the anchor set into training like replay: the model rehearses what the "
                               "base answered (self-synthesized rehearsal)", flag="anchor-replay/no-anchor-replay")
    forgetting_tolerance: float = _opt(0.25, "the gate trips when a file raises an earlier file's held-out loss, or "
                                       "the anchor's, by more than this fraction of its value before the file",
                                       low=0.0)
    forgetting_action: str = _opt("alert", "what a tripped gate does: alert (record and notify; training goes on), "
                                  "rollback (back to the checkpoint before the file; the file is rejected), retry "
                                  "(train the file again from there with a stronger replay dose, once, then "
                                  "rollback), or off (no gate)", choices=FORGETTING_ACTIONS)
    retry_replay_boost: float = _opt(4.0, "a retry replays this many times the usual dose, anchor included",
                                     low=1.0, high=100.0)

    # --- learning from judgments: preference pairs (DPO) and rated answers (KTO); see docs/judgments.md ---
    beta: float = _opt(0.1, "preference and feedback files: how closely the model stays to its reference (the "
                       "model as it stood when the file began); larger stays closer. TRL's beta, the same default "
                       "for DPO and KTO (for IPO, its regularization)", low=1e-6, high=100.0)
    preference_loss: str = _opt("sigmoid", "the loss of a preference pair: sigmoid (DPO, Rafailov et al. 2023) or "
                                "ipo (Azar et al. 2023, with TRL's normalization by each answer's length)",
                                choices=PREFERENCE_LOSSES)
    rpo_alpha: float = _opt(0.0, "weight of the plain next-token loss of the preferred answer (a pair's chosen one, "
                            "a rated answer rated good) added to the preference or feedback loss: TRL's rpo_alpha "
                            "(its loss_type \"sft\" weight); 0: none", low=0.0, high=100.0)
    desirable_weight: float = _opt(1.0, "feedback files (KTO): the weight of the answers rated good", low=0.0,
                                   high=100.0)
    undesirable_weight: float = _opt(1.0, "feedback files (KTO): the weight of the answers rated bad", low=0.0,
                                     high=100.0)

    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass: much less memory for "
                                        "about a third more compute (large models on one GPU)",
                                        flag="gradient-checkpointing/no-gradient-checkpointing")

    # --- optimizer and schedule ---
    learning_rate: float = _opt(5e-5, "peak learning rate", low=0.0, high=1.0)
    lr_schedule: str = _opt("constant", "constant (after warmup), inverse_sqrt, or wsd (warmup-stable-decay)",
                            choices=LR_SCHEDULES)
    warmup_steps: int = _opt(20, "optimizer steps of linear warmup at the start of the run", low=0)
    decay_steps: int = _opt(0, "wsd only: start the decay to zero at this file's first step, over this many steps",
                            low=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", low=0.0, high=1.0)
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0 disables)", low=0.0)
    precision: str = _opt("auto", "mixed precision: auto (bf16 where the GPU has it, fp16 with a loss scaler on "
                          "older GPUs, none on CPU), no, bf16, fp16", choices=PRECISIONS)
    attention: str = _opt("auto", "attention kernel: auto (flash_attention_2 where installed, else flex_attention on "
                          "CUDA, else sdpa), or one by name; packed examples never attend to each other in any",
                          choices=ATTENTIONS)
    chunked_loss: bool = _opt(False, "compute the loss chunk by chunk, never the full logits: far less memory for a "
                              "large vocabulary, for one more multiply by the output layer in the backward pass",
                              flag="chunked-loss/no-chunked-loss")
    fused_optimizer: bool = _opt(True, "use torch's fused AdamW kernel (one kernel for all parameters)",
                                 flag="fused-optimizer/no-fused-optimizer")
    compile: bool = _opt(False, "torch.compile the model's forward pass (minutes of compiling at start; faster steps "
                         "on GPUs where bench/gpu.py says so)", flag="compile/no-compile")
    deterministic: bool = _opt(False, "PyTorch's deterministic algorithms: a resume on CUDA is then bitwise equal to "
                               "an uninterrupted run (CPU runs are deterministic anyway), at some cost in speed",
                               flag="deterministic/no-deterministic")
    seed: int = _opt(42, "seed of the data order and of initialisation", low=0)

    # --- checkpoints and logs ---
    save_steps: int = _opt(200, "also checkpoint every this many optimizer steps (0: only at the end of a file)",
                           low=0)
    overlap_checkpoints: str = _opt("auto", "write the checkpoints taken every save_steps from a copy in CPU memory, "
                                    "in a thread, while training goes on: auto (with one process on a GPU), on "
                                    "(with one process), off", choices=OVERLAP)
    keep_checkpoints: int = _opt(3, "complete checkpoints kept; the newest is never deleted", low=1)
    log_steps: int = _opt(10, "print a progress line every this many optimizer steps", low=1)
    eval_steps: int = _opt(0, "also evaluate all held-out slices every this many steps (0: at the end of "
                           "each file only)", low=0)
    snapshot_budget: float = _opt(0.03, "snapshots between a file's first and last step may cost at most this "
                                  "fraction of training time (0: none; above 1 is allowed); every file's last step "
                                  "gets one whatever the budget", low=0.0)
    snapshot_every: int = _opt(0, "also snapshot every this many steps of a file, whatever the budget (0: only as "
                               "the budget allows)", low=0)
    snapshot_per_file: int = _opt(4, "examples of each file tracked in evolution snapshots", low=0)
    snapshot_max_examples: int = _opt(32, "at most this many tracked examples from files (probes come on top)",
                                      low=1)
    snapshot_generate: int = _opt(2, "tracked examples that also get a greedy generation", low=0)
    snapshot_new_tokens: int = _opt(32, "tokens a snapshot generation may add", low=1)
    snapshot_seconds: float = _opt(2.0, "wall-clock limit of one snapshot generation", low=0.1)
    report_to: str = _opt("tensorboard", "trackers the metrics also go to, comma-separated: tensorboard, wandb, "
                          "mlflow, trackio, aim, or none (through accelerate; one tracker run per evertrain run)")
    trace: bool = _opt(False, "append one line per optimizer step to trace.jsonl (which lines it trained)",
                       flag="trace/no-trace")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that define a run; changing them mid-run would silently mix two models."""
        ident = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["identity"]}
        if not self.lora:
            for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
                ident.pop(name)
        if not self.load_in_4bit:
            ident.pop("load_in_4bit")  # runs from before the setting existed keep their identity
        return ident

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        return settings_from_dict(cls, values, source)


def settings_from_dict(cls, values: dict[str, Any], source: str):
    """Build a settings dataclass (TrainConfig, the daemon's DaemonConfig) from plain values, checked."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        return cls(**{k: _coerce(known[k], v, source) for k, v in values.items()})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    kind = _kind(f)
    if value is None and f.default is None:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{source}: {f.name} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _kind(f: dataclasses.Field) -> type:
    return {"bool": bool, "int": int, "float": float}.get(str(f.type), str)


def validate(config: TrainConfig) -> None:
    check_fields(config)
    unknown = [n for n in (x.strip() for x in config.report_to.split(",")) if n and n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"report_to {', '.join(unknown)}: not a tracker; choose from {', '.join(REPORT_TO)}")
    if config.decay_steps and config.lr_schedule != "wsd":
        raise ConfigError("decay_steps only applies to lr_schedule = wsd")
    if config.window_overlap and config.long_text != "window":
        raise ConfigError("window_overlap only applies to long_text = window")
    if config.window_overlap * 2 >= config.max_length:
        # each window must bring more new tokens than it repeats: the store stays under twice the text's tokens
        raise ConfigError(f"window_overlap must be below half of max_length ({config.max_length}), "
                          f"got {config.window_overlap}")
    if config.load_in_4bit and not config.lora:
        raise ConfigError("load_in_4bit (QLoRA) trains a LoRA adapter on frozen 4-bit weights: add --lora")
    if config.columns:
        try:
            parse_columns(config.columns)
        except ValueError as e:
            raise ConfigError(f"columns: {e}") from None


def check_fields(config) -> None:
    """Choices, finiteness and low/high bounds of every field of a settings dataclass."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if meta["low"] is not None and value < meta["low"]:
            raise ConfigError(f"{f.name} must be >= {meta['low']}, got {value!r}")
        if meta["high"] is not None and value > meta["high"]:
            raise ConfigError(f"{f.name} must be <= {meta['high']}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One command-line option per field of `cls`; unset options stay None (= keep the default/config)."""
    for f in fields(cls):
        meta, kind = f.metadata, _kind(f)
        default_text = "" if f.default is None else f" (default: {f.default})"
        if kind is bool:
            on, off = (meta["flag"] or f"{f.name}/no-{f.name}").split("/")
            parser.add_argument(f"--{on.replace('_', '-')}", dest=f.name, action="store_true", default=None,
                                help=meta["help"] + default_text)
            parser.add_argument(f"--{off.replace('_', '-')}", dest=f.name, action="store_false", default=None,
                                help=f"the opposite of --{on.replace('_', '-')}")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                                choices=meta["choices"], help=meta["help"] + default_text)


def overrides_from_args(args: argparse.Namespace, cls=TrainConfig) -> dict[str, Any]:
    """The settings of `cls` given on the command line (those not given are left out)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def parse_columns(text: str) -> dict[str, str]:
    """The `columns` setting: "question=prompt,answer=completion" -> {"question": "prompt", "answer": "completion"}."""
    columns: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue  # tolerate "a=b," and spaces
        if "=" not in item:
            raise ValueError(f'column mapping item "{item}" has no "=" (expected source=target, e.g. question=prompt)')
        source, target = (s.strip() for s in item.split("=", 1))
        if not source or not target:
            raise ValueError(f'column mapping item "{item}" has an empty side (expected source=target)')
        if source in columns:
            raise ValueError(f'column mapping names "{source}" twice')
        if target not in FORMAT_KEYS:
            raise ValueError(f'column mapping target "{target}" is not a format key (known: {", ".join(FORMAT_KEYS)})')
        columns[source] = target
    return columns
