"""Several search candidates in one batched forward (`search.Batched`, `rotary.BatchedRotaryEmbedding`,
`lean.final_hidden_states_batch`): the same perplexities, and the same search, as one at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ORIGINAL, rotary_dim, tiny_model
from longrope import evaluate, lean, models, rotary
from longrope import scaling as sc
from longrope import search as S
from longrope.cli import main


def _ids(n, seed):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed))


def candidates(dim):
    """Searched-looking scalings: different factors, n̂ = 0 and > 0, different attention factors."""
    space = S.SearchSpace(dim, 10000.0, ORIGINAL, 4 * ORIGINAL, search_attention=True)
    pop = S.initial_population(space, np.random.default_rng(1), S.SearchConfig(population=5))
    out = [space.scaling(g) for g in pop[:4]]
    out[1] = out[1].replace(n_hat=16)
    out[2] = out[2].replace(attention_setting=1.3, short_factor=tuple([1.1] * (dim // 2)))
    out[3] = out[3].replace(n_hat=4, attention_setting=1.05)
    assert len({s.attention_factor(4 * ORIGINAL) for s in out}) >= 3
    return out


def test_batched_rotary_matches_per_sample_rotary():
    dim, base = 16, 10000.0
    scalings = candidates(dim)
    for seq_len in (40, 200):  # short and long regime
        batched = rotary.BatchedRotaryEmbedding.from_scalings(scalings, dim, base, seq_len)
        positions = torch.arange(seq_len)
        cos, sin = batched.cos_sin(positions)
        q, k = torch.randn(len(scalings), seq_len, 4, 16), torch.randn(len(scalings), seq_len, 2, 16)
        qb, kb = batched.rotate(q.clone(), k.clone(), positions, seq_len, fused=False)
        for b, s in enumerate(scalings):
            one = rotary.ScaledRotaryEmbedding(s, dim, base)
            c1, s1 = one.cos_sin(positions, seq_len)
            # same float64 angles; float32 cos/sin of a larger tensor may take torch's vectorised
            # or scalar path depending on alignment, so allow an ulp (a wrong candidate is ~1e-4 off)
            exact = dict(rtol=0, atol=1e-6)
            torch.testing.assert_close(cos[b], c1, **exact)
            torch.testing.assert_close(sin[b], s1, **exact)
            q1, k1 = one.rotate(q[b], k[b], positions, seq_len, fused=False)
            torch.testing.assert_close(qb[b], q1, rtol=0, atol=1e-5)
            torch.testing.assert_close(kb[b], k1, rtol=0, atol=1e-5)


def test_batched_rotary_fused_kernel_interpreted():
    """The per-sample fused path (Triton interpreter on the CPU) equals the reference."""
    pytest.importorskip("triton")
    dim, base, n = 16, 10000.0, 40
    scalings = candidates(dim)[:2]
    batched = rotary.BatchedRotaryEmbedding.from_scalings(scalings, dim, base, 4 * ORIGINAL)
    positions = torch.arange(n)
    q, k = torch.randn(2, n, 2, 16), torch.randn(2, n, 1, 16)
    ref = batched.rotate(q.clone(), k.clone(), positions, 4 * ORIGINAL, fused=False)
    fused = batched.rotate(q.clone(), k.clone(), positions, 4 * ORIGINAL, fused=True)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-5)


def test_batch_of_one_sequence_per_row_equals_single():
    """The lean loop over a batch: each row is the single-sequence forward (same rotary for all)."""
    model = tiny_model("qwen2")
    models.attach(model, sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=rotary_dim(model), base=10000.0))
    ids = torch.stack([_ids(90, 1), _ids(90, 2)])
    both = lean.final_hidden_states_batch(model, ids, chunk_size=16)
    for b in range(2):
        torch.testing.assert_close(both[b], lean.final_hidden_states(model, ids[b], chunk_size=16),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_batched_perplexities_equal_serial(arch):
    model = tiny_model(arch)
    scalings = candidates(rotary_dim(model))
    windows = [_ids(200, 1), _ids(200, 2), (_ids(48, 3), 5), _ids(1, 4)]  # long, long, short (scored from 5), empty
    serial = S.Serial(S.model_fitness(model, windows, 32))(scalings)
    before = models.rotary_module(model)
    batched = S.Batched(model, windows, len(scalings), chunk_size=32)(scalings)
    assert models.rotary_module(model) is before  # put back
    assert batched == pytest.approx(serial, rel=1e-5)
    assert len(set(serial)) == len(serial)  # the candidates really differ
    # several forwards (max_batch) and the per-window sums
    split = S.Batched(model, windows, len(scalings), chunk_size=32, max_batch=3)(scalings)
    assert split == pytest.approx(serial, rel=1e-5)
    nlls = S.candidate_nlls(model, scalings, windows, 32)
    models.attach(model, scalings[1])
    for j, w in enumerate(windows):
        ids, first = w if isinstance(w, tuple) else (w, 1)
        ref = evaluate.nll_sum(model, ids, 32, first)
        assert nlls[1][j][1] == ref[1] and nlls[1][j][0] == pytest.approx(ref[0], rel=1e-5, abs=1e-6)


def test_batched_evaluator_falls_back_to_serial():
    model = tiny_model("llama")
    scalings = candidates(rotary_dim(model))[:2]
    windows = [_ids(100, 1)]
    model.train()  # the lean forward refuses a model in training mode
    try:
        values = S.Batched(model, windows, 2, chunk_size=32)(scalings)
        assert values == S.Serial(S.model_fitness(model, windows, 32))(scalings)
    finally:
        model.eval()


def test_search_batch_candidates_same_result(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    (tmp_path / "docs").mkdir()  # outputs never go inside a data folder
    for i in range(2):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    common = ["search", "--model", str(tiny_model_dir), "--data", str(tmp_path / "docs"), "--target-length", "128",
              "--samples", "2", "--population", "6", "--mutations", "3", "--crossovers", "2", "--parents", "3",
              "--generations", "2", "--search-attention"]
    outs = {}
    for k in (1, 3):
        out = tmp_path / f"out{k}"
        assert main([*common, "--out", str(out), "--batch-candidates", str(k)]) == 0
        outs[k] = out
    one, three = S.read_history(outs[1]), S.read_history(outs[3])
    assert len(one) == len(three) > 6
    strip = lambda r: {k: v for k, v in r.items() if k not in ("fitness", "seconds")}  # noqa: E731
    assert [strip(r) for r in one] == [strip(r) for r in three]
    for a, b in zip(one, three):
        assert b["fitness"] == pytest.approx(a["fitness"], rel=1e-6)
    s1, s3 = (json.loads((o / S.SUMMARY).read_text()) for o in (outs[1], outs[3]))
    assert s1["best"] == s3["best"]
    assert s3["environment"]["batch_candidates"] == 3
    assert (outs[1] / S.SCALING).read_text() == (outs[3] / S.SCALING).read_text()
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--batch-candidates", "0"]) == 2
    assert "--batch-candidates 0" in capsys.readouterr().err
