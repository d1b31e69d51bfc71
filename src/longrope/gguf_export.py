"""An extended model as a GGUF file for llama.cpp (and Ollama, LM Studio), written with the `gguf`
package: the model's weights and tokenizer, and the scaling as llama.cpp's LLaMA architecture
reads it (its source, src/llama-model.cpp and src/llama-context.cpp):

- `rope_freqs.weight`, one float per frequency pair: llama.cpp divides pair i's frequency by it
  (the tensor Llama 3.1's scaling travels in) - LongRoPE's λ_i, the long factors;
- `llama.rope.scaling.attn_factor`: llama.cpp multiplies cos/sin by it (`cparams.yarn_attn_factor
  *= hparams.rope_attn_factor`, with the scaling type none, so no YaRN ramp of its own) - the
  temperature, as transformers' longrope applies it;
- `llama.context_length`: the target length; `llama.rope.scaling.original_context_length`: L.

What GGUF cannot say: n̂ > 0 (positions below n̂ unscaled) - refused unless `drop_n_hat`; and the
short regime - llama.cpp applies the long factors to every prompt, as vLLM does.

Llama, Mistral and Qwen2 (its q/k/v biases are optional tensors of llama.cpp's LLaMA architecture)
go out as `llama`; q and k are permuted from Hugging Face's half-split rotary layout to llama.cpp's
interleaved pairs (`_interleave_heads`), as llama.cpp's own converter does for these models.

Phi-3 goes out as llama.cpp's `phi3`, with its native `rope_factors_long` / `rope_factors_short`
tensors (no permutation: its rotary is the half-split one). llama.cpp chooses between them by the
context allocated (n_ctx above the original length: long), not by the prompt's length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import models, runs
from . import scaling as sc
from .errors import UsageError

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"
# Hugging Face class -> llama.cpp architecture
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
                 "Phi3ForCausalLM": "phi3"}


@dataclass(frozen=True)
class RopeInGGUF:
    """What the GGUF file says of positions (also what `read_rope` reads back)."""

    freq_factors: tuple[float, ...]  # rope_freqs (llama) / rope_factors_long (phi3): pair i's frequency / it
    attn_factor: float
    context_length: int
    original_context_length: int
    freq_base: float
    rope_dimension: int
    short_factors: tuple[float, ...] | None = None  # phi3's rope_factors_short (llama: none)


def rope_in_gguf(scaling: sc.Scaling, info: models.RopeInfo, drop_n_hat: bool = False) -> RopeInGGUF:
    """The scaling as GGUF keys, for any scaling whose long regime is per-pair factors and an
    attention factor (LongRoPE, PI, NTK, YaRN: `scaling.equivalent_factors`). UsageError if it
    cannot be said: n̂ > 0 without `drop_n_hat`, or a scaling without a target length."""
    target = getattr(scaling, "target_length", None)
    if not target:
        raise UsageError(f"--format gguf: the {scaling.rope_type} scaling has no target length; give --target-length")
    if getattr(scaling, "n_hat", 0) and not drop_n_hat:
        raise UsageError(f"--format gguf: n_hat = {scaling.n_hat} (positions left unscaled) has no GGUF key; "
                         "pass --drop-n-hat to export without it (positions below it then use the factors too)")
    beyond = target + 1  # the long regime, as llama.cpp applies it to every position
    longrope = isinstance(scaling, sc.LongRoPEScaling)
    factors = (scaling.long_factor if longrope  # λ exactly, not a float32 quotient
               else sc.equivalent_factors(scaling, info.dim, info.base, beyond).tolist())
    short = (scaling.short_factor or (1.0,) * len(factors)) if longrope else (1.0,) * len(factors)
    return RopeInGGUF(tuple(float(f) for f in factors), float(scaling.attention_factor(beyond)), int(target),
                      int(info.original_length), float(info.base), int(info.dim), tuple(float(f) for f in short))


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("--format gguf needs the gguf package: pip install 'longrope[gguf]'") from None
    return gguf


def check_exportable(arch: str, gguf_type: str) -> None:
    """One-line refusals before anything is written (`arch`: the model class, or config.json's
    `architectures[0]` before loading)."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"--format gguf: {arch} is not supported (supported: {', '.join(ARCHITECTURES)}); "
                         "export a Hugging Face checkpoint instead")
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf-type {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")


def _interleave_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from Hugging Face's rotary layout (first halves, then second halves of the
    pairs) to llama.cpp's (the two members of a pair adjacent): rows (h, 2, d/2) -> (h, d/2, 2)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensor_type(gguf, data: np.ndarray, gguf_type: str):
    """(data, raw type) in the file: matrices in the asked type, vectors (norms, biases, rope_freqs) in f32."""
    if data.ndim < 2 or gguf_type == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if gguf_type == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.Q8_0
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16  # rows not a multiple of the block
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def _tokenizer_keys(gguf, writer, tokenizer, tokenizer_folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style: Llama 3, Mistral-Nemo, Qwen2, SmolLM2...) as
    llama.cpp's `gpt2` vocabulary: tokens in id order, their types, merges and special ids."""
    spec = json.loads((tokenizer_folder / "tokenizer.json").read_text())
    if spec.get("model", {}).get("type") != "BPE":
        raise UsageError("--format gguf: only byte-level BPE tokenizers are written (this one is "
                         f"{spec.get('model', {}).get('type')}); convert with llama.cpp's convert_hf_to_gguf.py")
    if not spec["model"].get("merges"):
        # llama.cpp's gpt2 vocabulary must have merges; a BPE without any (a byte-level vocabulary,
        # like the bundled models') goes out as "none": llama.cpp then takes token ids, not text
        writer.add_tokenizer_model("none")
        return
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else
                         gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # llama.cpp's generic GPT-2 split; token ids are unaffected
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def export_gguf(model, tokenizer, scaling: sc.Scaling, out: str | os.PathLike, gguf_type: str = "f16",
                drop_n_hat: bool = False, force: bool = False) -> Path:
    """Write `out`/model.gguf (through `runs.staged`, so `out` is whole or absent) carrying
    `scaling` as `RopeInGGUF` says, plus longrope.json (the scaling, for the record)."""
    gguf = _gguf()
    config = model.config
    check_exportable(type(model).__name__, gguf_type)
    arch_name = ARCHITECTURES[type(model).__name__]
    arch = gguf.MODEL_ARCH.PHI3 if arch_name == "phi3" else gguf.MODEL_ARCH.LLAMA
    info = models.rope_info(config)
    rope = rope_in_gguf(scaling, info, drop_n_hat)
    runs.check_out(out, force=force, inputs=[getattr(model, "_longrope_source", None)])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads token_embd as the output then
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    with runs.staged(out, force, command="export") as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")  # what SpecialVocab reads (merges, special ids, template)
        writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(str(getattr(config, "_name_or_path", "") or "longrope export"))
        writer.add_context_length(rope.context_length)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(rope.rope_dimension)
        writer.add_rope_freq_base(rope.freq_base)
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)  # no YaRN ramp or linear scale of llama.cpp's own
        writer.add_rope_scaling_attn_factors(rope.attn_factor)
        writer.add_rope_scaling_orig_ctx_len(rope.original_context_length)
        writer.add_file_type(file_type)
        _tokenizer_keys(gguf, writer, tokenizer, tmp / "tokenizer", config.vocab_size)
        if arch_name == "phi3":  # its native pair, chosen by llama.cpp from the context allocated
            writer.add_tensor("rope_factors_long.weight", np.asarray(rope.freq_factors, dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.asarray(rope.short_factors, dtype=np.float32))
        else:
            writer.add_tensor("rope_freqs.weight", np.asarray(rope.freq_factors, dtype=np.float32))
        for hf_name, data in state.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UsageError(f"--format gguf: no GGUF name for the tensor {hf_name}")
            if arch_name == "llama" and ".q_proj." in hf_name:
                data = _interleave_heads(data, heads)
            elif arch_name == "llama" and ".k_proj." in hf_name:
                data = _interleave_heads(data, kv_heads)
            data, raw_type = _tensor_type(gguf, data, gguf_type)
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / models.SIDECAR).write_text(scaling.to_json())
    return Path(out) / GGUF_FILE


def read_rope(path: str | os.PathLike) -> RopeInGGUF:
    """What a GGUF file says of positions, read back with gguf's reader."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))

    def value(key: str):  # a scalar or a string key; `parts` is how every gguf >= 0.10 stores a value
        field = reader.fields[key]
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part[0]

    arch = str(value("general.architecture"))
    tensors = {t.name: tuple(float(x) for x in np.asarray(t.data, dtype=np.float64).tolist())
               for t in reader.tensors if t.name.startswith(("rope_freqs", "rope_factors"))}
    return RopeInGGUF(tensors.get("rope_freqs.weight") or tensors["rope_factors_long.weight"],
                      float(value(f"{arch}.rope.scaling.attn_factor")), int(value(f"{arch}.context_length")),
                      int(value(f"{arch}.rope.scaling.original_context_length")),
                      float(value(f"{arch}.rope.freq_base")), int(value(f"{arch}.rope.dimension_count")),
                      tensors.get("rope_factors_short.weight"))
