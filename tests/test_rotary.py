"""Rotary cos/sin: transformers' rotary modules as reference, float64 math for precision."""

import math

import numpy as np
import pytest
import torch

from longrope import scaling as sc
from longrope.phase import precise_angles
from longrope.rotary import ScaledRotaryEmbedding, apply_rotary
from conftest import ORIGINAL, clone_with_config, rotary_dim, tiny_model

POSITION = 2_097_151
DIM, BASE = 64, 100000.0  # SmolLM2's rotary shape


def float64_reference(position: int, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    angles = np.float64(position) * inv_freq  # float64: ~1e-16 relative, ~2e-10 rad at 2M
    return np.cos(angles), np.sin(angles)


def reference_inv_freq(scaling, seq_len):
    i = np.arange(0, DIM, 2, dtype=np.float64)
    theta = BASE ** (-i / DIM)
    lam = np.array(scaling.factors(seq_len), dtype=np.float64)
    return theta / lam


@pytest.fixture
def longrope_2m():
    factors = sc.yarn_factors(DIM, BASE, 8192, 256.0).tolist()
    return sc.LongRoPEScaling.from_target(factors, 8192, 2 * 1024 * 1024)


def test_inverse_frequencies_match_float64_reference(longrope_2m):
    ours = longrope_2m.inv_freq(DIM, BASE, POSITION + 1).numpy()
    ref = reference_inv_freq(longrope_2m, POSITION + 1)
    assert np.max(np.abs(ours / ref - 1)) <= 1e-6


def test_cos_sin_at_two_million_within_bound_where_float32_and_bf16_fail(longrope_2m):
    module = ScaledRotaryEmbedding(longrope_2m, DIM, BASE)
    positions = torch.tensor([[POSITION - 3, POSITION - 1, POSITION]])
    cos, sin = module.cos_sin(positions)
    a = longrope_2m.attention_factor()
    inv64 = reference_inv_freq(longrope_2m, POSITION + 1)
    ours_err = float32_err = bf16_err = 0.0
    for j, p in enumerate(positions[0].tolist()):
        ref_cos, ref_sin = float64_reference(p, inv64)
        ours_err = max(ours_err, np.abs(cos[0, j, : DIM // 2].numpy() / a - ref_cos).max(),
                       np.abs(sin[0, j, : DIM // 2].numpy() / a - ref_sin).max())
        # what transformers does: float32 inverse frequencies times a float32 position
        angle32 = torch.tensor(float(p), dtype=torch.float32) * torch.tensor(inv64, dtype=torch.float32)
        float32_err = max(float32_err, np.abs(angle32.cos().double().numpy() - ref_cos).max())
        # a table of a·cos stored in bfloat16, as handed to attention (exact angles, rounded values)
        bf16 = (torch.tensor(ref_cos) * a).to(torch.bfloat16).double().numpy() / a
        bf16_err = max(bf16_err, np.abs(bf16 - ref_cos).max())
    assert ours_err <= 2e-3, ours_err
    assert ours_err <= 1e-5  # in fact far better than the bound
    assert float32_err > 2e-3, float32_err
    assert bf16_err > 2e-3, bf16_err


def test_precise_angles_reduce_modulo_two_pi():
    inv = torch.tensor([1.0, 0.5], dtype=torch.float64)
    angles = precise_angles(torch.tensor([POSITION]), inv)
    expected = np.mod(np.float64(POSITION) * np.array([1.0, 0.5]), 2 * math.pi)
    np.testing.assert_allclose(angles.numpy()[0], expected, atol=1e-6)
    assert angles.dtype == torch.float32


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                 "long_factor": [1.0, 1.3, 1.9, 2.5, 3.0, 3.6, 4.0, 4.4],
                 "short_factor": [1.0, 1.0, 1.1, 1.1, 1.2, 1.2, 1.3, 1.3]},
}


@pytest.mark.parametrize("name", ROPE_CASES)
@pytest.mark.parametrize("length", [ORIGINAL // 2, 3 * ORIGINAL])
def test_cos_sin_match_transformers_rotary(name, length):
    params = ROPE_CASES[name]
    hf_model = clone_with_config(tiny_model("llama"), params)
    ours_params = {"original_max_position_embeddings": ORIGINAL, **params}  # transformers' dynamic reads it
    ours = ScaledRotaryEmbedding(sc.from_dict(ours_params), rotary_dim(hf_model), 10000.0)
    positions = torch.arange(length)[None]
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = hf_model.model.rotary_emb(x, positions)
    cos, sin = ours(x, positions)
    # transformers rounds position × θ in float32: ~ulp(192) ≈ 1.5e-5 rad at these positions
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=3e-5)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=3e-5)


def test_n_hat_keeps_leading_positions_unscaled():
    scaling = sc.from_dict({**ROPE_CASES["longrope"], "n_hat": 8})
    ours = ScaledRotaryEmbedding(scaling, 16, 10000.0)
    plain = ScaledRotaryEmbedding(sc.NoScaling(), 16, 10000.0)
    without_n_hat = ScaledRotaryEmbedding(scaling.replace(n_hat=0), 16, 10000.0)
    positions = torch.arange(3 * ORIGINAL)[None]
    cos, sin = ours.cos_sin(positions)
    cos0, sin0 = plain.cos_sin(positions)
    cos1, sin1 = without_n_hat.cos_sin(positions)
    assert torch.equal(cos[:, :8], cos0[:, :8]) and torch.equal(sin[:, :8], sin0[:, :8])
    assert torch.equal(cos[:, 8:], cos1[:, 8:]) and torch.equal(sin[:, 8:], sin1[:, 8:])
    assert not torch.allclose(cos1[:, :8], cos0[:, :8])  # the test can fail: the regions do differ


def test_apply_rotary_partial_dims_pass_through():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 2, 5, 16).unbind(0)
    cos, sin = ScaledRotaryEmbedding(sc.NoScaling(), 8, 10000.0).cos_sin(torch.arange(5)[None])
    q2, k2 = apply_rotary(q, k, cos, sin)
    assert torch.equal(q2[..., 8:], q[..., 8:])
    # a rotation keeps each pair's norm
    pairs = lambda t: t[..., :4] ** 2 + t[..., 4:8] ** 2  # noqa: E731
    torch.testing.assert_close(pairs(q2), pairs(q))
