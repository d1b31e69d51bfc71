"""The lean forward (our decoder loop) against transformers' own forward, on every architecture."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, ORIGINAL, clone_with_config, rotary_dim, tiny_model
from longrope import evaluate, lean, models, nll, rotary
from longrope import scaling as sc


def _ids(n, seed=0):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed))


def reference_nll(model, ids):
    """float64 sum of the NLL of targets 1..n-1 from the full logits of transformers' forward."""
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0].double()
    return -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).sum().item()


def scalings(dim):
    long = sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=dim, base=10000.0)
    return {
        "none": None,
        "yarn": sc.make("yarn", ORIGINAL, 4 * ORIGINAL, dim=dim, base=10000.0),
        "longrope": long.replace(short_factor=tuple([1.2] * (dim // 2))),
        "longrope-n_hat": long.replace(n_hat=16),
        "dynamic": sc.make("dynamic", ORIGINAL, 4 * ORIGINAL),
    }


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["none", "yarn", "longrope", "longrope-n_hat", "dynamic"])
def test_lean_nll_equals_transformers(arch, method):
    model = tiny_model(arch)
    scaling = scalings(rotary_dim(model))[method]
    if scaling is not None:
        models.attach(model, scaling)
    for n, chunk in ((150, 7), (150, 64), (45, 16), (45, 4096)):  # long and short regimes
        ids = _ids(n, seed=n)
        ref = reference_nll(model, ids)
        lean_nll, count = evaluate.nll_sum(model, ids, chunk_size=chunk, forward="lean")
        modules_nll, _ = evaluate.nll_sum(model, ids, chunk_size=chunk, forward="modules")
        assert count == n - 1
        assert lean_nll == pytest.approx(ref, rel=1e-5, abs=1e-5)
        assert lean_nll == pytest.approx(modules_nll, rel=1e-5)
        assert evaluate.nll_sum(model, ids, chunk_size=chunk)[0] == lean_nll  # "auto" is the lean path


@pytest.mark.parametrize("arch, params", [
    ("llama", {"rope_type": "dynamic", "factor": 4.0}),
    ("phi3", {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
              "long_factor": [1.0, 1.3, 1.9, 2.5], "short_factor": [1.0, 1.1, 1.2, 1.3]}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
])
def test_lean_with_transformers_own_rotary(arch, params):
    """A model configured with a scaling (no attach): transformers' rotary module, per chunk or
    as one table where its regime depends on the length."""
    model = clone_with_config(tiny_model(arch), params)
    for n in (150, 40):
        ids = _ids(n, seed=1)
        hidden = lean.final_hidden_states(model, ids, chunk_size=13)
        ref = evaluate.modules_hidden_states(model, ids)
        torch.testing.assert_close(hidden, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_groups_and_budget(monkeypatch, kv_heads):
    model = tiny_model("llama", num_key_value_heads=kv_heads)
    ids = _ids(120, seed=2)
    whole = lean.final_hidden_states(model, ids, chunk_size=32)
    monkeypatch.setattr(lean, "ATTENTION_BUDGET", 1)  # one KV head per SDPA call
    split = lean.final_hidden_states(model, ids, chunk_size=32)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split, evaluate.modules_hidden_states(model, ids), rtol=1e-5, atol=1e-5)


def test_nothing_tokens_by_intermediate_and_sdpa_is_causal_without_mask(monkeypatch):
    model = tiny_model("qwen3")
    rows, calls = [], []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0])) for layer in model.model.layers]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, kw.get("is_causal"), q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(lean.F, "scaled_dot_product_attention", spy)
    try:
        evaluate.nll_sum(model, _ids(200), chunk_size=24)
    finally:
        for h in hooks:
            h.remove()
    assert max(rows) <= 24 and sum(rows) == 200 * len(model.model.layers)
    assert calls and all(mask is None and causal is True and nq == nk == 200 for mask, causal, nq, nk in calls)


def test_sliding_window_and_training_fall_back():
    model = tiny_model("mistral", sliding_window=32)
    ids = _ids(100, seed=3)
    assert "sliding-window" in lean.unsupported_reason(model, 100)
    assert lean.unsupported_reason(model, 32) is None
    with pytest.raises(ValueError, match="sliding-window"):
        lean.final_hidden_states(model, ids)
    # auto falls back to transformers' modules, which honour the window
    assert evaluate.nll_sum(model, ids)[0] == pytest.approx(reference_nll(model, ids), rel=1e-5)
    model.train()
    assert "training" in lean.unsupported_reason(model, 10)
    model.eval()


def test_bfloat16_close_to_transformers():
    model = tiny_model("llama").to(torch.bfloat16)
    models.attach(model, scalings(16)["longrope"])
    ids = _ids(150, seed=4)
    ours = evaluate.nll_sum(model, ids, chunk_size=32, forward="lean")[0] / (len(ids) - 1)
    with torch.no_grad():  # the plain model: transformers' forward with labels (full logits)
        plain = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert ours == pytest.approx(plain, rel=1e-3)  # the acceptance bound of the lean forward in bf16


def test_lean_with_fused_rotary_kernel_in_interpreter(monkeypatch):
    """The Triton kernel inside the lean loop (Triton's interpreter on CPU tensors)."""
    pytest.importorskip("triton")
    model = tiny_model("phi3")  # partial rotary, fused projections
    models.attach(model, scalings(rotary_dim(model))["longrope-n_hat"])
    ids = _ids(150, seed=5)
    reference = lean.final_hidden_states(model, ids, chunk_size=64)
    monkeypatch.setattr(rotary, "fused_available", lambda t: True)
    fused = lean.final_hidden_states(model, ids, chunk_size=64)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["none", "longrope-n_hat", "yarn"])
def test_lean_prefill_cache_equals_transformers(arch, method):
    """`lean.prefill`: the rotated keys and values of every layer and the last position's logits
    equal transformers' own prefill (`use_cache=True`), in the long regime, chunked unevenly."""
    model = tiny_model(arch)
    scaling = scalings(rotary_dim(model))[method]
    if scaling is not None:
        models.attach(model, scaling)
    ids = _ids(150, seed=3)
    last, cache = lean.prefill(model, ids, chunk_size=37)
    with torch.no_grad():
        ref = model(input_ids=ids[None], use_cache=True)
    assert len(cache.layers) == model.config.num_hidden_layers
    for ours, theirs in zip(cache.layers, ref.past_key_values.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        logits = nll.project(model, last)[0]
    torch.testing.assert_close(logits, ref.logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_greedy_generate_with_lean_prefill_matches_generate(arch, monkeypatch):
    """Decoding continues from the lean prefill's cache as from transformers' own: the same tokens
    as `model.generate`; and the lean prefill is what runs (transformers' prefill is not called)."""
    model = tiny_model(arch)
    models.attach(model, scalings(rotary_dim(model))["longrope-n_hat"])
    ids = _ids(150, seed=5)
    calls = []
    real = lean.prefill
    monkeypatch.setattr(lean, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = evaluate.greedy_generate(model, ids, max_new_tokens=6)
    assert calls == [1]
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0,
                             eos_token_id=None)[0, 150:].tolist()
    assert ours == ref


def test_lean_prefill_refuses_what_lean_cannot_do():
    model = tiny_model("llama").train()
    with pytest.raises(ValueError, match="training mode"):
        lean.prefill(model, _ids(20))


@pytest.mark.parametrize("shape, batch", [
    ((4096, 14336, 32, 8, 128), 1),  # Llama-3-8B
    ((2048, 8192, 32, 8, 64), 1),  # Llama-3.2-1B
    ((576, 1536, 9, 3, 64), 1),  # SmolLM2-135M
    ((576, 1536, 9, 3, 64), 8),  # SmolLM2, 8 sequences per forward (batched search)
    ((64, 96, 4, 2, 16), 1),  # a tiny model: qkv (128) wider than its MLP (96)
])
def test_default_chunk_is_sized_to_the_model(shape, batch):
    from transformers import LlamaConfig

    hidden, inter, heads, kv, head_dim = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim)
    width = max(inter, hidden, (heads + 2 * kv) * head_dim)
    fits = [2 ** p for p in range(40) if 2 ** p * width * batch <= lean.LAYER_BUDGET]
    assert lean.layer_chunk(config, batch) == max([lean.DEFAULT_CHUNK] + fits)


def test_lean_forward_uses_the_model_sized_chunk_by_default(monkeypatch):
    """No chunk size: the layers run `layer_chunk` positions at a time (the budget scaled down so
    that a tiny model gets several chunks of 32), the loss is unchanged."""
    model = tiny_model("llama")
    ids = _ids(200, seed=3)
    explicit = evaluate.nll_sum(model, ids, chunk_size=32)[0]
    monkeypatch.setattr(lean, "DEFAULT_CHUNK", 8)
    monkeypatch.setattr(lean, "LAYER_BUDGET", 32 * 128)  # the tiny llama's widest activation: 128
    assert lean.layer_chunk(model.config) == 32
    rows = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0])) for layer in model.model.layers]
    try:
        auto = evaluate.nll_sum(model, ids)[0]
    finally:
        for h in hooks:
            h.remove()
    assert max(rows) == 32 and sum(rows) == 200 * len(model.model.layers)
    assert auto == pytest.approx(explicit, rel=1e-6)
