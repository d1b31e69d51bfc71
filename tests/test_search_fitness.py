"""The model fitness of issue 15: weighted terms (perplexity, needle-driven perplexity at several
depths, the short-context term with the long factors) and the command that searches on fitness
documents and judges on disjoint validation documents."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import tiny_model
from longrope import passkey
from longrope import scaling as sc
from longrope import search as S
from longrope.cli import main
from longrope.tokenization import byte_tokenizer

SPACE = S.SearchSpace(dim=16, base=10000.0, original_length=64, target_length=256)


@pytest.mark.parametrize("text, weights", [("ppl", {"ppl": 1.0}), ("needle", {"needle": 1.0}),
                                           ("ppl=1,needle=0.5,short=0.25", {"ppl": 1.0, "needle": 0.5, "short": 0.25}),
                                           ("short=2", {"short": 2.0})])
def test_parse_fitness_and_back(text, weights):
    assert S.parse_fitness(text) == weights
    assert S.parse_fitness(S.fitness_name(weights)) == weights


@pytest.mark.parametrize("text", ["ppx", "ppl=0", "ppl=-1", "ppl=x", "ppl,ppl", "ppl=inf", ""])
def test_parse_fitness_refuses(text):
    with pytest.raises(ValueError):
        S.parse_fitness(text)


def test_served_long_is_the_long_regime_at_every_length():
    scaling = SPACE.scaling(SPACE.baselines()["yarn"])
    served = S.served_long(scaling)
    short = SPACE.original_length  # a prompt inside the original context
    torch.testing.assert_close(served.inv_freq(SPACE.dim, SPACE.base, short),
                               scaling.inv_freq(SPACE.dim, SPACE.base, short + 1))
    assert served.attention_factor(short) == scaling.attention_factor(short + 1) > 1
    # what transformers' longrope does instead: the short factors (all 1 here) with the long temperature
    assert not torch.equal(scaling.inv_freq(SPACE.dim, SPACE.base, short), served.inv_freq(SPACE.dim, SPACE.base, short))


def test_needles_at_depths_sit_at_that_share_of_the_document():
    tok = byte_tokenizer()
    docs = [[random.Random(i).randrange(3, 200) for _ in range(600)] for i in range(2)]
    samples = passkey.needle_samples(tok, docs, 512, seed=3, depths=[0.1, 0.5, 0.9])
    filler = 512 - (samples[0].needle_end - samples[0].needle_start) - samples[0].answer_length - len(
        tok("\n" + passkey.PASSKEY_QUESTION, add_special_tokens=False)["input_ids"])
    for sample, depth, doc in zip(samples, [0.1, 0.5, 0.9], [docs[0], docs[1], docs[0]]):
        assert sample.needle_start == round(depth * filler)
        assert sample.input_ids[:sample.needle_start].tolist() == doc[:sample.needle_start]
        answer = tok.decode(sample.input_ids[sample.answer_start:].tolist())
        assert answer == " " + sample.key
    assert len({s.key for s in samples}) == 3
    with pytest.raises(ValueError, match="depth"):
        passkey.needle_samples(tok, docs, 512, depths=[1.5])


def test_terms_are_the_weighted_geometric_mean_of_each_terms_perplexity():
    model = tiny_model("llama").eval()
    tok = byte_tokenizer()
    rng = random.Random(0)
    docs = [[rng.randrange(3, 100) for _ in range(300)] for _ in range(2)]
    weights = {"ppl": 1.0, "needle": 0.5, "short": 0.25}
    windows = {t: S.fitness_windows(t, docs, tok, 256, seed=0, original_length=64) for t in weights}
    assert [len(w) for w in windows["short"]] == [64, 64]
    evaluator = S.term_evaluator(model, windows, weights, chunk_size=64)
    scalings = [SPACE.scaling(g) for g in SPACE.baselines().values()]
    values = evaluator(scalings)
    for scaling, value in zip(scalings, values):
        # each term measured on its own, independently of Terms
        ppl = S.model_fitness(model, windows["ppl"], 64)(scaling)
        needle = S.model_fitness(model, windows["needle"], 64)(scaling)
        short = S.model_fitness(model, windows["short"], 64)(S.served_long(scaling))
        expected = math.exp((math.log(ppl) + 0.5 * math.log(needle) + 0.25 * math.log(short)) / 1.75)
        assert value == pytest.approx(expected, rel=1e-6)
    # one term alone is its perplexity; the batched evaluator gives the same numbers
    alone = S.term_evaluator(model, windows, {"ppl": 1.0}, chunk_size=64)(scalings[:1])[0]
    assert alone == pytest.approx(S.model_fitness(model, windows["ppl"], 64)(scalings[0]), rel=1e-9)
    batched = S.term_evaluator(model, windows, weights, chunk_size=64, candidates=3)(scalings)
    assert batched == pytest.approx(values, rel=1e-5)


# --------------------------------------------------------------------------------------------
# the command

SMALL = ["--population", "6", "--mutations", "2", "--crossovers", "2", "--parents", "3", "--generations", "2"]



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four documents of 300+ tokens in a JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    with open(path, "w") as f:
        for i in range(4):
            rng = random.Random(i)
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(words) for _ in range(80))}) + "\n")
    return path


def test_search_with_terms_and_validation(tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["search", "--model", str(tiny_model_dir), "--data", str(corpus), "--out", str(out),
                 "--target-length", "256", "--samples", "2", "--validation-samples", "2",
                 "--fitness", "ppl=1,needle=1,short=0.5", *SMALL])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / S.SUMMARY).read_text())
    fit_docs, valid_docs = summary["data"]["documents"], summary["data"]["validation_documents"]
    assert len(fit_docs) == len(valid_docs) == 2 and not set(fit_docs) & set(valid_docs)
    assert summary["data"]["weights"] == {"ppl": 1.0, "needle": 1.0, "short": 0.5}
    assert summary["selection"] == "validation"
    assert set(summary["references"]) == {"pi", "ntk", "yarn", "pi+su", "ntk+su", "yarn+su", "yarn+1"}
    best_reference = min(r["validation"] for r in summary["references"].values())
    assert summary["best_validation"] <= best_reference
    assert summary["gain_over_best_reference"] == pytest.approx(1 - summary["best_validation"] / best_reference,
                                                                abs=1e-6)
    assert all("validation" in s for s in summary["stats"])
    assert "best reference on validation" in printed
    # the returned file is what the summary says: the searched genome or the reference named
    scaling = sc.load(out / S.SCALING)
    if summary["returned"] != "search":
        reference = S.SearchSpace(dim=scaling_dim(tiny_model_dir), base=10000.0, original_length=64,
                                  target_length=256).reference_scalings()[summary["returned"]]
        assert scaling.long_factor == pytest.approx(reference.long_factor)
        assert scaling.attention_factor(256) == pytest.approx(reference.attention_factor(256))
    # resuming with other validation documents is refused
    code = main(["search", "--model", str(tiny_model_dir), "--data", str(corpus), "--out", str(out),
                 "--target-length", "256", "--samples", "2", "--validation-samples", "1", "--resume",
                 "--fitness", "ppl=1,needle=1,short=0.5", *SMALL])
    assert code == 2 and "validation_samples" in capsys.readouterr().err


def scaling_dim(model_dir) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


@pytest.mark.parametrize("extra, message", [
    (["--fitness", "ppl=2,foo=1"], "--fitness 'foo=1': terms are"),
    (["--validation-samples", "-1"], "--validation-samples -1: must be 0 or more"),
    (["--samples", "2", "--validation-samples", "3"], "not the 2 + 3"),
])
def test_bad_fitness_and_validation_options(tiny_model_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    code = main(["search", "--model", str(tiny_model_dir), "--data", str(corpus), "--out", str(out),
                 "--target-length", "256", *SMALL, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("seed", range(4))
def test_fitness_and_validation_documents_each_mix_the_sources(seed):
    from types import SimpleNamespace

    from longrope.data import TokenizedDocument
    from longrope.recipes.search import _split
    docs = [TokenizedDocument(f"{kind}/{i}", np.arange(300)) for kind in ("prose", "code") for i in range(4)]
    docs.append(TokenizedDocument("code/short", np.arange(10)))  # too short: never chosen
    chosen, held = _split(SimpleNamespace(samples=2, data="d.jsonl"), docs, 256, 2, seed)
    assert not {d.id for d in chosen} & {d.id for d in held}
    for group in (chosen, held):
        assert sorted(d.id.split("/")[0] for d in group) == ["code", "prose"], [d.id for d in group]
