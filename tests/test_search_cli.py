"""`longrope search` end to end on a tiny model (context 64) and a small text file."""

from __future__ import annotations

import json
import random

import pytest

from longrope import runs, scaling as sc
from longrope import search as S
from longrope.cli import main

SMALL = ["--samples", "1", "--population", "6", "--mutations", "2", "--crossovers", "2", "--parents", "3"]



@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly zebras".split()
    (folder / "long.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    (folder / "short.txt").write_text("too short")
    return folder


def search(model, data, out, *extra):
    return main(["search", "--model", str(model), "--data", str(data), "--out", str(out), *SMALL, *extra])


def test_search_writes_outputs_resumes_and_exports(tiny_model_dir, docs, tmp_path, capsys):
    out = tmp_path / "search"
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "128", "--generations", "2") == 0
    assert {p.name for p in out.iterdir()} == {runs.MARKER, *S.OUTPUT_FILES}
    summary = json.loads((out / S.SUMMARY).read_text())
    assert summary["evals"] == len(S.read_history(out)) > 6
    assert summary["model"]["original_length"] == 64 and summary["data"]["tokens"] == 128
    assert summary["best_fitness"] <= min(summary["baselines"].values())
    scaling = sc.load(out / S.SCALING, 16)
    assert scaling.target_length == 128 and len(scaling.long_factor) == 8
    assert "best perplexity" in capsys.readouterr().out

    # a finished search continues with a larger budget
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "128", "--generations", "3",
                  "--resume") == 0
    more = json.loads((out / S.SUMMARY).read_text())
    assert more["generations"] == 4 and more["evals"] > summary["evals"]

    # the result is a scaling file the rest of the CLI takes
    assert main(["export", "--model", str(tiny_model_dir), "--scaling", str(out / S.SCALING),
                 "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["rope_scaling"]["type"] == "longrope"


@pytest.mark.parametrize("case, message", [
    ("target", "--target-length 64 must be above the model's context 64"),
    ("data", "short.txt: no document has 128 tokens"),
    ("resume", "that search is for target_length=128, not 256"),
    ("exists", "holds a finished search; pass --force"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, docs, tmp_path, capsys, case, message):
    out = tmp_path / "search"
    if case in ("resume", "exists"):
        assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "128", "--generations", "0") == 0
        capsys.readouterr()
    args = {"target": (docs / "long.txt", "64", []), "data": (docs / "short.txt", "128", []),
            "resume": (docs / "long.txt", "256", ["--resume"]), "exists": (docs / "long.txt", "128", [])}[case]
    assert search(tiny_model_dir, args[0], out, "--target-length", args[1], *args[2]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longrope: error: ") and message in err[0], err


def test_longrope2_options_are_kept_on_resume(tiny_model_dir, docs, tmp_path, capsys):
    out = tmp_path / "search"
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "256", "--generations", "1",
                  "--fitness", "needle", "--algorithm", "critical-dim", "--search-attention") == 0
    printed = capsys.readouterr().out
    assert "critical dimension: theoretical d_tcd = 6 of 16" in printed and "answer perplexity (needle)" in printed
    summary = json.loads((out / S.SUMMARY).read_text())
    assert summary["space"] == {"algorithm": "critical-dim", "search_attention": True,
                                "theoretical_critical_dim": 6, "theoretical_critical_pairs": 3}
    assert {"critical_dim", "critical_pairs", "attention_factor"} <= set(summary["best"])
    assert summary["identity"]["fitness"] == "needle" and summary["data"]["fitness"] == "needle"
    assert set(summary["baselines"]) == {"pi", "ntk", "yarn", "tcd"}
    history = S.read_history(out)
    assert all(1 <= h["attention_factor"] <= 1.5 and 0 <= h["critical"] <= 8 for h in history)
    scaling = sc.load(out / S.SCALING, 16)
    assert scaling.attention_factor() == summary["best"]["attention_factor"]
    assert min(scaling.long_factor[summary["best"]["critical_pairs"]:]) >= 4  # searched part in [s, 2s]

    # --resume alone continues the same kind of search
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "256", "--generations", "2",
                  "--resume") == 0
    more = json.loads((out / S.SUMMARY).read_text())
    assert more["generations"] == 3 and more["space"]["algorithm"] == "critical-dim"
    assert all("critical" in h for h in S.read_history(out))
    capsys.readouterr()
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "256", "--generations", "3",
                  "--resume", "--fitness", "ppl") == 2
    assert "that search is for fitness='needle', not the default" in capsys.readouterr().err


def test_needle_needs_room_for_the_question(tiny_model_dir, docs, tmp_path, capsys):
    assert search(tiny_model_dir, docs / "long.txt", tmp_path / "s", "--target-length", "80",
                  "--fitness", "needle") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fitness needle: length 80: too short for the needle" in err[0], err


def test_init_starts_from_earlier_factors_and_is_kept_on_resume(tiny_model_dir, docs, tmp_path, capsys):
    """--init: a searched scaling's factors, as they are and carried to the new scale
    (λ^(ln s'/ln s): squared from s = 2 to s' = 4), are the first members of the initial population."""
    first = tmp_path / "s128"
    assert search(tiny_model_dir, docs / "long.txt", first, "--target-length", "128", "--generations", "1") == 0
    earlier = sc.load(first / S.SCALING, 16)
    out = tmp_path / "s256"
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "256", "--generations", "0",
                  "--init", str(first / S.SCALING)) == 0
    summary = json.loads((out / S.SUMMARY).read_text())
    assert list(summary["baselines"])[:2] == ["seed0", "seed1"] and {"pi", "ntk", "yarn"} <= set(summary["baselines"])
    history = S.read_history(out)
    carried = [min(round(v ** 2, 2), 5.0) for v in earlier.long_factor]  # on the 0.01 grid, at most 1.25·s
    assert history[0]["factors"] == list(earlier.long_factor) and history[1]["factors"] == carried
    assert history[0]["n_hat"] == history[1]["n_hat"] == earlier.n_hat
    assert summary["best_fitness"] <= min(summary["baselines"].values())

    # --resume without --init keeps the seeds; another --init is another search
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "256", "--generations", "1",
                  "--resume") == 0
    assert json.loads((out / S.SUMMARY).read_text())["generations"] == 2
    capsys.readouterr()
    assert search(tiny_model_dir, docs / "long.txt", out, "--target-length", "256", "--generations", "2",
                  "--resume", "--init", "none.json") == 2
    assert "--init none.json: no such file or preset" in capsys.readouterr().err

    # with LongRoPE2's critical-dimension space the seeds are snapped into it
    crit = tmp_path / "crit"
    assert search(tiny_model_dir, docs / "long.txt", crit, "--target-length", "256", "--generations", "0",
                  "--algorithm", "critical-dim", "--init", str(first / S.SCALING)) == 0
    assert {"seed0", "seed1", "tcd"} <= set(json.loads((crit / S.SUMMARY).read_text())["baselines"])


@pytest.mark.parametrize("make, message", [
    (lambda: sc.make("yarn", 64, 128, dim=16, base=10000.0), "a yarn scaling; --init takes searched LongRoPE"),
    (lambda: sc.make("longrope", 32, 128, dim=16, base=10000.0), "made for a context of 32, the model's is 64"),
    (lambda: sc.make("longrope", 64, 128, dim=16, base=10000.0).replace(n_hat=3), "n_hat 3 is not one the search uses"),
])
def test_init_refuses_what_is_not_an_earlier_search(tiny_model_dir, docs, tmp_path, capsys, make, message):
    path = tmp_path / "init.json"
    path.write_text(make().to_json())
    assert search(tiny_model_dir, docs / "long.txt", tmp_path / "s", "--target-length", "256",
                  "--init", str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
