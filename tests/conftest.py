"""Tiny random transformers models (float32, CPU) shared by the tests."""

from __future__ import annotations

import pytest
import torch
import transformers

ORIGINAL = 64  # the tiny models' "trained" context
ARCHS = {
    # name: (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
}


def tiny_config(arch: str = "llama", rope_parameters: dict | None = None, max_position_embeddings: int = ORIGINAL,
                **overrides):
    config_cls = getattr(transformers, ARCHS[arch][0])
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    extra = dict(ARCHS[arch][2])
    if "partial_rotary_factor" in extra:
        rope["partial_rotary_factor"] = extra.pop("partial_rotary_factor")
    rope.update(rope_parameters or {})
    kwargs = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=max_position_embeddings,
                  rope_parameters=rope, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kwargs.update(extra)
    kwargs.update(overrides)
    if arch == "phi3":
        kwargs.pop("head_dim")
        kwargs["hidden_size"] = 64  # head_dim = 16, rotary dim = 8
        # Phi3Config defaults this to 4096; the tiny models are "trained" at ORIGINAL
        kwargs.setdefault("original_max_position_embeddings", rope.get("original_max_position_embeddings", ORIGINAL))
    return config_cls(**kwargs)


def tiny_model(arch: str = "llama", rope_parameters: dict | None = None, seed: int = 0, **kw):
    config = tiny_config(arch, rope_parameters, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch][1])(config)
    # random init is tiny (std 0.02): widen it so positional effects show in the logits
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def clone_with_config(model, rope_parameters: dict, max_position_embeddings: int | None = None, **extra):
    """Same weights, a different rope configuration (transformers' own implementation)."""
    arch = next(a for a, (_, m, _) in ARCHS.items() if m == type(model).__name__)
    params = {k: v for k, v in model.config.rope_parameters.items() if k == "partial_rotary_factor"}
    params.update({"rope_theta": model.config.rope_parameters["rope_theta"]})
    params.update(rope_parameters)
    other = tiny_model(arch, params, max_position_embeddings=max_position_embeddings or model.config.max_position_embeddings,
                       **extra)
    other.load_state_dict(model.state_dict())
    return other.eval()


def rotary_dim(model) -> int:
    from longrope.models import rope_info

    return rope_info(model.config).dim


@pytest.fixture(autouse=True)
def _token_cache_per_test(tmp_path, monkeypatch):
    """Each test's token cache (`data.load_tokenized`) in its own folder: the user's cache stays
    clean, and no test sees what another tokenised."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_inside_pytest(tmp_path_factory):
    """Whatever asks the system for a temporary folder during the tests (torchrun's
    torchelastic_* folders, gloo's files, extend's work folders) gets one inside pytest's own
    folder, which pytest removes (pyproject: tmp_path_retention_policy)."""
    import os
    import tempfile

    folder = str(tmp_path_factory.mktemp("system-tmp"))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


@pytest.fixture
def long_text_file(tmp_path):
    """One 200-word text of a 15-word vocabulary, long enough for the tiny model's searches."""
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    path = tmp_path / "long.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(200)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with a working tokenizer, for CLI tests."""
    from longrope.testing import save_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_tiny_model(tiny_model("llama"), path)
    return path


def assert_same_training_run(dir_a, dir_b, checkpoint: str = "checkpoint.pt", log: str = "train_log.jsonl"):
    """Two runs of six steps (one interrupted and resumed) left the same checkpoint and log:
    step, tokens, every weight and optimizer tensor bit for bit, the same logged losses."""
    import json
    from pathlib import Path

    a = torch.load(Path(dir_a) / checkpoint, weights_only=True)
    b = torch.load(Path(dir_b) / checkpoint, weights_only=True)
    assert a["step"] == b["step"] == 6 and a["tokens_seen"] == b["tokens_seen"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    log_a = [json.loads(x) for x in (Path(dir_a) / log).read_text().splitlines()]
    log_b = [json.loads(x) for x in (Path(dir_b) / log).read_text().splitlines()]
    assert [e["step"] for e in log_b] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b]
    return a, b
