"""What differs between the transformers 5.x releases we support (5.17 to the newest, `make test`
and `make test-lowest`): the KV-cache argument's name (`past_key_values`, `cache` from 5.24),
deprecation notices, rope-parameter validation messages."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers.utils import logging as hf_logging

from conftest import ORIGINAL, rotary_dim, tiny_model
from longrope import evaluate, models
from longrope import scaling as sc


@contextmanager
def transformers_messages():
    """Every Python warning (whatever pytest's filterwarnings ignore) and every transformers log
    record of level WARNING and above raised inside the block, as strings."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    handler, verbosity = Collect(level=logging.WARNING), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.warning_once.cache_clear()  # a notice already given once in this process is given again
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


def crossing_scaling(model) -> sc.LongRoPEScaling:
    """Short and long factors far apart, so cached keys from the short regime are visibly stale."""
    half = rotary_dim(model) // 2
    return sc.LongRoPEScaling(long_factor=torch.linspace(1, 6, half).tolist(),
                              short_factor=torch.linspace(1, 1.5, half).tolist(), factor=4.0,
                              original_max_position_embeddings=ORIGINAL)


def generate_across_switch(model, new_tokens=12):
    """Greedy generate() from a prompt just under the original context to past it."""
    prompt = torch.randint(3, 259, (1, ORIGINAL - 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)


def test_cache_argument_is_what_the_model_forward_accepts():
    model = tiny_model("llama")
    name = models.cache_argument(model)
    assert name in ("cache", "past_key_values")
    assert name in inspect.signature(type(model).forward).parameters
    assert name in inspect.signature(type(model).prepare_inputs_for_generation).parameters


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generation_drops_the_cache_exactly_once_at_the_switch(arch, monkeypatch):
    """The cache that generate() hands to the model class's prepare_inputs_for_generation is
    dropped (None) at exactly one step after the prefill: the first one past the original context.
    (Phi-3's own class drops it too, but only inside the method spied on here.)"""
    model = tiny_model(arch)
    cls = type(model)
    real = cls.prepare_inputs_for_generation
    calls = []  # (sequence length, cache names given, cached length or None for no cache)

    @functools.wraps(real)
    def spy(self, input_ids, *args, **kwargs):
        names = [k for k in ("cache", "past_key_values") if k in kwargs]
        cache = next((kwargs[k] for k in names if kwargs[k] is not None), None)
        calls.append((input_ids.shape[1], names, None if cache is None else cache.get_seq_length()))
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(cls, "prepare_inputs_for_generation", spy)
    models.attach(model, crossing_scaling(model))  # wraps the class method, the spy now
    generated = generate_across_switch(model)
    assert generated.shape[1] == ORIGINAL - 5 + 12
    assert [n for n, _, _ in calls] == list(range(ORIGINAL - 5, ORIGINAL + 7))
    assert [n for n, _, cached in calls[1:] if cached is None] == [ORIGINAL + 1]
    # the cache went on under the one name this transformers uses, never under both
    assert all(names == [models.cache_argument(model)] for _, names, _ in calls)
    # and after the switch the new cache (the whole sequence, long factors) is carried on
    assert [cached for n, _, cached in calls if n > ORIGINAL + 1] == list(range(ORIGINAL + 1, ORIGINAL + 6))


def test_generate_across_the_switch_gives_no_deprecation_notice():
    model = models.attach(tiny_model("llama"), crossing_scaling(tiny_model("llama")))
    with transformers_messages() as seen:
        generate_across_switch(model)
    assert not [m for m in seen if "deprecat" in m.lower()], seen


def test_checkpointing_is_enabled_without_deprecation_notice_and_recomputes_layers():
    """`models.enable_checkpointing` (fine-tuning's): on in every decoder layer, and silent on both
    ends of the supported range (5.24 deprecates `gradient_checkpointing_enable`)."""
    model = tiny_model("llama").train()
    with transformers_messages() as seen:
        models.enable_checkpointing(model)
    assert not [m for m in seen if "deprecat" in m.lower()], seen
    assert model.is_gradient_checkpointing
    calls = []
    # a module inside the layer: the recomputation runs it again, however the layer is wrapped
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    ids = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward
    with transformers_messages() as seen:
        models.disable_checkpointing(model)
    assert not [m for m in seen if "deprecat" in m.lower()], seen
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("prefill", ["lean", "modules"])
def test_greedy_generate_gives_no_deprecation_notice(prefill, monkeypatch):
    model = models.attach(tiny_model("llama"), sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0))
    if prefill == "modules":  # the model's own forward for the prompt, its returned cache read back
        monkeypatch.setattr(evaluate.generation.lean, "unsupported_reason", lambda model, n: "forced by the test")
    ids = torch.randint(3, 259, (40,), generator=torch.Generator().manual_seed(7))
    with transformers_messages() as seen:
        ours = evaluate.greedy_generate(model, ids, max_new_tokens=6)
    assert not [m for m in seen if "deprecat" in m.lower()], seen
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, 40:].tolist()
    assert ours == ref


def test_export_with_short_attention_factor_loads_without_unrecognized_keys_warning(tmp_path):
    from longrope.testing import save_tiny_model

    src = save_tiny_model(tiny_model("llama"), tmp_path / "src")
    model, tokenizer = models.load(str(src))
    scaling = sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0).replace(short_attention_factor=1.0)
    models.attach(model, scaling)
    with transformers_messages() as seen:
        out = models.export(model, tokenizer, scaling, tmp_path / "export")
        assert {"short_mscale", "long_mscale"} <= set(json.loads((out / "config.json").read_text())["rope_parameters"])
        models.load_config(str(out))
        reloaded, _ = models.load(str(out))
        reloaded.save_pretrained(tmp_path / "saved-again")  # its config declares our keys
    assert not [m for m in seen if "Unrecognized keys" in m], seen
    assert models.attached_scaling(reloaded).short_attention_factor == 1.0
    assert "ignore_keys_at_rope_validation" not in (out / "config.json").read_text()


def test_other_unrecognized_rope_keys_still_warn():
    from conftest import tiny_config

    params = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
              "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "short_mscale": 1.0, "long_mscale": 1.2}
    with transformers_messages() as seen, models.quiet_about_our_rope_keys():
        tiny_config("llama", params)  # ours alone: quiet
        tiny_config("llama", {**params, "typo_factor": 3.0})  # ours and another: warns
    assert len([m for m in seen if "Unrecognized keys" in m]) == 1 and "typo_factor" in str(seen), seen


def test_checkpointing_that_keeps_attention_runs_it_once_and_gives_the_same_gradients():
    """`enable_checkpointing(keep_attention=True)` (selective checkpointing): the fused attention
    kernel runs once per layer in a forward + backward (its output is kept), the rest of the layer
    twice (recomputed), and the gradients equal those of whole-layer checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class AttentionCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in models._attention_ops()
            return func(*args, **(kwargs or {}))

    ids = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(1))
    grads = {}
    for keep in (False, True):
        model = tiny_model("llama").train()
        models.enable_checkpointing(model, keep_attention=keep)
        mlp_calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: mlp_calls.append(1))
        with AttentionCalls() as attention:
            model(input_ids=ids, labels=ids).loss.backward()
        layers = len(model.model.layers)
        assert attention.count == (1 if keep else 2) * layers, (keep, attention.count)
        assert len(mlp_calls) == 2  # the rest of the layer is recomputed either way
        grads[keep] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
