"""The fused LongRoPE rotary kernel (Triton): q and k rotated in place, angles formed on the fly.

No (positions × dim) cos/sin table exists: each program takes a block of tokens, forms the angle
of every (token, frequency pair) from the integer position with the split-precision arithmetic
of `phase.split_angles` (float32 only, exact products, ~1.5e-6 rad at any position below 2^24),
applies the attention factor (and n̂: positions below it use the unscaled constants and no
factor), and rotates every head of q and k with those cos/sin, in float32, storing in the
tensors' dtype. The per-pair constants (`phase.phase_constants`) carry the scaling: LongRoPE's
per-pair factors and short/long choice arrive as inverse frequencies, so any scaling works.

`rotary.ScaledRotaryEmbedding.rotate` calls this on CUDA; the PyTorch path there is the
reference and fallback. On CPU tensors the kernel runs in Triton's interpreter (for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .phase import LOW_BITS

BLOCK_T = 32  # tokens per program


def _rope_kernel(q_ptr, k_ptr, pos_ptr, c_ptr, c0_ptr, n_tokens,
                 q_st, q_sh, k_st, k_sh, scale, n_hat,
                 N_Q_HEADS: tl.constexpr, N_K_HEADS: tl.constexpr,  # constexpr: a model has one pair, and
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_NHAT: tl.constexpr,
                 LOW: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tmask = t < n_tokens
    j = tl.arange(0, HALF_PAD)
    jmask = j < HALF
    p = tl.load(pos_ptr + t, mask=tmask, other=0).to(tl.int64)
    hi = (p >> LOW).to(tl.float32)[:, None]
    lo = (p & ((1 << LOW) - 1)).to(tl.float32)[:, None]
    two_pi = 6.283185307179586  # 2π

    f_hi = tl.load(c_ptr + j, mask=jmask, other=0.0)[None, :]
    f_lo = tl.load(c_ptr + HALF + j, mask=jmask, other=0.0)[None, :]
    b_hi = tl.load(c_ptr + 2 * HALF + j, mask=jmask, other=0.0)[None, :]
    b_lo = tl.load(c_ptr + 3 * HALF + j, mask=jmask, other=0.0)[None, :]
    factor = scale
    if HAS_NHAT:  # the first n̂ positions: unscaled frequencies, no attention factor
        early = (p < n_hat)[:, None]
        f_hi = tl.where(early, tl.load(c0_ptr + j, mask=jmask, other=0.0)[None, :], f_hi)
        f_lo = tl.where(early, tl.load(c0_ptr + HALF + j, mask=jmask, other=0.0)[None, :], f_lo)
        b_hi = tl.where(early, tl.load(c0_ptr + 2 * HALF + j, mask=jmask, other=0.0)[None, :], b_hi)
        b_lo = tl.where(early, tl.load(c0_ptr + 3 * HALF + j, mask=jmask, other=0.0)[None, :], b_lo)
        factor = tl.where(early, 1.0, scale)
    # phase.split_angles, in float32: exact 12-bit products, one rounding of a sum below 3
    a = hi * b_hi
    a = a - tl.floor(a)
    b = lo * f_hi
    b = b - tl.floor(b)
    turns = a + b + (hi * b_lo + lo * f_lo)
    turns = turns - tl.floor(turns + 0.5)
    angle = turns * two_pi
    cos = tl.cos(angle) * factor
    sin = tl.sin(angle) * factor

    mask = tmask[:, None] & jmask[None, :]
    # transformers' rotate_half convention: pairs are (j, j + d/2)
    for h in range(N_Q_HEADS):
        ptr = q_ptr + t[:, None] * q_st + h * q_sh + j[None, :]
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    for h in range(N_K_HEADS):
        ptr = k_ptr + t[:, None] * k_st + h * k_sh + j[None, :]
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty), mask=mask)


_compiled: dict[bool, object] = {}


def _kernel(interpret: bool):
    if interpret not in _compiled:
        if interpret:
            # triton's interpreter, only for CPU tensors (tests); a module of the optional triton
            from triton.runtime.interpreter import InterpretedFunction

            _compiled[interpret] = InterpretedFunction(_rope_kernel)
        else:
            _compiled[interpret] = triton.jit(_rope_kernel)
    return _compiled[interpret]


def rotate_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, consts: torch.Tensor,
                   consts0: torch.Tensor | None = None, scale: float = 1.0, n_hat: int = 0) -> None:
    """Rotate q (n, Hq, head_dim) and k (n, Hk, head_dim) in place at `positions` (n,) < 2^24.

    consts: `phase.phase_constants` (4, rd/2) float32 of the scaled frequencies; consts0 those
    of the unscaled ones, used (with no attention factor) for positions < n_hat. The first rd
    channels rotate; the last dimension must be contiguous. CPU tensors run in the interpreter.
    """
    n, half = q.shape[0], consts.shape[1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != n or positions.shape != (n,):
        raise ValueError(f"rotate_inplace: expected q (n, H, d), k (n, Hk, d), positions (n,); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or 2 * half > min(q.shape[-1], k.shape[-1]):
        raise ValueError("rotate_inplace: last dimension must be contiguous and hold the rotary dims")
    if n == 0:
        return
    has_nhat = bool(n_hat) and consts0 is not None
    consts = consts.to(device=q.device, dtype=torch.float32).contiguous()
    consts0 = (consts0 if has_nhat else consts).to(device=q.device, dtype=torch.float32).contiguous()
    positions = positions.to(q.device).contiguous()
    grid = (triton.cdiv(n, BLOCK_T),)
    _kernel(not q.is_cuda)[grid](
        q, k, positions, consts, consts0, n, q.stride(0), q.stride(1), k.stride(0), k.stride(1), float(scale),
        int(n_hat), N_Q_HEADS=q.shape[1], N_K_HEADS=k.shape[1], HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)),
        BLOCK=BLOCK_T, HAS_NHAT=has_nhat, LOW=LOW_BITS)

