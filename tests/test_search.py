"""The evolutionary search engine, driven by synthetic fitness functions (no model needed)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from longrope import runs, scaling as sc
from longrope import search as S
from longrope.errors import UsageError

SPACE = S.SearchSpace(dim=16, base=10000.0, original_length=64, target_length=256)  # s = 4, 8 factors
SMALL = dict(population=12, mutations=4, crossovers=4, parents=6)
# a hidden optimum for the synthetic fitness: monotone grid indices (λ = 1 + i/100) and an n̂ index
TARGET = (0, 12, 40, 95, 150, 230, 300, 371)
TARGET_N_HAT = 5  # n̂ = 12


def quadratic_fitness(space=SPACE, target=TARGET, n_hat=TARGET_N_HAT, sleep=0.0, calls=None):
    """Squared distance of log λ to the hidden target, plus a small penalty per n̂ index away."""
    log_target = np.log1p(np.asarray(target) * S.GRID_STEP)

    def fitness(scaling: sc.LongRoPEScaling) -> float:
        if calls is not None:
            calls.append((scaling.long_factor, scaling.n_hat))
        if sleep:
            time.sleep(sleep)
        distance = float(((np.log(scaling.long_factor) - log_target) ** 2).sum())
        return distance + 0.01 * abs(space.n_hats.index(scaling.n_hat) - n_hat)

    return fitness


def random_genome(space, rng) -> S.Genome:
    """Monotone genomes including the awkward ones: plateaus and values at both bounds."""
    raw = rng.integers(-50, space.top + 50, space.size)
    raw[rng.random(space.size) < 0.3] = raw[0]
    return S.Genome(tuple(int(x) for x in np.sort(np.clip(raw, 0, space.top))), int(rng.integers(len(space.n_hats))))


def strip_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# --------------------------------------------------------------------------------------------
# search space and operators


def test_space_grid_bounds_and_scaling():
    assert SPACE.factor == 4 and SPACE.size == 8
    assert SPACE.top == 400  # λ ≤ 1.25·s = 5.00
    assert SPACE.n_hats == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32)  # only n̂ < original context 64
    g = S.Genome(TARGET, TARGET_N_HAT)
    scaling = SPACE.scaling(g)
    assert scaling.long_factor == (1.0, 1.12, 1.4, 1.95, 2.5, 3.3, 4.0, 4.71)
    assert scaling.n_hat == 12 and scaling.target_length == 256
    scaling.validate(SPACE.dim)
    assert SPACE.genome(scaling.long_factor, scaling.n_hat) == g  # exact round trip through floats
    assert sc.from_json(scaling.to_json(), SPACE.dim).to_dict() == scaling.to_dict()
    with pytest.raises(UsageError, match="above the model's context 64"):
        S.SearchSpace(16, 10000.0, 64, 64)


def test_snap_rounds_clips_and_keeps_monotone():
    assert SPACE.snap([0.5, 1.004, 1.006, 1.5, 1.49, 9.0, 9.0, 9.0]).factor_steps == (0, 0, 1, 50, 50, 400, 400, 400)


def test_initial_population_holds_exact_pi_ntk_yarn():
    d, b, s = SPACE.dim, SPACE.base, SPACE.factor
    rng = np.random.default_rng(0)
    pop = S.initial_population(SPACE, rng, S.SearchConfig())
    assert len(pop) == 64 and len(set(pop)) == 64
    assert all(SPACE.contains(g) for g in pop)
    for exact in (sc.pi_factors(d, b, s), sc.ntk_factors(d, b, s), sc.yarn_factors(d, b, 64, s)):
        snapped = tuple(int(round((x - 1) * 100)) for x in exact.tolist())  # already monotone and in bounds
        assert S.Genome(snapped, 0) in pop[:3]
    assert pop[0] == S.Genome((300,) * 8, 0)  # PI: every λ = s


def test_mutation_and_crossover_always_monotone_and_in_bounds():
    for seed in range(400):
        rng = np.random.default_rng(seed)
        space = SPACE if seed % 2 else S.SearchSpace(128, 500000.0, 8192, 8192 * int(rng.integers(2, 40)))
        a, b = random_genome(space, rng), random_genome(space, rng)
        assert space.contains(a) and space.contains(b)
        for p, local in ((0.3, 0.25), (1.0, 0.0), (1.0, 1.0), (0.05, 0.5)):
            child = S.mutate(a, space, rng, p, local)
            assert space.contains(child), (seed, p, local, child)
        child = S.crossover(a, b, rng)
        assert child is None or space.contains(child)
        if child is not None:
            assert all(x in (y, z) for x, y, z in zip(child.factor_steps, a.factor_steps, b.factor_steps))
        children = S.breed([a, b], space, rng, S.SearchConfig(mutations=3, crossovers=3), seen=[])
        assert children and all(space.contains(c) for c in children)
        assert len(set(children)) == len(children) and a not in children and b not in children


def test_mutation_can_leave_a_plateau_and_reach_both_bounds():
    rng = np.random.default_rng(1)
    g = S.Genome((300,) * 8, 0)
    seen = set()
    for _ in range(2000):
        g = S.mutate(g, SPACE, rng, 0.3, 0.25)
        seen.update(g.factor_steps)
    assert min(seen) == 0 and max(seen) == SPACE.top


def test_select_is_truncation_and_nan_is_worst():
    pop = [S.Genome((i,), 0) for i in range(5)]
    fit = {pop[0]: 3.0, pop[1]: float("nan"), pop[2]: 1.0, pop[3]: math.inf, pop[4]: 2.0}
    assert S.select(pop, fit, 3) == [pop[2], pop[4], pop[0]]
    assert S.select(pop, fit, 5)[-2:] == [pop[1], pop[3]]  # stable among the unusable


# --------------------------------------------------------------------------------------------
# the search


def test_finds_a_known_optimum():
    result = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=100, local=0.5, seed=0))
    err = max(abs(x - t) for x, t in zip(result.best.factor_steps, TARGET))
    assert err <= 1, (result.best, TARGET)
    assert result.best.n_hat_index == TARGET_N_HAT
    assert result.summary["evals"] <= 100 * 32 + 64
    stats = result.stats
    assert [s["generation"] for s in stats] == list(range(101))
    assert all(b2 <= b1 for b1, b2 in zip([s["best"] for s in stats], [s["best"] for s in stats][1:]))  # elitist


def test_every_genome_is_evaluated_once():
    calls = []
    result = S.run(SPACE, quadratic_fitness(calls=calls), S.SearchConfig(generations=30, **SMALL))
    assert len(calls) == len(set(calls)) == result.summary["evals"]
    assert len(calls) > 30 * 4  # the novelty draws keep generations full


def test_budget_in_evaluations():
    calls = []
    result = S.run(SPACE, quadratic_fitness(calls=calls), S.SearchConfig(max_evals=100))
    assert len(calls) == 100 and result.summary["stopped"] == "max_evals"


def test_budget_in_minutes():
    result = S.run(SPACE, quadratic_fitness(sleep=0.01), S.SearchConfig(max_minutes=0.2 / 60))
    assert result.summary["stopped"] == "max_minutes" and 5 <= result.summary["evals"] < 64


def test_same_seed_same_search_other_seed_other_search():
    runs = [S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=5, seed=seed, **SMALL)) for seed in (7, 7, 8)]
    assert runs[0].best == runs[1].best and strip_seconds(runs[0].stats) == strip_seconds(runs[1].stats)
    assert strip_seconds(runs[0].stats) != strip_seconds(runs[2].stats)


def test_config_is_validated():
    with pytest.raises(UsageError, match="parents"):
        S.run(SPACE, quadratic_fitness(), S.SearchConfig(population=8, parents=9))
    with pytest.raises(UsageError, match="p \\(mutation probability\\)"):
        S.SearchConfig(p=0).validate()


# --------------------------------------------------------------------------------------------
# files: outputs, refusal, resume


def test_outputs(tmp_path):
    out = tmp_path / "run"
    result = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=4, **SMALL), out, identity={"model": "m"})
    assert sorted(p.name for p in out.iterdir()) == sorted([runs.MARKER, S.STATE, S.HISTORY, S.SCALING, S.SUMMARY])
    assert sc.load(out / S.SCALING, SPACE.dim).to_dict() == result.scaling.to_dict()
    history = S.read_history(out)
    summary = json.loads((out / S.SUMMARY).read_text())
    assert len(history) == summary["evals"] == len({(tuple(h["factors"]), h["n_hat"]) for h in history})
    assert set(history[0]) == {"generation", "factors", "n_hat", "fitness", "seconds"}
    assert min(h["fitness"] for h in history) == summary["best_fitness"] == result.fitness
    assert set(summary["baselines"]) == {"pi", "ntk", "yarn"} and all(v > 0 for v in summary["baselines"].values())
    assert summary["identity"]["model"] == "m" and summary["identity"]["target_length"] == 256
    for key in ("seconds", "fitness_seconds", "evals_per_min", "overhead_share", "config", "versions", "stats"):
        assert key in summary
    assert 0 <= summary["overhead_share"] <= 1
    state = json.loads((out / S.STATE).read_text())
    assert state["finished"] == "generations" and state["generation"] == 5


def test_refuses_to_overwrite_and_checks_identity_on_resume(tmp_path):
    out, cfg = tmp_path / "run", S.SearchConfig(generations=1, **SMALL)
    S.run(SPACE, quadratic_fitness(), cfg, out, identity={"model": "a"})
    with pytest.raises(UsageError, match="finished search; pass --force"):
        S.run(SPACE, quadratic_fitness(), cfg, out, identity={"model": "a"})
    with pytest.raises(UsageError, match="model='a', not 'b'"):
        S.run(SPACE, quadratic_fitness(), cfg, out, identity={"model": "b"}, resume=True)
    other = S.SearchSpace(16, 10000.0, 64, 512)
    with pytest.raises(UsageError, match="target_length=256, not 512"):
        S.run(other, quadratic_fitness(other), cfg, out, identity={"model": "a"}, resume=True)
    with pytest.raises(UsageError, match="seed=0, not 1"):
        S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=1, seed=1, **SMALL), out,
              identity={"model": "a"}, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        S.run(SPACE, quadratic_fitness(), cfg, tmp_path / "other")
    with pytest.raises(UsageError, match="longrope did not write it"):  # --force replaces only our folders
        S.run(SPACE, quadratic_fitness(), cfg, tmp_path / "other", force=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    result = S.run(other, quadratic_fitness(other), cfg, out, identity={"model": "b"}, force=True)
    assert result.scaling.target_length == 512


def test_resume_with_a_larger_budget_equals_one_longer_run(tmp_path):
    cfg = dict(seed=4, **SMALL)
    S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=3, **cfg), tmp_path / "a")
    resumed = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=6, **cfg), tmp_path / "a", resume=True)
    straight = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=6, **cfg), tmp_path / "b")
    assert resumed.best == straight.best and resumed.fitness == straight.fitness
    assert strip_seconds(S.read_history(tmp_path / "a")) == strip_seconds(S.read_history(tmp_path / "b"))


def test_evaluations_logged_after_the_last_checkpoint_are_reused(tmp_path):
    """A crash mid-generation, simulated: the log holds part of generation 3 and a torn line."""
    cfg = dict(seed=5, **SMALL)
    straight = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=5, **cfg), tmp_path / "a")
    full = (tmp_path / "a" / S.HISTORY).read_text().splitlines(keepends=True)
    S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=2, **cfg), tmp_path / "b")
    done = len(S.read_history(tmp_path / "b"))
    with open(tmp_path / "b" / S.HISTORY, "a") as f:
        f.writelines(full[done:done + 3])
        f.write(full[done + 3][:25])  # killed while writing
    calls = []
    resumed = S.run(SPACE, quadratic_fitness(calls=calls), S.SearchConfig(generations=5, **cfg), tmp_path / "b",
                    resume=True)
    assert len(calls) == len(full) - done - 3  # the three logged evaluations were not repeated
    assert (resumed.best, resumed.fitness) == (straight.best, straight.fitness)
    assert strip_seconds(S.read_history(tmp_path / "b")) == strip_seconds(S.read_history(tmp_path / "a"))
    assert strip_seconds(resumed.stats) == strip_seconds(straight.stats)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from longrope import search as S
from test_search import SPACE, SMALL, quadratic_fitness
S.run(SPACE, quadratic_fitness(sleep=float(sys.argv[2])), S.SearchConfig(generations=6, seed=11, **SMALL),
      sys.argv[1], resume=True)
"""


def test_sigkill_mid_generation_then_resume_gives_the_uninterrupted_result(tmp_path):
    script = tmp_path / "search_job.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, str(script), str(out), "0.02"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for generation 2's checkpoint and part of generation 3
            state = S.read_state(out) if (out / S.STATE).is_file() else None
            if state and state["generation"] >= 3:
                logged = (out / S.HISTORY).read_text().count("\n")
                if logged >= len(state["cache"]) + 2:
                    break
            assert job.poll() is None, job.stderr.read().decode()
            time.sleep(0.005)
        else:
            pytest.fail("the search job made no progress")
        job.send_signal(signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    killed_at = S.read_state(out)
    assert killed_at["finished"] is None and killed_at["generation"] < 7
    assert (out / S.HISTORY).read_text().count("\n") > len(killed_at["cache"])  # evaluations past the checkpoint

    cfg = S.SearchConfig(generations=6, seed=11, **SMALL)
    calls = []
    resumed = S.run(SPACE, quadratic_fitness(calls=calls), cfg, out, resume=True)
    straight = S.run(SPACE, quadratic_fitness(), cfg, tmp_path / "straight")
    assert (resumed.best, resumed.fitness) == (straight.best, straight.fitness)
    assert strip_seconds(S.read_history(out)) == strip_seconds(S.read_history(tmp_path / "straight"))
    assert strip_seconds(resumed.stats) == strip_seconds(straight.stats)
    assert len(calls) < straight.summary["evals"] - len(killed_at["cache"])  # logged evaluations were reused


# --------------------------------------------------------------------------------------------
# the model fitness


def test_model_fitness_is_perplexity_with_the_scaling_attached():
    import torch
    from conftest import tiny_model

    from longrope import evaluate, models

    model = tiny_model("llama")
    space = S.SearchSpace(dim=16, base=10000.0, original_length=64, target_length=128)
    windows = [torch.randint(3, 259, (128,), generator=torch.Generator().manual_seed(0))]
    fitness = S.model_fitness(model, windows, chunk_size=64)
    pi, yarn = space.baselines()["pi"], space.baselines()["yarn"]
    ppl_pi = fitness(space.scaling(pi))
    assert models.attached_scaling(model) == space.scaling(pi)
    assert ppl_pi == pytest.approx(evaluate.perplexity(model, windows))
    assert math.isfinite(ppl_pi) and ppl_pi != fitness(space.scaling(yarn))


# --------------------------------------------------------------------------------------------
# --keep-angles-seen: the unturned pairs searched in [s, 1.25·s] only

SEEN = S.SearchSpace(dim=16, base=10000.0, original_length=64, target_length=256, keep_angles_seen=True)


def test_keep_angles_seen_floors_are_s_on_the_unturned_pairs_only():
    # 63·10000^(-2i/16) >= 2π for pairs 0-2 only; s = 4 is grid step 300
    assert SEEN.floors == (0, 0, 0, 300, 300, 300, 300, 300) and SPACE.floors == (0,) * 8
    ntk = SEEN.snap(SEEN.references()["ntk"])  # NTK's unturned pairs are below s: lifted to it
    assert SEEN.contains(ntk) and min(ntk.factor_steps[3:]) == 300
    below = S.Genome((0, 0, 0, 299, 300, 300, 300, 300))
    assert SPACE.contains(below) and not SEEN.contains(below)
    assert "ntk" not in SEEN.reference_scalings() and "ntk" in SPACE.reference_scalings()
    assert SEEN.identity()["keep_angles_seen"] is True and "keep_angles_seen" not in SPACE.identity()
    with pytest.raises(UsageError, match="--keep-angles-seen: goes with --algorithm evolution"):
        S.CriticalDimSpace(dim=16, base=10000.0, original_length=64, target_length=256, keep_angles_seen=True)


def test_keep_angles_seen_operators_stay_inside():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        a, b = (SEEN.snap(SEEN.lambdas(random_genome(SEEN, rng))) for _ in range(2))
        assert SEEN.contains(a) and SEEN.contains(b)
        for p, local in ((0.3, 0.25), (1.0, 0.0), (1.0, 1.0)):
            assert SEEN.contains(S.mutate(a, SEEN, rng, p, local)), seed
        children = S.breed([a, b], SEEN, rng, S.SearchConfig(mutations=3, crossovers=3), seen=[])
        assert all(SEEN.contains(c) for c in children)


def test_a_search_that_keeps_angles_seen_returns_a_scaling_that_keeps_them():
    """Against a target whose unturned pairs sit below s, every evaluated genome and the result
    stay at s or above there, and the result keeps every pair's angles seen up to (L-1)·s."""
    calls = []
    result = S.run(SEEN, quadratic_fitness(SEEN, calls=calls), S.SearchConfig(generations=20, seed=0, **SMALL))
    assert calls and all(min(f[3:]) >= 4.0 for f, _ in calls)
    assert sc.seen_distance(result.scaling, 16, 10000.0, 64, 256) >= 4 * 63 - 1e-9
    assert min(result.scaling.long_factor[3:]) == 4.0  # the target's 0.95-3.0 pulls them to the floor
