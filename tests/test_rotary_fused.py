"""The fused rotary kernel: its split-precision angle arithmetic (emulated in PyTorch) against a
float64 reference up to 2M positions, the kernel itself in Triton's interpreter against the
PyTorch reference path, and on a GPU (skipped without CUDA)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longrope import scaling as sc
from longrope.phase import LOW_BITS, MAX_SPLIT_POSITION, phase_constants, split_angles
from longrope.rotary import ScaledRotaryEmbedding

LAST = 2_097_151
SHAPES = {"smollm2": (64, 100000.0, 8192), "llama3": (128, 500000.0, 8192)}


def longrope_2m(dim, base, original):
    factors = sc.yarn_factors(dim, base, original, 256.0).tolist()
    return sc.LongRoPEScaling.from_target(factors, original, 2 * 1024 * 1024)


def _positions():
    g = torch.Generator().manual_seed(0)
    edges = [0, 1, 4095, 4096, 4097, 8191, 8192, 1 << 20, LAST - 1, LAST]
    return torch.cat([torch.tensor(edges), torch.arange(LAST - 3000, LAST), torch.randint(0, LAST + 1, (20000,), generator=g)])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("regime", ["long", "short", "unscaled"])
def test_split_precision_angles_match_float64_up_to_two_million(shape, regime):
    dim, base, original = SHAPES[shape]
    scaling = longrope_2m(dim, base, original).replace(short_factor=tuple(np.linspace(1, 1.5, dim // 2)))
    seq_len = LAST + 1 if regime == "long" else original
    inv = sc.rope_inv_freq(dim, base) if regime == "unscaled" else scaling.inv_freq(dim, base, seq_len)
    positions = _positions()
    angles = split_angles(positions, phase_constants(inv)).double()
    exact = positions.double()[:, None] * inv  # float64: ~2e-10 rad at 2M
    cos_err = (angles.cos() - exact.cos()).abs().max().item()
    sin_err = (angles.sin() - exact.sin()).abs().max().item()
    assert max(cos_err, sin_err) <= 2e-3
    assert max(cos_err, sin_err) <= 3e-6, (cos_err, sin_err)  # in fact far better
    assert angles.abs().max() <= math.pi + 1e-6
    # what a float32 product does at these positions
    f32 = (positions.float()[:, None] * inv.float()).double()
    assert (f32.cos() - exact.cos()).abs().max().item() > 2e-3


def test_phase_constant_parts_make_exact_float32_products():
    inv = longrope_2m(128, 500000.0, 8192).inv_freq(128, 500000.0, LAST + 1)
    consts = phase_constants(inv)
    f = torch.frac(inv / (2 * math.pi))
    big = torch.frac(f * 2 ** LOW_BITS)
    torch.testing.assert_close(consts[0].double() + consts[1].double(), f, rtol=1e-10, atol=0)  # f_lo rounded to float32
    torch.testing.assert_close(consts[2].double() + consts[3].double(), big, rtol=1e-10, atol=0)
    top = float((1 << LOW_BITS) - 1)
    for row in (0, 2):  # the 12-bit parts times any 12-bit integer are exact in float32
        assert torch.equal((consts[row] * top).double(), consts[row].double() * top)
    assert MAX_SPLIT_POSITION == 1 << 24


def _inputs(n, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
    return q, k


def _exact_rotation(x, positions, inv, scale, rot_dim):
    """float64 rotation (transformers' rotate_half pairing) with exact angles."""
    x = x.double()
    ang = positions.double()[:, None] * inv.double()
    cos, sin = (ang.cos() * scale)[:, None], (ang.sin() * scale)[:, None]
    half = rot_dim // 2
    x1, x2 = x[..., :half], x[..., half:rot_dim]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot_dim:]], dim=-1)


def _bf16_errors(module, q, fused_q, ref_q, positions, seq_len, dim):
    """Errors of the fused and the reference bf16 results against the exact rotation of q, relative
    to max(|exact|, 1e-2) (so one bf16 ulp is at most 2^-7)."""
    inv = module.inv_freq64(seq_len, torch.device("cpu"))
    positions = positions.cpu()
    exact = _exact_rotation(q.cpu(), positions, inv, module.scaling.attention_factor(seq_len), dim)
    if module.scaling.n_hat:
        early = positions < module.scaling.n_hat
        exact[early] = _exact_rotation(q.cpu()[early], positions[early], sc.rope_inv_freq(dim, module.base), 1.0, dim)
    denominator = exact.abs().clamp_min(1e-2)
    return ((fused_q.cpu().double() - exact).abs() / denominator, (ref_q.cpu().double() - exact).abs() / denominator)


def _reference_bound(module, x, dim, seq_len):
    """How far the PyTorch reference may be from an exact-angle result before output rounding, per
    element: it rounds cos·a and sin·a to bf16 (transformers' convention; at most 2^-8 relative,
    so 2^-8·a absolute) and then each product to bf16 too (the arithmetic is in q's dtype), so a
    rotated channel may be off by 2·2^-8·a·(|x_i| + |x_partner|). Pass-through channels: 0."""
    a = max(module.scaling.attention_factor(seq_len), 1.0)
    x = x.float().abs()
    pair = x[..., : dim // 2] + x[..., dim // 2 : dim]
    bound = torch.zeros_like(x)
    bound[..., :dim] = 2 ** -7 * a * torch.cat([pair, pair], dim=-1)
    return bound


CASES = {  # name: (scaling factory, rotary dim, head_dim, seq_len)
    "long-2m": (lambda: longrope_2m(64, 100000.0, 8192), 64, 64, LAST + 1),
    "short": (lambda: longrope_2m(64, 100000.0, 8192).replace(short_factor=tuple([1.3] * 32)), 64, 64, 8000),
    "n_hat-partial": (lambda: longrope_2m(32, 100000.0, 8192).replace(n_hat=64), 32, 48, LAST + 1),
    "yarn": (lambda: sc.make("yarn", 8192, 65536), 64, 64, 65536),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_in_interpreter_matches_reference_path(case):
    pytest.importorskip("triton")
    make, dim, head_dim, seq_len = CASES[case]
    module = ScaledRotaryEmbedding(make(), dim, 100000.0)
    n = 300
    positions = torch.cat([torch.arange(100), torch.randint(0, seq_len, (n - 100,), generator=torch.Generator().manual_seed(1))])
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, None)):
        q, k = _inputs(n, 4, 2, head_dim, dtype)
        ref_q, ref_k = module.rotate(q.clone(), k.clone(), positions, seq_len, fused=False)
        fq, fk = q.clone(), k.clone()
        out_q, out_k = module.rotate(fq, fk, positions, seq_len, fused=True)
        assert out_q is fq and out_k is fk  # in place
        if tol:
            torch.testing.assert_close(fq, ref_q, rtol=0, atol=tol)
            torch.testing.assert_close(fk, ref_k, rtol=0, atol=tol)
        else:  # bf16: the fused kernel rounds once from float32; the reference rounds cos/sin and products
            fused_err, ref_err = _bf16_errors(module, q, fq, ref_q, positions, seq_len, dim)
            # Triton's interpreter truncates float32 -> bf16 (the GPU rounds to nearest): one ulp here
            assert fused_err.max() <= 2 ** -7 + 1e-4
            assert fused_err.mean() <= ref_err.mean()
            torch.testing.assert_close(fq.float(), ref_q.float(), rtol=2 ** -6, atol=2 ** -6)
        assert torch.equal(fq[..., dim:], q[..., dim:])  # partial rotary: the rest passes through


def test_kernel_on_strided_views_like_phi3_fused_qkv():
    pytest.importorskip("triton")
    module = ScaledRotaryEmbedding(longrope_2m(16, 10000.0, 64), 16, 10000.0)
    n, d = 70, 16
    qkv = torch.randn(n, (4 + 2 + 2) * d)
    q, k, _ = qkv.split([4 * d, 2 * d, 2 * d], dim=-1)
    q, k = q.view(n, 4, d), k.view(n, 2, d)
    positions = torch.arange(1000, 1000 + n)
    ref_q, ref_k = module.rotate(q.clone(), k.clone(), positions, 5000, fused=False)
    module.rotate(q, k, positions, 5000, fused=True)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=2e-5)
    torch.testing.assert_close(k, ref_k, rtol=0, atol=2e-5)


def test_rotate_defaults_to_reference_path_on_cpu():
    module = ScaledRotaryEmbedding(sc.NoScaling(), 16, 10000.0)
    q, k = _inputs(10, 2, 1, 16, torch.float32)
    out_q, _ = module.rotate(q, k, torch.arange(10))
    assert out_q is not q  # the PyTorch path returns new tensors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_on_gpu_matches_reference_and_interpreter(case):
    pytest.importorskip("triton")
    make, dim, head_dim, seq_len = CASES[case]
    module = ScaledRotaryEmbedding(make(), dim, 100000.0)
    n = 4096
    positions = torch.randint(0, seq_len, (n,), generator=torch.Generator().manual_seed(2))
    q, k = _inputs(n, 8, 2, head_dim, torch.bfloat16)
    qc, kc, pc = q.cuda(), k.cuda(), positions.cuda()
    ref_q, ref_k = module.rotate(qc.clone(), kc.clone(), pc, seq_len, fused=False)
    module.rotate(qc, kc, pc, seq_len, fused=True)
    for x, fused, ref in ((q, qc, ref_q), (k, kc, ref_k)):
        fused, ref = fused.float().cpu(), ref.float().cpu()
        excess = (fused - ref).abs() - _reference_bound(module, x, dim, seq_len) - 2 ** -8 * (fused.abs() + ref.abs())
        assert excess.max() <= 1e-5, excess.max()
    fused_err, ref_err = _bf16_errors(module, q, qc, ref_q, positions, seq_len, dim)
    assert fused_err.max() <= 2 ** -8 + 1e-4  # half an ulp: one rounding from float32
    assert fused_err.mean() <= ref_err.mean()
    iq, ik = q.float(), k.float()  # the interpreter (float32) agrees with the GPU up to bf16 rounding
    module.rotate(iq, ik, positions, seq_len, fused=True)
    torch.testing.assert_close(qc.float().cpu(), iq, rtol=2 ** -7, atol=2 ** -7)
