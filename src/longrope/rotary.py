"""The rotary module that turns positions into cos/sin for any scaling, precisely.

Precision: transformers computes `position.float() @ inv_freq.float()`. At position 2,097,151 a
float32 angle of ~2e6 rad has a spacing of 0.25 rad, and θ_i rounded to float32 adds up to
2e6 · 6e-8 ≈ 0.12 rad more, so cos/sin can be off by ~0.06 or worse. We form the angle in
float64 from float64 inverse frequencies, reduce it modulo 2π (exact enough: float64 keeps ~1e-9
rad at 2e6), and only then go to float32 for cos/sin. The cos/sin error is then ~1e-7 at any
position a model will ever see.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .scaling import LongRoPEScaling, Scaling, rope_inv_freq

TWO_PI = 2 * math.pi


def precise_angles(positions: torch.Tensor, inv_freq64: torch.Tensor) -> torch.Tensor:
    """float32 angles in [0, 2π) for integer `positions` (...,) and float64 `inv_freq64` (d/2,).

    The product is taken in float64 and reduced modulo 2π before rounding to float32.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq64.to(positions.device)
    return torch.remainder(angles, TWO_PI).to(torch.float32)


class ScaledRotaryEmbedding(nn.Module):
    """Drop-in replacement for a transformers model's `rotary_emb` (Llama, Mistral, Qwen2/3, Phi-3).

    forward(x, position_ids) -> (cos, sin), each (batch, seq, dim) in x.dtype, laid out as
    transformers' `rotate_half` convention expects (the d/2 angles repeated twice).

    The regime (short or long factors, dynamic NTK's base) is chosen from the largest position in
    the batch, as transformers does; positions below the scaling's n̂ use the unscaled frequencies
    and no attention factor.
    """

    def __init__(self, scaling: Scaling, dim: int, base: float):
        super().__init__()
        self.scaling = scaling.validate(dim)
        self.dim = dim
        self.base = float(base)
        # float64 inverse frequencies live in a per-(regime, device) cache rather than in
        # buffers, so that model.to(torch.bfloat16) can never round them.
        self._cache: dict[tuple, torch.Tensor] = {}

    # the attention factor and inverse frequencies depend only on (regime, device)
    def _inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        key = self._regime_key(seq_len), str(device)
        if key not in self._cache:
            self._cache[key] = self.scaling.inv_freq(self.dim, self.base, seq_len).to(device)
        return self._cache[key]

    def _regime_key(self, seq_len: int):
        if self.scaling.rope_type == "dynamic":
            return max(seq_len, self.scaling.original_max_position_embeddings)
        if isinstance(self.scaling, LongRoPEScaling):
            return self.scaling.is_long(seq_len)
        return None

    def cos_sin(self, position_ids: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (…, dim) cos and sin for integer `position_ids`; `seq_len` picks the regime
        (default: largest position + 1)."""
        if seq_len is None:
            seq_len = int(position_ids.max().item()) + 1 if position_ids.numel() else 1
        device = position_ids.device
        angles = precise_angles(position_ids, self._inv_freq(seq_len, device))
        scale = self.scaling.attention_factor(seq_len)
        n_hat = self.scaling.n_hat
        if n_hat:
            # the first n̂ positions keep the pretrained frequencies and no temperature
            key = ("unscaled", str(device))
            if key not in self._cache:
                self._cache[key] = rope_inv_freq(self.dim, self.base).to(device)
            start = (position_ids < n_hat).unsqueeze(-1)
            angles = torch.where(start, precise_angles(position_ids, self._cache[key]), angles)
            scale = torch.where(start, 1.0, torch.tensor(scale, dtype=torch.float32, device=device))
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos() * scale, emb.sin() * scale

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
        cos, sin = self.cos_sin(position_ids)
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scaling={self.scaling.rope_type}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rotary application (transformers' convention); partial rotary: the first
    cos.shape[-1] channels rotate, the rest pass through."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def rotate(t):
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        return torch.cat((t_rot * cos + rotate_half(t_rot) * sin, t_pass), dim=-1)

    return rotate(q), rotate(k)
