"""The lean long-sequence forward (part of evaluation): final hidden states of one sequence with
nothing of size (tokens × vocab) or (tokens × intermediate) ever held, for evaluation and search.

Our own decoder loop over a transformers model's modules (embed_tokens; per layer
input_layernorm, self_attn.{q,k,v}_proj or Phi-3's fused qkv_proj, Qwen3's q_norm/k_norm,
o_proj, post_attention_layernorm, mlp; the final norm), no grad, no KV cache, no mask:

- every position-wise op (norms, projections, rotary, MLP, residual adds) runs over `chunk_size`
  positions at a time; the residual stream (n × hidden) is updated in place;
- per layer, q, k and v are written chunk by chunk into token-major (n, heads, head_dim) buffers
  and attention is causal SDPA (`is_causal=True`: flash on CUDA) over the whole sequence, a group
  of KV heads per call; each call's output is written back over the q it consumed, so the layer
  holds hidden + q + k + v + one group's output (8B-shaped at 1M tokens, bf16: 8 + 8 + 2 + 2 + ~1 GiB);
- rotary: an attached `ScaledRotaryEmbedding` rotates each chunk (the fused Triton kernel on CUDA,
  no cos/sin table); a model's own transformers rotary module is called per chunk, or once for
  the whole sequence where its regime depends on the length (dynamic, longrope).

Llama, Mistral, Qwen2, Qwen3 and Phi-3 (fused projections, partial rotary) are supported;
`unsupported_reason` says why anything else (or a sliding window shorter than the sequence)
is left to transformers' own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rotary import ScaledRotaryEmbedding, apply_rotary

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
DEFAULT_CHUNK = 4096
ATTENTION_BUDGET = 1 << 28  # output elements per SDPA call (512 MiB in bf16); whole KV groups
_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


def _base(model):
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model.get_decoder()


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
    base = _base(model)
    layer = base.layers[0]
    attn = layer.self_attn
    if not (hasattr(attn, "qkv_proj") or all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))):
        return f"{type(attn).__name__}: no q/k/v projections found"
    if not hasattr(base, "rotary_emb"):
        return "no model-level rotary_emb"
    return None


class _Rotary:
    """Rotates (c, heads, head_dim) chunks of q and k at positions [start, end) of n."""

    def __init__(self, module, n: int, like: torch.Tensor):
        self.module, self.n = module, n
        self.table = None
        if not isinstance(module, ScaledRotaryEmbedding):
            kind = getattr(module, "rope_type", "default")
            if "dynamic" in kind or kind == "longrope":  # the regime depends on the largest position
                self.table = module(like, torch.arange(n, device=like.device)[None])

    def __call__(self, q, k, start: int, end: int):
        positions = torch.arange(start, end, device=q.device)
        if isinstance(self.module, ScaledRotaryEmbedding):
            return self.module.rotate(q, k, positions, seq_len=self.n)
        if self.table is not None:
            cos, sin = self.table[0][:, start:end], self.table[1][:, start:end]
        else:
            cos, sin = self.module(q, positions[None])
        return apply_rotary(q, k, cos[0], sin[0], unsqueeze_dim=1)


def _qkv(attn, x: torch.Tensor, head_dim: int, n_q: int, n_kv: int):
    c = x.shape[0]
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection
        q, k, v = attn.qkv_proj(x).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = q.view(c, n_q, head_dim), k.view(c, n_kv, head_dim), v.view(c, n_kv, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def causal_attention_inplace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """Causal attention of token-major q (n, Hq, d) over k, v (n, Hk, d), Hq a multiple of Hk;
    the output replaces q. One SDPA call per group of KV heads (at most ATTENTION_BUDGET output
    elements, at least one KV head), so only one group's output exists besides the buffers."""
    n, n_q, d = q.shape
    n_kv = k.shape[1]
    rep = n_q // n_kv
    per_call = max(1, min(n_kv, ATTENTION_BUDGET // max(1, n * rep * d)))
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, n, d) views
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


def _decoder_layer(layer, hidden: torch.Tensor, rotary: _Rotary, chunk: int, config) -> None:
    """One decoder layer over the residual stream `hidden` (n, h), in place."""
    attn = layer.self_attn
    n = hidden.shape[0]
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.head_dim
    q = hidden.new_empty(n, n_q, head_dim)
    k = hidden.new_empty(n, n_kv, head_dim)
    v = hidden.new_empty(n, n_kv, head_dim)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        qc, kc, vc = _qkv(attn, layer.input_layernorm(hidden[s:e]), head_dim, n_q, n_kv)
        qc, kc = rotary(qc, kc, s, e)
        q[s:e], k[s:e], v[s:e] = qc, kc, vc
    causal_attention_inplace(q, k, v, attn.scaling)
    del k, v
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hidden[s:e] += attn.o_proj(q[s:e].reshape(e - s, n_q * head_dim))
        hidden[s:e] += layer.mlp(layer.post_attention_layernorm(hidden[s:e]))


@torch.inference_mode()
def final_hidden_states(model, input_ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(n, hidden) final (normed) hidden states of one sequence `input_ids` (n,) or (1, n).

    Raises ValueError for what `unsupported_reason` refuses. The loop is entered through the
    base model's module call, so hooks registered on `model.model` see a call with no attention
    mask and no cache, as they would see transformers' own lean call.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    reason = unsupported_reason(model, ids.numel())
    if reason:
        raise ValueError(f"lean forward: unsupported: {reason}")
    base = _base(model)
    chunk = max(1, int(chunk_size))

    def forward(input_ids=None, attention_mask=None, use_cache=False):
        ids = input_ids.reshape(-1).to(base.embed_tokens.weight.device)
        n = ids.numel()
        hidden = base.embed_tokens(ids)
        rotary = _Rotary(base.rotary_emb, n, hidden)
        for layer in base.layers[:model.config.num_hidden_layers]:
            _decoder_layer(layer, hidden, rotary, chunk, model.config)
        for s in range(0, n, chunk):
            hidden[s:s + chunk] = base.norm(hidden[s:s + chunk])
        return hidden

    return _call_as_forward(base, forward, input_ids=ids[None], attention_mask=None, use_cache=False)


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
