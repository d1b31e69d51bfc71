"""`longrope search --readjust S`: the short-context readjustment (LongRoPE §3.3) of an existing
LongRoPE scaling, on the tiny model (context 64) and a few small text files."""

from __future__ import annotations

import json
import random

import pytest

from longrope import scaling as sc
from longrope import search as S
from longrope.cli import main
from test_search import strip_seconds

ORIGINAL = 64
# one generation of a few candidates: the all-ones and current seeds, mutations, then a generation
SMALL = ["--samples", "1", "--validation-samples", "1", "--population", "5", "--mutations", "2", "--crossovers", "2",
         "--parents", "3"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Three documents of a few hundred bytes (the tiny model's tokenizer is byte-level)."""
    folder = tmp_path_factory.mktemp("docs")
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    for i in range(3):
        rng = random.Random(i)
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)))
    return folder


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """An extended LongRoPE scaling to readjust (64 -> 256, non-trivial short factors, n̂ = 2, the
    long regime's temperature sharper than the model's own)."""
    path = tmp_path_factory.mktemp("scaling") / "extended.json"
    scaling = sc.make("longrope", ORIGINAL, 256, dim=16, base=10000.0, attention_setting=1.3).replace(
        short_factor=(1.0, 1.0, 1.02, 1.05, 1.1, 1.1, 1.2, 1.3), n_hat=2)
    path.write_text(scaling.to_json())
    return path


def readjust(model, data, out, scaling, *extra):
    return main(["search", "--model", str(model), "--data", str(data), "--out", str(out), "--readjust", str(scaling),
                 *SMALL, *extra])


@pytest.mark.parametrize("attention", ["keep", "one"])
def test_readjusts_only_the_short_factors(tiny_model_dir, docs, extended, tmp_path, capsys, attention):
    out = tmp_path / "readjusted"
    assert readjust(tiny_model_dir, docs, out, extended, "--generations", "1", "--readjust-attention", attention,
                    "--readjust-cap", "1.4") == 0
    assert "readjusting the short factors (in [1, 1.4]) at 64 tokens" in capsys.readouterr().out
    given, result = sc.load(extended, 16), sc.load(out / S.SCALING, 16)
    # S with other short factors: long factors, n̂, the long regime's attention factor as they were
    assert (result.long_factor, result.n_hat, result.factor) == (given.long_factor, given.n_hat, given.factor)
    assert result.attention_factor() == given.attention_factor() == 1.3
    short = result.short_factor
    assert all(1.0 <= v <= 1.4 for v in short) and list(short) == sorted(short)
    assert result.short_attention_factor == (1.0 if attention == "one" else None)
    summary = json.loads((out / S.SUMMARY).read_text())
    assert summary["data"]["tokens"] == ORIGINAL and summary["space"] == {
        "algorithm": "short-factor", "search_attention": False, "cap": 1.4}
    # the seeds and the references are all-ones and S's own short factors, nothing at another scale
    assert list(summary["baselines"]) == ["ones", "current"]
    assert set(summary["references"]) == {"ones", "current"}
    assert summary["selection"] == "validation"
    assert summary["best_validation"] <= summary["references"]["ones"]["validation"]
    assert summary["best_validation"] <= summary["references"]["current"]["validation"]
    history = S.read_history(out)
    assert history[0]["factors"] == [1.0] * 8 and all(1.0 <= min(h["factors"]) <= max(h["factors"]) <= 1.4
                                                      for h in history)


def test_resume_keeps_the_readjustment_and_equals_one_longer_run(tiny_model_dir, docs, extended, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert readjust(tiny_model_dir, docs, straight, extended, "--generations", "2", "--readjust-attention", "one",
                    "--validation-samples", "0") == 0
    assert readjust(tiny_model_dir, docs, resumed, extended, "--generations", "1", "--readjust-attention", "one",
                    "--validation-samples", "0") == 0
    # --resume alone (no --readjust, no --readjust-attention) continues the same readjustment
    assert main(["search", "--model", str(tiny_model_dir), "--data", str(docs), "--out", str(resumed), *SMALL,
                 "--validation-samples", "0", "--generations", "2", "--resume"]) == 0
    assert strip_seconds(S.read_history(resumed)) == strip_seconds(S.read_history(straight))
    assert (resumed / S.SCALING).read_text() == (straight / S.SCALING).read_text()
    assert sc.load(resumed / S.SCALING).short_attention_factor == 1.0

    # another S, or another attention choice, is another search
    other = tmp_path / "other.json"
    other.write_text(sc.load(extended).replace(short_factor=None).to_json())
    capsys.readouterr()
    for extra in (["--readjust", str(other)], ["--readjust", str(extended), "--readjust-attention", "keep"]):
        assert main(["search", "--model", str(tiny_model_dir), "--data", str(docs), "--out", str(resumed), *SMALL,
                     "--validation-samples", "0", "--generations", "3", "--resume", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"longrope: error: --resume {resumed}: that search is for "), err
    assert "readjust_attention='one', not 'keep'" in err[0]
    assert json.loads((resumed / S.SUMMARY).read_text())["generations"] == 3  # untouched


@pytest.mark.parametrize("case, message", [
    ("yarn", "S.json: a yarn scaling; --readjust takes a LongRoPE one"),
    ("context", "S.json: made for a context of 32, the model's is 64"),
    ("target", "--target-length 256: a readjustment searches the short factors at the model's own context, 64 "
               "tokens; drop --target-length"),
    ("init", "--init: not with --readjust"),
    ("algorithm", "--algorithm: not with --readjust"),
    ("fitness", "--fitness: not with --readjust"),
    ("search-attention", "--search-attention: not with --readjust"),
    ("cap", "--readjust-cap: only with --readjust S"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_model_dir, docs, extended, tmp_path, capsys, case,
                                                         message):
    path = tmp_path / "S.json"
    made = {"yarn": sc.make("yarn", ORIGINAL, 256, dim=16, base=10000.0),
            "context": sc.make("longrope", 32, 256, dim=16, base=10000.0)}.get(case)
    path.write_text((made or sc.load(extended)).to_json())
    extra = {"target": ["--target-length", "256"], "init": ["--init", str(extended)],
             "algorithm": ["--algorithm", "evolution"], "fitness": ["--fitness", "ppl=1,short=1"],
             "search-attention": ["--search-attention"]}.get(case, [])
    out = tmp_path / "out"
    if case == "cap":  # a plain search given a readjustment's option
        code = main(["search", "--model", str(tiny_model_dir), "--data", str(docs), "--out", str(out),
                     "--target-length", "128", "--readjust-cap", "1.2"])
    else:
        code = readjust(tiny_model_dir, docs, out, path, *extra)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longrope: error: ") and message in err[0], err
    assert not out.exists()


def test_the_references_of_a_readjustment_are_its_baselines():
    long = sc.make("longrope", ORIGINAL, 256, dim=16, base=10000.0).replace(short_factor=(1.0,) * 6 + (1.6, 1.7))
    space = S.ShortFactorSpace.for_scaling(long, 16, 10000.0, cap=1.5)
    references = space.reference_scalings()
    assert references == {"ones": long.replace(short_factor=(1.0,) * 8), "current": long}  # exact: 1.6 > cap
    assert {name: space.scaling(g) for name, g in space.baselines().items()} == {
        "ones": references["ones"], "current": long.replace(short_factor=(1.0,) * 6 + (1.5, 1.5))}
    # the saved identity rebuilds the same space (what --resume without --readjust does)
    loaded = sc.from_dict(long.to_dict(), 16)
    space = S.ShortFactorSpace.for_scaling(loaded, 16, 10000.0, cap=1.5)
    assert S.resumed_space(16, 10000.0, ORIGINAL, ORIGINAL, json.loads(json.dumps(space.identity()))) == space
