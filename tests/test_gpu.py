"""GPU-only checks (skipped without CUDA): the lean forward against the plain model at 32k tokens
in bf16, with transformers' own LongRoPE implementation as the reference; the fused training loss
(Liger, where installed) against the chunked one and a float64 sum of float32 logits."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from longrope import evaluate, models
from longrope import scaling as sc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ORIGINAL, LENGTH = 4096, 32768


def _model(rope_parameters, max_positions, device="cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                         max_position_embeddings=max_positions, rope_parameters=rope_parameters, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider than the default init so that positions matter in the output
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.04)
    return model.to(torch.bfloat16).eval()


def test_lean_loss_equals_plain_model_at_32k_in_bf16():
    # no float32 reference at 32k: transformers hands float32 GQA attention to SDPA's math kernel,
    # which materialises (heads × n × n) scores (64 GiB here); it is checked at 4k below
    check_lean_against_plain(ORIGINAL, LENGTH, "cuda", float32_reference=False)


def test_lean_loss_equals_float32_transformers_at_4k():
    check_lean_against_plain(ORIGINAL // 4, 4096, "cuda")


def check_lean_against_plain(original, length, device, float32_reference=True):
    """The lean loss against (1) the plain bf16 model with the same rotary: transformers' forward
    with labels, full logits; (2) with `float32_reference`, transformers' own LongRoPE in float32
    (bf16 transformers is itself ~1e-3 off its float32 loss here: its cos/sin table is rounded to
    bf16). Hidden states are compared with (2), or else with (1)."""
    factors = sc.yarn_factors(64, 10000.0, original, length / original).tolist()
    scaling = sc.LongRoPEScaling.from_target(factors, original, length)
    info = models.RopeInfo(dim=64, base=10000.0, original_length=original)
    rope_parameters, max_positions = models.hf_rope_parameters(scaling, info)
    model = _model({**rope_parameters, "rope_theta": 10000.0}, max_positions, device).float()
    ids = torch.randint(0, 32000, (length,), generator=torch.Generator().manual_seed(1)).to(device)
    if float32_reference:
        with torch.inference_mode():
            reference = model(input_ids=ids[None], labels=ids[None]).loss.item()
            reference_hidden = evaluate.modules_hidden_states(model, ids).float()
    model = model.to(torch.bfloat16)
    models.attach(model, scaling)
    with torch.inference_mode():
        plain = model(input_ids=ids[None], labels=ids[None]).loss.item()
        if not float32_reference:
            reference_hidden = evaluate.modules_hidden_states(model, ids).float()
    ours = evaluate.nll_sum(model, ids, forward="lean")[0] / (length - 1)
    assert ours == pytest.approx(plain, rel=1e-3), (ours, plain)
    if float32_reference:
        assert ours == pytest.approx(reference, rel=1e-3), (ours, reference)
    # the loss of random weights is close to ln(vocab) whatever the positions; the hidden states are not
    lean_hidden = evaluate.hidden_states(model, ids, forward="lean").float()
    err = (lean_hidden - reference_hidden).norm() / reference_hidden.norm()
    assert err < 0.1, err  # bf16 rounding through 6 layers: ~3.5% on the CPU at 1k tokens
    models.attach(model, sc.LongRoPEScaling.from_target([1.0] * 32, original, length))  # another scaling
    wrong = evaluate.hidden_states(model, ids, forward="lean").float()
    assert (wrong - reference_hidden).norm() / reference_hidden.norm() > 5 * err


def test_lean_prefill_cache_close_to_transformers_at_16k_in_bf16():
    check_prefill_against_transformers(16384, "cuda")


def check_prefill_against_transformers(length, device):
    """The lean prefill (passkey generation) in bf16: every layer's keys and values are no further
    from transformers' float32 prefill (same weights, same rotary) than transformers' own bf16
    prefill is, and, on the GPU, its peak memory is below transformers' bf16 prefill (no
    full-length MLP intermediates). The bf16 distance is the yardstick because random weights
    through 6 layers put it near 2% here; a fixed bound would be a guess."""
    from longrope import lean

    factors = sc.yarn_factors(64, 10000.0, ORIGINAL, length / ORIGINAL).tolist()
    scaling = sc.LongRoPEScaling.from_target(factors, ORIGINAL, length)
    model = _model({"rope_type": "default", "rope_theta": 10000.0}, length, device)
    models.attach(model, scaling, allow_context_mismatch=True)  # a random model, treated as trained at ORIGINAL
    ids = torch.randint(0, 32000, (length,), generator=torch.Generator().manual_seed(2)).to(device)
    cuda = device == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        ours = lean.prefill(model, ids)[1]
        if cuda:
            ours_peak = torch.cuda.max_memory_allocated() - before  # what the prefill added at most
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        theirs = model(input_ids=ids[None], use_cache=True, logits_to_keep=1).past_key_values
        if cuda:
            theirs_peak = torch.cuda.max_memory_allocated() - before
        model.float()
        exact = model(input_ids=ids[None], use_cache=True, logits_to_keep=1).past_key_values
    for i, (a, b, ref) in enumerate(zip(ours.layers, theirs.layers, exact.layers)):
        for name in ("keys", "values"):
            r = getattr(ref, name).float()
            err_ours = ((getattr(a, name).float() - r).norm() / r.norm()).item()
            err_theirs = ((getattr(b, name).float() - r).norm() / r.norm()).item()
            assert err_ours <= 1.5 * err_theirs + 1e-3, (i, name, err_ours, err_theirs)
    if cuda:
        assert ours_peak < theirs_peak, (ours_peak, theirs_peak)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_fused_loss_gives_the_chunked_loss_and_its_gradients():
    """`nll.summed_nll_fused` (Liger's fused linear cross-entropy) against `nll.summed_nll` as
    training runs it (float32 weights, bf16 autocast) and both against a float32 reference without
    autocast: the summed NLL, and its gradients with respect to the hidden states and to the
    output projection."""
    from longrope import nll

    model = _model({"rope_type": "default", "rope_theta": 10000.0}, 8192).float().train()
    hidden = torch.randn(1, 8192, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    hidden.requires_grad_(True)
    targets = torch.randint(0, 32000, (1, 8192), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    head = model.get_output_embeddings()

    def run(score, autocast=True):
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = score()
        loss.backward()
        return loss.item(), hidden.grad.clone(), head.weight.grad.clone()

    reference = run(lambda: nll.summed_nll(model, hidden, targets, 1024, torch.float64), autocast=False)
    chunked = run(lambda: nll.summed_nll(model, hidden, targets, 1024, torch.float32))
    fused = run(lambda: nll.summed_nll_fused(model, hidden, targets))
    for name, got in (("chunked", chunked), ("fused", fused)):
        assert got[0] == pytest.approx(reference[0], rel=2e-3), name
        for grad, want in zip(got[1:], reference[1:]):
            assert (grad - want).norm() / want.norm() < 2e-2, name
    assert fused[0] == pytest.approx(chunked[0], rel=2e-3)
