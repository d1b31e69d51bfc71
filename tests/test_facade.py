"""The seed's three lines, as written there, on a tiny model on the CPU."""

from __future__ import annotations

import random
import tempfile

import torch

from longrope import LongRoPEModel


def test_the_seed_s_three_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # extend_context's default output folder
    d_model, n_heads, num_layers, base_length = 32, 2, 1, 32
    target_length, batch = 64, 2
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    rng = random.Random(0)
    data = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(3)]  # ~300 tokens each
    input_ids = torch.randint(0, 259, (batch, target_length))

    model = LongRoPEModel(d_model, n_heads, num_layers, base_length)
    model = model.extend_context(data, target_length)
    output = model(input_ids)

    vocab = model.hf_model.config.vocab_size
    assert isinstance(model, LongRoPEModel) and model.max_length == target_length
    assert output.shape == (batch, target_length, vocab) and torch.isfinite(output).all()
    extension = model.last_extension  # the run's outcome: folder, final scaling, checkpoint, report
    assert extension.scaling.target_length == target_length and extension.model_dir.is_dir()
    assert extension.out.parent.parent == tmp_path
    assert [r["length"] for r in extension.report["results"]] == [32, 64]
