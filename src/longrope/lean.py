"""The lean long-sequence forward (part of evaluation): final hidden states of one sequence with
nothing of size (tokens × vocab) or (tokens × intermediate) ever held, for evaluation and search.

Our own decoder loop over a transformers model's modules (embed_tokens; per layer
input_layernorm, self_attn.{q,k,v}_proj or Phi-3's fused qkv_proj, Qwen3's q_norm/k_norm,
o_proj, post_attention_layernorm, mlp; the final norm), no grad, no KV cache, no mask:

- every position-wise op (norms, projections, rotary, MLP, residual adds) runs over `chunk_size`
  positions at a time (by default sized to the model, `layer_chunk`: 4096 for 1B and 8B shapes,
  16384 for SmolLM2-135M); the residual stream (n × hidden) is updated in place;
- per layer, q, k and v are written chunk by chunk into token-major (n, heads, head_dim) buffers
  and attention is causal SDPA (`is_causal=True`: flash on CUDA) over the whole sequence, a group
  of KV heads per call; each call's output is written back over the q it consumed, so the layer
  holds hidden + q + k + v + one group's output (8B-shaped at 1M tokens, bf16: 8 + 8 + 2 + 2 + ~1 GiB);
- rotary: an attached `ScaledRotaryEmbedding` rotates each chunk (the fused Triton kernel on CUDA,
  no cos/sin table); a model's own transformers rotary module is called per chunk, or once for
  the whole sequence where its regime depends on the length (dynamic, longrope).

A batch of B sequences of one length (`final_hidden_states_batch`) runs the same loop over
(B, n, h) with B × chunk_size rows per position-wise op; with a `BatchedRotaryEmbedding` attached
each sample rotates with its own scaling (the search's batched candidate evaluation).

Llama, Mistral, Qwen2, Qwen3 and Phi-3 (fused projections, partial rotary) are supported;
`unsupported_reason` says why anything else (or a sliding window shorter than the sequence)
is left to transformers' own forward.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from . import nll
from . import scaling as sc
from .rotary import BatchedRotaryEmbedding, ScaledRotaryEmbedding, apply_rotary

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
DEFAULT_CHUNK = 4096  # the least positions per chunk of the position-wise ops (and the loss's chunk)
LAYER_BUDGET = 1 << 25  # elements of a chunk's widest activation when no chunk size is given
ATTENTION_BUDGET = 1 << 28  # output elements per SDPA call (512 MiB in bf16); whole KV groups
_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
# LONGROPE_SDPA_BACKENDS=cudnn,flash,efficient,math: the SDPA kernels the lean forward may use on
# CUDA, in order of preference (torch picks flash first by default; cuDNN's kernel can be faster
# on Hopper). Unset: torch's own choice. Measured by bench/throughput.py --sdpa-backends.
_backends_setting: str | None = None


def set_sdpa_backends(names: str | None) -> None:
    """Comma-separated preference (see SDPA_BACKENDS), or None for torch's default choice."""
    global _backends_setting
    if names:
        unknown = [n for n in names.split(",") if n.strip() not in SDPA_BACKENDS]
        if unknown:
            raise ValueError(f"SDPA backends: unknown {unknown}; choose from {', '.join(SDPA_BACKENDS)}")
    _backends_setting = names or None


set_sdpa_backends(os.environ.get("LONGROPE_SDPA_BACKENDS"))


def sdpa_preference(names: str | None, device: torch.device):
    """The context in which SDPA prefers the kernels `names` (comma-separated SDPA_BACKENDS keys,
    in order) on CUDA; elsewhere, or with no names, torch's own choice."""
    if not names or device.type != "cuda":
        return contextlib.nullcontext()
    backends = [getattr(SDPBackend, SDPA_BACKENDS[n.strip()]) for n in names.split(",")]
    return sdpa_kernel(backends, set_priority=True)


def layer_chunk(config, batch: int = 1) -> int:
    """Positions per chunk of the position-wise ops when the caller gives none: a power of two,
    at least DEFAULT_CHUNK, with the chunk's widest activation (the MLP's intermediate, or q, k and
    v together) for the whole batch under LAYER_BUDGET elements (64 MiB in bf16). Why not 4096
    for every model: an op over 4096 rows of a 135M model (SmolLM2, hidden 576) is too short to
    keep a GPU busy, so its layer loop becomes launch-bound (SmolLM2 at 512k tokens: 1.060× the
    time of transformers' modules with 4096, 0.999× with 65536). Llama-3.2-1B and Llama-3-8B
    shapes keep 4096; SmolLM2 gets 16384."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * (config.num_key_value_heads or config.num_attention_heads)) * head_dim
    width = max(getattr(config, "intermediate_size", 0) or 0, config.hidden_size, qkv)
    rows = LAYER_BUDGET // (width * max(1, int(batch)))
    return max(DEFAULT_CHUNK, 1 << max(0, rows.bit_length() - 1))


def _chunk(model, chunk_size: int | None, batch: int = 1) -> int:
    return layer_chunk(model.config, batch) if chunk_size is None else max(1, int(chunk_size))


def unsupported_reason(model, n_tokens: int) -> str | None:
    """None if the lean forward computes exactly what the model's own forward does for a
    sequence of `n_tokens`, else a short reason."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"architecture {kind!r} (supported: {', '.join(SUPPORTED)})"
    if model.training:
        return "model in training mode (dropout)"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if kind in ("qwen2", "qwen3") and "sliding_attention" not in (layer_types or ()):
        window = None
    if window is not None and n_tokens > window:
        return f"sliding-window attention ({window}) shorter than the sequence ({n_tokens})"
    base = nll.decoder(model)
    layer = base.layers[0]
    attn = layer.self_attn
    if not (hasattr(attn, "qkv_proj") or all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))):
        return f"{type(attn).__name__}: no q/k/v projections found"
    if not hasattr(base, "rotary_emb"):
        return "no model-level rotary_emb"
    return None


class _Rotary:
    """Rotates (B, c, heads, head_dim) chunks of q and k at positions [start, end) of n."""

    def __init__(self, module, n: int, like: torch.Tensor):
        self.module, self.n = module, n
        self.table = None
        if not isinstance(module, (ScaledRotaryEmbedding, BatchedRotaryEmbedding)):
            if sc.length_dependent(getattr(module, "rope_type", "default")):
                # transformers' module picks its regime from the largest position it is given:
                # take the whole sequence's table once
                self.table = module(like, torch.arange(n, device=like.device)[None])

    def __call__(self, q, k, start: int, end: int):
        positions = torch.arange(start, end, device=q.device)
        if isinstance(self.module, BatchedRotaryEmbedding):
            return self.module.rotate(q, k, positions, seq_len=self.n)
        if isinstance(self.module, ScaledRotaryEmbedding):  # token-major (B·c, heads, head_dim)
            b, c = q.shape[:2]
            q2, k2 = self.module.rotate(q.reshape(b * c, *q.shape[2:]), k.reshape(b * c, *k.shape[2:]),
                                        positions.repeat(b), seq_len=self.n)
            return q2.view(q.shape), k2.view(k.shape)
        if self.table is not None:
            cos, sin = self.table[0][:, start:end], self.table[1][:, start:end]
        else:
            cos, sin = self.module(q, positions[None])
        return apply_rotary(q, k, cos[0], sin[0], unsqueeze_dim=1)


def _qkv(attn, x: torch.Tensor, head_dim: int, n_q: int, n_kv: int):
    lead = x.shape[:-1]  # (rows,): the lean loop passes B·c rows
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection
        q, k, v = attn.qkv_proj(x).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = q.view(*lead, n_q, head_dim), k.view(*lead, n_kv, head_dim), v.view(*lead, n_kv, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def causal_attention_inplace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """Causal attention of token-major q (n, Hq, d) over k, v (n, Hk, d), Hq a multiple of Hk,
    or of a batch of them (B, n, H, d); the output replaces q. One SDPA call per group of KV heads
    (at most ATTENTION_BUDGET output elements, at least one KV head), so only one group's output
    exists besides the buffers."""
    if q.dim() == 3:
        q, k, v = q[None], k[None], v[None]
    b, n, n_q, d = q.shape
    n_kv = k.shape[2]
    rep = n_q // n_kv
    per_call = max(1, min(n_kv, ATTENTION_BUDGET // max(1, b * n * rep * d)))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d) views
    with sdpa_preference(_backends_setting, q.device):
        _attend_groups(qt, kt, vt, n_kv, rep, per_call, scale)


def _attend_groups(qt, kt, vt, n_kv: int, rep: int, per_call: int, scale: float) -> None:
    for g0 in range(0, n_kv, per_call):
        g1 = min(n_kv, g0 + per_call)
        qg, kg, vg = qt[:, g0 * rep:g1 * rep], kt[:, g0:g1], vt[:, g0:g1]
        if rep > 1 and _GQA:
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=True)
        else:
            if rep > 1:
                kg, vg = kg.repeat_interleave(rep, dim=1), vg.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
        qg.copy_(out)
        del out


def _decoder_layer(layer, hidden: torch.Tensor, rotary: _Rotary, chunk: int, config, keep_kv: bool = False):
    """One decoder layer over the residual stream `hidden` (B, n, h), in place. With `keep_kv`,
    returns the layer's rotated keys and values (B, n, kv_heads, head_dim) (a prefill's cache)."""
    attn = layer.self_attn
    b, n = hidden.shape[:2]
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.head_dim
    q = hidden.new_empty(b, n, n_q, head_dim)
    k = hidden.new_empty(b, n, n_kv, head_dim)
    v = hidden.new_empty(b, n, n_kv, head_dim)
    h = hidden.shape[-1]
    for s in range(0, n, chunk):  # position-wise ops see (B·c, h) rows
        e = min(n, s + chunk)
        qc, kc, vc = _qkv(attn, layer.input_layernorm(hidden[:, s:e].reshape(b * (e - s), h)), head_dim, n_q, n_kv)
        qc, kc, vc = (t.view(b, e - s, *t.shape[1:]) for t in (qc, kc, vc))
        qc, kc = rotary(qc, kc, s, e)
        q[:, s:e], k[:, s:e], v[:, s:e] = qc, kc, vc
    causal_attention_inplace(q, k, v, attn.scaling)
    kept = (k, v) if keep_kv else None
    del k, v
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hidden[:, s:e] += attn.o_proj(q[:, s:e].reshape(b * (e - s), n_q * head_dim)).view(b, e - s, h)
        x = layer.post_attention_layernorm(hidden[:, s:e].reshape(b * (e - s), h))
        hidden[:, s:e] += layer.mlp(x).view(b, e - s, h)
    return kept


@torch.inference_mode()
def final_hidden_states(model, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """(n, hidden) final (normed) hidden states of one sequence `input_ids` (n,) or (1, n).

    Raises ValueError for what `unsupported_reason` refuses. The loop is entered through the
    base model's module call, so hooks registered on `model.model` see a call with no attention
    mask and no cache, as they would see transformers' own lean call.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    return final_hidden_states_batch(model, ids[None], chunk_size)[0]


@torch.inference_mode()
def final_hidden_states_batch(model, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """(B, n, hidden) final (normed) hidden states of B sequences of one length, `input_ids`
    (B, n): the loop of `final_hidden_states` with B × `chunk_size` rows per position-wise op and
    causal attention within each sequence. The model's rotary module rotates every sample alike,
    except a `BatchedRotaryEmbedding` (of batch B), which gives each sample its own scaling."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2:
        raise ValueError(f"lean forward: expected input_ids (B, n), got shape {tuple(ids.shape)}")
    reason = unsupported_reason(model, ids.shape[1])
    if reason:
        raise ValueError(f"lean forward: unsupported: {reason}")
    base = nll.decoder(model)
    chunk = _chunk(model, chunk_size, ids.shape[0])
    module = base.rotary_emb
    if isinstance(module, BatchedRotaryEmbedding) and module.batch != ids.shape[0]:
        raise ValueError(f"lean forward: the attached BatchedRotaryEmbedding has batch {module.batch}, "
                         f"input_ids has {ids.shape[0]} sequences")

    def forward(input_ids=None, attention_mask=None, use_cache=False):
        hidden = base.embed_tokens(input_ids.to(base.embed_tokens.weight.device))
        run_layers(model, hidden, range(model.config.num_hidden_layers), chunk)
        return final_norm_(model, hidden, chunk)

    return _call_as_forward(base, forward, input_ids=ids, attention_mask=None, use_cache=False)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, chunk_size: int | None = None):
    """(the last position's final (normed) hidden state (1, h), a transformers `DynamicCache`
    holding every layer's rotated keys and values) of one sequence (n,) or (1, n): the lean
    forward that keeps K/V for generation. Beside the cache it holds only one layer's buffers,
    where transformers' own prefill also holds full-length MLP intermediates (SmolLM2 at 2M tokens:
    72.8 GiB peak for a 46 GiB cache). Raises ValueError for what `unsupported_reason` refuses."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    reason = unsupported_reason(model, ids.shape[1])
    if reason:
        raise ValueError(f"lean prefill: unsupported: {reason}")
    base = nll.decoder(model)
    if isinstance(base.rotary_emb, BatchedRotaryEmbedding):
        raise ValueError("lean prefill: a BatchedRotaryEmbedding is for batched scoring, not generation")

    def forward(input_ids=None, attention_mask=None, use_cache=True):
        hidden = base.embed_tokens(input_ids.to(base.embed_tokens.weight.device))
        cache = DynamicCache(config=model.config)
        run_layers(model, hidden, range(model.config.num_hidden_layers), chunk_size, cache=cache)
        return base.norm(hidden[:, -1:])[0], cache

    return _call_as_forward(base, forward, input_ids=ids, attention_mask=None, use_cache=True)


@torch.inference_mode()
def run_layers(model, hidden: torch.Tensor, layers: range, chunk_size: int | None = None,
               cache=None) -> torch.Tensor:
    """Decoder layers `layers` applied in place to the residual stream `hidden` (B, n, h) of
    positions 0..n-1: the body of the lean forward, exposed so that a forward can be split across
    processes (bench/resumable_forward.py saves `hidden` between layers). With a transformers
    `cache`, each layer's rotated keys and values go into it (`prefill`)."""
    base, chunk = nll.decoder(model), _chunk(model, chunk_size, hidden.shape[0])
    rotary = _Rotary(base.rotary_emb, hidden.shape[1], hidden)
    for i in layers:
        kv = _decoder_layer(base.layers[i], hidden, rotary, chunk, model.config, keep_kv=cache is not None)
        if kv is not None:
            cache.update(kv[0].transpose(1, 2), kv[1].transpose(1, 2), i)  # transformers keeps (B, heads, n, d)
    return hidden


@torch.inference_mode()
def final_norm_(model, hidden: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """The final norm over `hidden` (B, n, h), in place, `chunk_size` positions at a time."""
    b, n, h = hidden.shape
    norm, chunk = nll.decoder(model).norm, _chunk(model, chunk_size, b)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hidden[:, s:e] = norm(hidden[:, s:e].reshape(b * (e - s), h)).view(b, e - s, h)
    return hidden


def _call_as_forward(module: torch.nn.Module, fn, **kwargs):
    """module(**kwargs) with `fn` standing in for module.forward during the call (hooks run)."""
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(**kwargs)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
