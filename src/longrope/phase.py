"""Split-precision RoPE angle math: float64 angles reduced modulo 2π, and the float32-only
split arithmetic that the fused kernel (`rotary_triton`) runs, with its CPU reference here.

Precision: transformers computes `position.float() @ inv_freq.float()`. At position 2,097,151 a
float32 angle of ~2e6 rad has a spacing of 0.25 rad, and θ_i rounded to float32 adds up to
2e6 · 6e-8 ≈ 0.12 rad more, so cos/sin can be off by ~0.06 or worse. We form the angle in
float64 from float64 inverse frequencies, reduce it modulo 2π (exact enough: float64 keeps ~1e-9
rad at 2e6), and only then go to float32 for cos/sin. The cos/sin error is then ~1e-7 at any
position a model will ever see. Both `rotary` and `rotary_triton` import this module, so neither
imports the other.
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2 * math.pi
LOW_BITS = 12  # positions split as p = hi·2^12 + lo for the fused kernel (hi, lo < 2^12)
MAX_SPLIT_POSITION = 1 << (2 * LOW_BITS)  # the split arithmetic is exact below 2^24 positions


def precise_angles(positions: torch.Tensor, inv_freq64: torch.Tensor) -> torch.Tensor:
    """float32 angles in [0, 2π) for integer `positions` (...,) and float64 `inv_freq64` (d/2,).

    The product is taken in float64 and reduced modulo 2π before rounding to float32.
    """
    return reduced_angles64(positions, inv_freq64).to(torch.float32)


def reduced_angles64(positions: torch.Tensor, inv_freq64: torch.Tensor) -> torch.Tensor:
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq64.to(positions.device)
    return torch.remainder(angles, TWO_PI)


def cos_sin(angles64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin of float64 angles in [0, 2π). On the CPU they are taken in float64:
    torch's multi-threaded float32 cos on the CPU is intermittently off by ~1e-4 (seen in about
    one process in ten with torch 2.13 on two cores), far above the ulp this layer promises. On
    CUDA float32 is accurate to a few ulp and halves the memory of the table."""
    if angles64.device.type != "cpu":
        angles64 = angles64.to(torch.float32)
    return angles64.cos().to(torch.float32), angles64.sin().to(torch.float32)


def split12(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 x >= 0 as hi + lo: hi has at most LOW_BITS significant bits (so an integer below
    2^LOW_BITS times hi is exact in float32), lo = x - hi rounded to float32."""
    mant, exp = torch.frexp(x)  # x = mant · 2^exp, mant in [0.5, 1)
    hi = torch.ldexp(torch.floor(torch.ldexp(mant, torch.tensor(LOW_BITS))), exp - LOW_BITS)
    hi = torch.where(x > 0, hi, torch.zeros_like(x))
    return hi.float(), (x - hi).float()


def phase_constants(inv_freq64: torch.Tensor) -> torch.Tensor:
    """float32 (4, d/2) constants of the split-precision angle: rows f_hi, f_lo, F_hi, F_lo, where
    f = frac(θ_i / 2π) is the phase increment per position in turns, F = frac(2^LOW_BITS · f) the
    increment per 2^LOW_BITS positions, each split by `split12`. Computed in float64."""
    f = torch.frac(inv_freq64.double().cpu() / TWO_PI)
    big = torch.frac(f * float(1 << LOW_BITS))
    return torch.stack([*split12(f), *split12(big)])


def split_angles(positions: torch.Tensor, consts: torch.Tensor) -> torch.Tensor:
    """float32 angles in [-π, π) for integer positions (< 2^24) with float32 arithmetic only:
    exactly what the fused kernel (`rotary_triton`) computes, so it can be tested on any device.

    p = hi·2^12 + lo; turns = frac(hi·F_hi) + frac(lo·f_hi) + (hi·F_lo + lo·f_lo), where both
    products with the 12-bit parts are exact in float32 and the corrections are tiny, so the
    only rounding is that of a sum below 3: ~2.4e-7 turns, ~1.5e-6 rad at any position.
    """
    p = positions.long().unsqueeze(-1)
    hi = (p >> LOW_BITS).float()
    lo = (p & ((1 << LOW_BITS) - 1)).float()
    f_hi, f_lo, big_hi, big_lo = consts.to(positions.device).unbind(0)
    a = hi * big_hi
    a = a - torch.floor(a)
    b = lo * f_hi
    b = b - torch.floor(b)
    turns = a + b + (hi * big_lo + lo * f_lo)
    turns = turns - torch.floor(turns + 0.5)
    return turns * TWO_PI
