"""A Hugging Face Llama-family folder -> one GGUF file (llama.cpp, Ollama, LM Studio), with the `gguf` package.

llama.cpp's own converter (convert_hf_to_gguf.py) is not on PyPI. The `gguf` package it ships is, and it holds
everything the conversion needs: the writer, the tensor names per architecture (`TensorNameMap`), the
quantizers, and the tokenizer readers (`BpeVocab`, `SpecialVocab`: merges, special ids, chat template). What is
left is the one layout change llama.cpp makes for Llama: q_proj and k_proj rows are permuted for its rotary
embedding (transformers' GGUF loader undoes exactly this on reading). Only the Llama architecture (Llama,
SmolLM, Mistral-style dense models with model_type "llama") is converted: it is the one tested, by reading the
file back with transformers' `gguf_file=` loader and comparing logits.

    evertrain export RUN OUT --gguf --quant q8_0        # OUT/model-q8_0.gguf beside the safetensors folder
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evertrain.export import ExportError

QUANTS = ("f16", "q8_0", "f32")


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k row order -> llama.cpp's (its convert_hf_to_gguf.py `LlamaModel.permute`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write(model_dir: Path, path: Path, quant: str = "f16", name: str = "", pre: str = "default") -> Path:
    """Write the safetensors model in `model_dir` (config.json, tokenizer) as a GGUF file at `path`.

    `pre` names the pre-tokenizer for llama.cpp (`tokenizer.ggml.pre`); llama.cpp's converter finds it by
    hashing the tokenizer's output on a test text, which needs its table: we know it only for the embedded model."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ExportError(f"{model_dir}: --gguf converts the Llama architecture only (this model is "
                          f"{config.model_type!r}); export without --gguf and use llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer_vocab(gguf, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    arch = gguf.MODEL_ARCH.LLAMA
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta")
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "f32": gguf.GGMLQuantizationType.F32}[quant]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "f32": gguf.LlamaFileType.ALL_F32}[quant]

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or Path(model_dir).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # no output tensor in the file: readers tie it to the embedding
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{model_dir}: tensor {hf_name} has no GGUF name for the Llama architecture")
        data = tensor.detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = llama_permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_permute(data, config.num_key_value_heads)
        tensor_type = qtype
        # As llama.cpp does: norms (1-D) stay f32; a matrix whose rows do not split into q8_0 blocks goes f16.
        if data.ndim == 1:
            tensor_type = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            tensor_type = gguf.GGMLQuantizationType.F16
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tokenizer_vocab(gguf, model_dir: Path):
    """The tokenizer as GGUF token lists: GPT-2-style BPE (SmolLM, Llama 3), else a sentencepiece Llama's."""
    for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            return kind(Path(model_dir))
        except (FileNotFoundError, TypeError, ValueError):
            continue
    raise ExportError(f"{model_dir}: --gguf needs a BPE (GPT-2 style) or a sentencepiece Llama tokenizer; "
                      "this one is neither")


def known_pre(config) -> str:
    """The embedded SmolLM2's pre-tokenizer, as its own GGUF file says; "default" for any other base."""
    if config.model not in (None, "embedded"):
        return "default"
    import gguf

    from evertrain import models

    field = gguf.GGUFReader(models.embedded_gguf()).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else "default"
