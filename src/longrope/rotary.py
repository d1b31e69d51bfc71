"""The rotary module that turns positions into cos/sin for any scaling, precisely (the angle
math is `phase`'s: float64 angles reduced modulo 2π before float32)."""

from __future__ import annotations

import torch
from torch import nn

from .phase import MAX_SPLIT_POSITION, TWO_PI, cos_sin, phase_constants, reduced_angles64
from .scaling import Scaling, rope_inv_freq


def fused_available(t: torch.Tensor) -> bool:
    """True if the Triton kernel can run on `t` (a CUDA tensor and triton importable)."""
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401  (optional: the fused kernel's compiler, GPU machines only)
    except ImportError:
        return False
    return True


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
    def inv_freq64(self, seq_len: int, device: torch.device) -> torch.Tensor:
        key = self.scaling.regime(seq_len), str(device)
        if key not in self._cache:
            self._cache[key] = self.scaling.inv_freq(self.dim, self.base, seq_len).to(device)
        return self._cache[key]

    def cos_sin(self, position_ids: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (…, dim) cos and sin for integer `position_ids`; `seq_len` picks the regime
        (default: largest position + 1)."""
        if seq_len is None:
            seq_len = int(position_ids.max().item()) + 1 if position_ids.numel() else 1
        device = position_ids.device
        angles = reduced_angles64(position_ids, self.inv_freq64(seq_len, device))
        scale = self.scaling.attention_factor(seq_len)
        n_hat = self.scaling.n_hat
        if n_hat:
            # the first n̂ positions keep the pretrained frequencies and no temperature
            key = ("unscaled", str(device))
            if key not in self._cache:
                self._cache[key] = rope_inv_freq(self.dim, self.base).to(device)
            start = (position_ids < n_hat).unsqueeze(-1)
            angles = torch.where(start, reduced_angles64(position_ids, self._cache[key]), angles)
            scale = torch.where(start, 1.0, torch.tensor(scale, dtype=torch.float32, device=device))
        cos, sin = cos_sin(angles)
        return torch.cat((cos, cos), dim=-1) * scale, torch.cat((sin, sin), dim=-1) * scale

    def phase_constants(self, seq_len: int, device: torch.device, unscaled: bool = False) -> torch.Tensor:
        """`phase_constants` of this module's inverse frequencies for the regime of `seq_len`
        (or of the unscaled frequencies used below n̂), cached per device."""
        key = ("phase", "unscaled" if unscaled else self.scaling.regime(seq_len), str(device))
        if key not in self._cache:
            inv = rope_inv_freq(self.dim, self.base) if unscaled else self.inv_freq64(seq_len, torch.device("cpu"))
            self._cache[key] = phase_constants(inv).to(device)
        return self._cache[key]

    @torch.no_grad()
    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, seq_len: int | None = None,
               fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (n, heads, head_dim) and k (n, kv_heads, head_dim) at integer `positions` (n,),
        token-major as the projections produce them; the first `dim` channels rotate (partial
        rotary), the rest pass through. `seq_len` picks the regime (default: largest position + 1)
        and must exceed every position.

        On CUDA with triton (`fused=None`) the fused kernel rotates q and k in place, forming the
        angles on the fly from the positions (no cos/sin table); otherwise, or with `fused=False`,
        the PyTorch reference: cos_sin in float32, rounded to q's dtype, `apply_rotary`.
        Returns the rotated (q, k); use the returned tensors, the inputs may or may not be reused.
        """
        if seq_len is None:
            seq_len = int(positions.max().item()) + 1 if positions.numel() else 1
        if fused is None:
            fused = fused_available(q) and seq_len <= MAX_SPLIT_POSITION
        if fused:
            from .rotary_triton import rotate_inplace  # imports triton (optional, checked above)

            n_hat = self.scaling.n_hat
            rotate_inplace(q, k, positions, self.phase_constants(seq_len, q.device),
                           self.phase_constants(seq_len, q.device, unscaled=True) if n_hat else None,
                           self.scaling.attention_factor(seq_len), n_hat)
            return q, k
        cos, sin = self.cos_sin(positions, seq_len)
        return apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=1)

    # The sequence length that picks the regime in `forward` when positions are a slice of a longer
    # sequence (context parallelism: `parallel.global_regime`); None: the largest position + 1.
    regime_length: int | None = None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
        cos, sin = self.cos_sin(position_ids, self.regime_length)
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scaling={self.scaling.rope_type}"


class BatchedRotaryEmbedding(nn.Module):
    """Rotary for a batch whose samples each use their own scaling: sample b rotates with the
    float64 inverse frequencies `inv_freq64[b]` (B, d/2), n̂ `n_hat[b]` and attention factor
    `attention_factor[b]`, exactly as a `ScaledRotaryEmbedding` of that sample's scaling would for
    the regime those were taken at (`from_scalings`: one sequence length for the whole batch).

    Used by the batched candidate evaluation of the search: one forward over K candidates × the
    windows. `rotate(q, k, positions)` takes q (B, c, heads, head_dim), k (B, c, kv_heads,
    head_dim) and positions (c,) shared by every sample (the lean forward); `forward(x,
    position_ids)` returns (B, n, dim) cos/sin for transformers' own forward.
    """

    def __init__(self, inv_freq64: torch.Tensor, n_hat, attention_factor, dim: int, base: float):
        super().__init__()
        inv = torch.as_tensor(inv_freq64, dtype=torch.float64).detach().cpu()
        if inv.dim() != 2 or inv.shape[1] != dim // 2:
            raise ValueError(f"BatchedRotaryEmbedding: inv_freq64 must be (batch, {dim // 2}), got {tuple(inv.shape)}")
        self.batch = inv.shape[0]
        self.n_hats = [int(x) for x in n_hat]
        self.factors = [float(x) for x in attention_factor]
        if len(self.n_hats) != self.batch or len(self.factors) != self.batch:
            raise ValueError("BatchedRotaryEmbedding: one n_hat and one attention factor per sample")
        self.inv_freq64 = inv  # a plain attribute, never a buffer: model.to(bf16) must not round it
        self.dim = dim
        self.base = float(base)
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_scalings(cls, scalings, dim: int, base: float, seq_len: int) -> "BatchedRotaryEmbedding":
        """One sample per scaling (repeat a scaling for several windows), each in the regime of
        `seq_len` (short or long factors, attention factor) as `ScaledRotaryEmbedding` picks it."""
        scalings = [s.validate(dim) for s in scalings]
        inv = torch.stack([s.inv_freq(dim, base, seq_len).double().cpu() for s in scalings])
        return cls(inv, [s.n_hat for s in scalings], [s.attention_factor(seq_len) for s in scalings], dim, base)

    def _get(self, name: str, device: torch.device) -> torch.Tensor:
        key = name, str(device)
        if key not in self._cache:
            if name == "inv":
                value = self.inv_freq64
            elif name == "unscaled":
                value = rope_inv_freq(self.dim, self.base).double()
            elif name == "scale":
                value = torch.tensor(self.factors, dtype=torch.float32)
            elif name == "n_hat":
                value = torch.tensor(self.n_hats, dtype=torch.long)
            elif name == "phase":
                value = torch.stack([phase_constants(row) for row in self.inv_freq64])
            else:  # "phase0"
                value = phase_constants(rope_inv_freq(self.dim, self.base))
            self._cache[key] = value.to(device)
        return self._cache[key]

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (B, n, dim) cos and sin for integer positions (n,) shared by the samples or
        (B, n), with the same float64 angle arithmetic as `ScaledRotaryEmbedding.cos_sin`."""
        device = position_ids.device
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        inv = self._get("inv", device)
        angles = torch.remainder(pos.to(torch.float64).unsqueeze(-1) * inv[:, None, :], TWO_PI)
        scale = self._get("scale", device)[:, None, None]
        if any(self.n_hats):
            start = (pos.unsqueeze(-1) < self._get("n_hat", device)[:, None, None])  # (B, n, 1)
            angles = torch.where(start, reduced_angles64(pos, self._get("unscaled", device)), angles)
            scale = torch.where(start, 1.0, scale)
        cos, sin = cos_sin(angles)
        return torch.cat((cos, cos), dim=-1) * scale, torch.cat((sin, sin), dim=-1) * scale

    @torch.no_grad()
    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, seq_len: int | None = None,
               fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, c, heads, head_dim) and k (B, c, kv_heads, head_dim) at `positions` (c,),
        sample b with its own frequencies; the first `dim` channels rotate. On CUDA with triton
        the fused kernel rotates each sample in place (bit for bit what `ScaledRotaryEmbedding`
        does for that sample's scaling); otherwise the PyTorch reference. `seq_len` only bounds
        the positions (the regime was fixed when the module was made). Use the returned tensors."""
        if q.dim() != 4 or q.shape[0] != self.batch or k.shape[0] != self.batch:
            raise ValueError(f"BatchedRotaryEmbedding.rotate: expected q, k of batch {self.batch} "
                             f"(B, c, heads, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}")
        if seq_len is None:
            seq_len = int(positions.max().item()) + 1 if positions.numel() else 1
        if fused is None:
            fused = fused_available(q) and seq_len <= MAX_SPLIT_POSITION
        if fused:
            from .rotary_triton import rotate_inplace  # imports triton (optional, checked above)

            consts = self._get("phase", q.device)
            consts0 = self._get("phase0", q.device) if any(self.n_hats) else None
            for b in range(self.batch):
                n_hat = self.n_hats[b]
                rotate_inplace(q[b], k[b], positions, consts[b], consts0 if n_hat else None, self.factors[b], n_hat)
            return q, k
        cos, sin = self.cos_sin(positions)
        return apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
        cos, sin = self.cos_sin(position_ids)
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"batch={self.batch}, dim={self.dim}, base={self.base}"


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
