"""`evertrain export`: one complete checkpoint -> a clean folder that loads anywhere, with its model card.

    evertrain export runs/main out/model                     # the newest complete checkpoint
    evertrain export /srv/ws out/model --step 120 --merge    # a LoRA run's pinned checkpoint, merged
    evertrain export runs/main out/model --gguf --quant q8_0 # and a GGUF file for llama.cpp / Ollama

Full run: config, safetensors weights (sharded above --max-shard-size), tokenizer with its chat template,
generation config. LoRA run: the adapter, with the base's hub id as `base_model_name_or_path` (never a path of
this machine), or with --merge the full model in the base's dtype (which needs no hub id: a base that is a local
folder is named so on the card). Never optimizer, scheduler or RNG state.
Everything is written into OUT's parent as a hidden temporary folder, then renamed to OUT: a reader never sees
half an export, and the checkpoint is only read (a daemon may go on training the same run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from evertrain.export import ExportError, Source, card, hub_id

ADAPTER_FILES = ("adapter_model.safetensors",)


def portable_base(source: Source, base_id: str | None) -> str:
    """The base model's name for another machine: --base-id, else the hub id the run knows; never a local path."""
    found = base_id or hub_id(source.config)
    if found is None:
        raise ExportError(f"{source.ckpt.path}: the base model is the local folder {source.config.model}, which "
                          "means nothing on another machine; pass --base-id ORG/NAME (its id on the hub)")
    return found


def export(source: Source, out: Path, *, merge: bool = False, gguf: bool = False, quant: str = "f16",
           base_id: str | None = None, force: bool = False, max_shard_size: str = "5GB",
           command: str = "") -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out}: exists and is not empty; choose another folder or pass --force to replace it")
    config = source.config
    # Only an adapter needs a base that others can find: a merged or full model stands alone.
    adapter = config.lora and not merge
    if gguf and adapter:
        raise ExportError(f"{source.ckpt.path}: a GGUF file holds a whole model; add --merge to export this LoRA "
                          "run's adapter merged into its base")
    base = portable_base(source, base_id) if adapter or base_id else hub_id(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 is for secrets; an export is meant to be shared
    try:
        if adapter:
            write_adapter(source, tmp, base)
        else:
            write_full(source, tmp, max_shard_size)
        files = {"gguf": None}
        if gguf:
            from evertrain.export import gguf as gguf_writer

            name = f"model-{quant}.gguf"
            gguf_writer.write(tmp, tmp / name, quant, name=Path(out).name, pre=gguf_writer.known_pre(config))
            files["gguf"] = name
        facts = card.lineage(source, base_model=base, export={
            "kind": "adapter" if adapter else "merged" if config.lora else "full",
            "command": command, **files})
        (tmp / card.LINEAGE_FILE).write_text(json.dumps(facts, indent=2))
        (tmp / "README.md").write_text(card.model_card(facts))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(source: Source):
    from evertrain import models

    try:
        return models.load_tokenizer(str(source.ckpt.path))
    except OSError as e:
        raise ExportError(f"{source.ckpt.path}: {e} (was it pruned while being read? pin it with "
                          "`evertrain pin STEP`)") from None


def load_model(source: Source, dtype: str | None = None):
    """The checkpoint's model, ready for inference; a LoRA run's adapter is applied to (not merged into) its base."""
    from evertrain import models

    config = source.config
    try:
        if not config.lora:
            model = models.load_model(str(source.ckpt.path), dtype or config.dtype)
        else:
            base = models.load_model(models.resolve_model(config.model), dtype or config.dtype)
            model = models.load_lora(base, source.ckpt.path, trainable=False)
    except OSError as e:
        raise ExportError(f"{source.ckpt.path}: {e} (was it pruned while being read? pin it with "
                          "`evertrain pin STEP`)") from None
    model.eval()
    model.config.use_cache = True  # training turned it off; generation wants it
    return model


def base_dtype(source: Source) -> str:
    """The dtype the base model was published in (its config), which a merged export keeps."""
    from transformers import AutoConfig

    from evertrain import models

    cfg = AutoConfig.from_pretrained(models.resolve_model(source.config.model))
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or source.config.dtype
    return str(dtype).removeprefix("torch.")


def write_full(source: Source, tmp: Path, max_shard_size: str) -> None:
    import torch

    model = load_model(source)
    if source.config.lora:
        model = model.merge_and_unload()
        model = model.to(getattr(torch, base_dtype(source)))
    model.config.use_cache = True
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    load_tokenizer(source).save_pretrained(tmp)


def write_adapter(source: Source, tmp: Path, base: str) -> None:
    from peft import PeftConfig

    adapter = PeftConfig.from_pretrained(source.ckpt.path)
    adapter.base_model_name_or_path = base
    adapter.inference_mode = True
    adapter.save_pretrained(tmp)
    for name in ADAPTER_FILES:
        shutil.copy2(source.ckpt.path / name, tmp / name)
    load_tokenizer(source).save_pretrained(tmp)
