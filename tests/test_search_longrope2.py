"""LongRoPE2's options of the search engine: the critical-dimension space, the attention-factor
gene, batched evaluators (synthetic fitness functions, no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from longrope import scaling as sc
from longrope import search as S
from longrope.errors import UsageError
from test_search import SMALL, quadratic_fitness, strip_seconds

CRIT = S.CriticalDimSpace(dim=16, base=10000.0, original_length=64, target_length=256)  # s = 4, 8 pairs
CRIT_ATT = S.CriticalDimSpace(dim=16, base=10000.0, original_length=64, target_length=256, search_attention=True)
PLAIN_ATT = S.SearchSpace(dim=16, base=10000.0, original_length=64, target_length=256, search_attention=True)


def random_critical_genome(space: S.CriticalDimSpace, rng) -> S.Genome:
    """Any genome of the space, awkward ones included (c at both ends, plateaus, bounds)."""
    c = int(rng.choice([0, space.size, int(rng.integers(space.size + 1))]))
    raw = rng.integers(space.low - 50, space.top + 50, space.size - c)
    raw[rng.random(raw.size) < 0.3] = raw[0] if raw.size else 0
    attention = int(rng.integers(S.ATTENTION_TOP + 1)) if space.search_attention else None
    return space.make(c, np.sort(raw), int(rng.integers(len(space.n_hats))), attention)


def ntk_lambdas(space):
    return [round(1 + S.GRID_STEP * i, 2) for i in space.ntk]


# --------------------------------------------------------------------------------------------
# theoretical critical dimension


@pytest.mark.parametrize("dim, base, length, expected", [
    (128, 500000.0, 8192, 70),  # Llama 3 8B: 2⌈64·log_500000(8192/2π)⌉ = 2⌈34.98⌉
    (96, 10000.0, 4096, 68),  # Phi-3 mini
    (16, 10000.0, 64, 6),  # the tiny test model
    (16, 10000.0, 4, 0),  # L < 2π: every dimension rotates less than once; clipped at 0
])
def test_theoretical_critical_dim(dim, base, length, expected):
    assert S.theoretical_critical_dim(dim, base, length) == expected
    reference = 2 * math.ceil(dim / 2 * math.log(length / (2 * math.pi), base))
    assert expected == min(max(reference, 0), dim)


# --------------------------------------------------------------------------------------------
# the critical-dimension space


def test_critical_space_bounds_ntk_part_and_scaling():
    assert CRIT.low == 300 and CRIT.top == 700  # λ in [s, 2s] = [4, 8]
    exact = sc.ntk_factors(16, 10000.0, 4.0).tolist()
    assert CRIT.ntk == tuple(int(round((x - 1) * 100)) for x in exact)
    assert all(i < CRIT.low for i in CRIT.ntk[:-1]) and CRIT.ntk[-1] == CRIT.low  # NTK's last λ = s
    g = CRIT.make(3, [310, 400, 400, 450, 700])
    assert g.factor_steps == CRIT.ntk[:3] + (310, 400, 400, 450, 700) and g.critical_pairs == 3 and CRIT.contains(g)
    scaling = CRIT.scaling(g)
    assert scaling.long_factor == tuple(ntk_lambdas(CRIT)[:3]) + (4.1, 5.0, 5.0, 5.5, 8.0)
    assert scaling.attention_factor() == pytest.approx(sc.longrope_attention_factor("su", 4.0, 64))  # fixed "su"
    scaling.validate(16)
    assert CRIT.from_record(CRIT.record(g)) == g  # exact round trip through a history line
    assert CRIT.record(g)["critical"] == 3 and "attention_factor" not in CRIT.record(g)


def test_critical_repair_keeps_the_vector_monotone_and_canonical():
    # searched values below s are lifted to s, a decreasing tail becomes its running maximum
    assert CRIT.make(2, [0, 900, 350, 800, 10, 10]).factor_steps == CRIT.ntk[:2] + (300, 700, 700, 700, 700, 700)
    # missing searched values repeat the last one (or s)
    assert CRIT.make(5, [420]).factor_steps == CRIT.ntk[:5] + (420, 420, 420)
    assert CRIT.make(9, []).critical_pairs == 8 and CRIT.make(-3, []).critical_pairs == 0
    # a searched value equal to NTK's own (the last pair, λ = s) belongs to the NTK part: one genome per scaling
    pure_ntk = CRIT.make(8, [])
    assert CRIT.make(7, [300]) == pure_ntk and pure_ntk.factor_steps == CRIT.ntk
    assert not CRIT.contains(S.Genome(CRIT.ntk, 0, 7))
    assert not CRIT.contains(S.Genome(CRIT.ntk[:2] + (299,) * 6, 0, 2))  # below s
    assert not CRIT.contains(S.Genome((0,) * 2 + (300,) * 6, 0, 2))  # not NTK below c
    assert not CRIT.contains(S.Genome(CRIT.ntk, 0))  # no critical gene


def test_critical_seeds_hold_pi_ntk_yarn_and_the_theoretical_critical_dim():
    seeds = CRIT.baselines()
    assert set(seeds) == {"pi", "ntk", "yarn", "tcd"}
    assert seeds["pi"] == S.Genome((300,) * 8, 0, 0)  # PI: λ = s everywhere, nothing in the NTK part
    assert seeds["ntk"] == S.Genome(CRIT.ntk, 0, 8)  # NTK: all of it
    yarn = sc.yarn_factors(16, 10000.0, 64, 4.0).tolist()
    first_at_s = next(i for i, x in enumerate(yarn) if x >= 4 - 1e-9)
    assert seeds["yarn"].critical_pairs == first_at_s
    assert seeds["yarn"].factor_steps[first_at_s:] == (300,) * (8 - first_at_s)
    assert seeds["tcd"].critical_pairs == CRIT.critical_dim // 2 == 3
    assert seeds["tcd"].factor_steps == CRIT.ntk[:3] + (300,) * 5
    pop = S.initial_population(CRIT, np.random.default_rng(0), S.SearchConfig())
    assert len(pop) == len(set(pop)) == 64 and all(CRIT.contains(g) for g in pop)
    assert set(seeds.values()) <= set(pop[:4])
    assert {g.critical_pairs for g in pop} != {3}  # the population spreads c


def test_critical_genomes_always_monotone_and_in_bounds():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        if seed % 3 == 0:
            space = CRIT
        elif seed % 3 == 1:
            space = CRIT_ATT
        else:  # a real model's shape, a non-integer scale
            space = S.CriticalDimSpace(128, 500000.0, 8192, int(8192 * rng.uniform(1.5, 40)),
                                       search_attention=bool(seed % 2))
        a, b = random_critical_genome(space, rng), random_critical_genome(space, rng)
        assert space.contains(a) and space.contains(b), (seed, a, b)
        for p, local in ((0.3, 0.25), (1.0, 0.0), (1.0, 1.0), (0.05, 0.5)):
            child = space.mutate(a, rng, p, local)
            assert space.contains(child), (seed, p, local, child)
            lam = space.lambdas(child)
            assert all(x <= y for x, y in zip(lam, lam[1:])) and min(lam) >= 1 and max(lam) <= 2 * space.factor
            assert all(x >= space.factor - 1e-9 for x in lam[child.critical_pairs:])
        child = space.crossover(a, b, rng)
        assert child is None or (space.contains(child) and child.critical_pairs in (a.critical_pairs, b.critical_pairs))
        children = S.breed([a, b], space, rng, S.SearchConfig(mutations=3, crossovers=3), seen=[])
        assert all(space.contains(c) for c in children)
        assert len(set(children)) == len(children) and a not in children and b not in children


def test_critical_mutation_moves_c_both_ways_by_small_steps():
    rng = np.random.default_rng(3)
    g = CRIT.baselines()["tcd"]
    steps, seen = [], set()
    for _ in range(3000):
        child = CRIT.mutate(g, rng, 0.3, 0.25)
        steps.append(child.critical_pairs - g.critical_pairs)
        g = child
        seen.add(g.critical_pairs)
    assert seen == set(range(CRIT.size + 1))
    assert np.mean(np.abs(steps) <= 2) > 0.95  # small steps (a canonical jump at the last pair aside)


def critical_target(space, c, tail, n_hat=0):
    g = space.make(c, tail, n_hat)
    assert g.critical_pairs == c
    return g


def test_finds_a_known_critical_dimension():
    """A synthetic fitness minimised by one genome with c = 5: the NTK part is part of the
    optimum, so the search must find c itself, not only the values."""
    target = critical_target(CRIT, 5, [350, 420, 610], n_hat=3)
    fitness = quadratic_fitness(CRIT, target.factor_steps, 3)
    result = S.run(CRIT, fitness, S.SearchConfig(generations=60, local=0.5, seed=1))
    assert result.best.critical_pairs == 5, result.best
    assert max(abs(x - t) for x, t in zip(result.best.factor_steps, target.factor_steps)) <= 1
    assert result.summary["best"]["critical_pairs"] == 5 and result.summary["best"]["critical_dim"] == 10
    assert result.summary["space"] == {"algorithm": "critical-dim", "search_attention": False,
                                       "theoretical_critical_dim": 6, "theoretical_critical_pairs": 3}
    assert set(result.summary["baselines"]) == {"pi", "ntk", "yarn", "tcd"}


# --------------------------------------------------------------------------------------------
# the attention-factor gene


def attention_fitness(space, target_attention: float, target=None):
    base = quadratic_fitness(space, target or (0, 12, 40, 95, 150, 230, 300, 371), 0)

    def fitness(scaling):
        return base(scaling) + 10 * (scaling.attention_factor() - target_attention) ** 2

    return fitness


def test_attention_gene_seeds_su_and_is_searched():
    su = sc.longrope_attention_factor("su", 4.0, 64)
    assert PLAIN_ATT.initial_attention == round((su - 1) * 100) == 15
    seeds = PLAIN_ATT.baselines()
    assert all(g.attention_steps == 15 for g in seeds.values())
    assert PLAIN_ATT.scaling(seeds["pi"]).attention_factor() == 1.15
    assert PLAIN_ATT.scaling(seeds["pi"]).to_dict()["attention_factor"] == 1.15
    assert not PLAIN_ATT.contains(S.Genome((300,) * 8, 0))  # the gene is required
    assert not S.SearchSpace(16, 10000.0, 64, 256).contains(seeds["pi"])  # and refused without the option
    result = S.run(PLAIN_ATT, attention_fitness(PLAIN_ATT, 1.37), S.SearchConfig(generations=40, local=0.5, seed=0))
    assert result.best.attention_steps == 37 and result.scaling.attention_factor() == 1.37
    assert result.summary["best"]["attention_factor"] == 1.37


def test_attention_gene_mutation_stays_on_the_grid():
    rng = np.random.default_rng(0)
    g = PLAIN_ATT.baselines()["yarn"]
    seen = set()
    for _ in range(3000):
        g = PLAIN_ATT.mutate(g, rng, 0.3, 0.25)
        assert PLAIN_ATT.contains(g)
        seen.add(g.attention_steps)
    assert seen == set(range(S.ATTENTION_TOP + 1))


def test_identity_names_only_non_default_choices():
    assert set(S.SearchSpace(16, 10000.0, 64, 256).identity()) == {
        "dim", "base", "original_length", "target_length", "attention_factor"}  # older checkpoints still resume
    assert CRIT.identity()["algorithm"] == "critical-dim" and "search_attention" not in CRIT.identity()
    assert CRIT_ATT.identity()["search_attention"] is True


# --------------------------------------------------------------------------------------------
# files and resume with the new genes


def test_critical_dim_with_attention_resumes_exactly(tmp_path):
    """Checkpoint, history and the crash log carry c and the attention gene."""
    cfg = dict(seed=2, **SMALL)
    target = critical_target(CRIT, 4, [330, 400, 500, 520]).factor_steps
    fitness = lambda: attention_fitness(CRIT_ATT, 1.2, target)  # noqa
    straight = S.run(CRIT_ATT, fitness(), S.SearchConfig(generations=5, **cfg), tmp_path / "a")
    full = (tmp_path / "a" / S.HISTORY).read_text().splitlines(keepends=True)
    record = json.loads(full[0])
    assert set(record) == {"generation", "factors", "n_hat", "critical", "attention_factor", "fitness", "seconds"}
    state = json.loads((tmp_path / "a" / S.STATE).read_text())
    assert state["cache"][0][3].keys() == {"critical", "attention"} and len(state["population"][0]) == 3

    S.run(CRIT_ATT, fitness(), S.SearchConfig(generations=2, **cfg), tmp_path / "b")
    done = len(S.read_history(tmp_path / "b"))
    with open(tmp_path / "b" / S.HISTORY, "a") as f:
        f.writelines(full[done:done + 2])  # a crash mid-generation
    resumed = S.run(CRIT_ATT, fitness(), S.SearchConfig(generations=5, **cfg), tmp_path / "b", resume=True)
    assert (resumed.best, resumed.fitness) == (straight.best, straight.fitness)
    assert strip_seconds(S.read_history(tmp_path / "b")) == strip_seconds(S.read_history(tmp_path / "a"))
    assert sc.load(tmp_path / "b" / S.SCALING, 16).to_dict() == straight.scaling.to_dict()

    # another space is refused on resume
    with pytest.raises(UsageError, match="search_attention=True, not the default;"):
        S.run(CRIT, fitness(), S.SearchConfig(generations=6, **cfg), tmp_path / "b", resume=True)
    with pytest.raises(UsageError, match="algorithm='critical-dim', not the default;"):
        S.run(PLAIN_ATT, fitness(), S.SearchConfig(generations=6, **cfg), tmp_path / "b", resume=True)


# --------------------------------------------------------------------------------------------
# evaluators: the evolution does not depend on how candidates are evaluated


class Batched:
    def __init__(self, fitness, width):
        self.fitness, self.width, self.calls = fitness, width, []

    def __call__(self, scalings):
        self.calls.append(len(scalings))
        return [self.fitness(s) for s in scalings]


@pytest.mark.parametrize("space", [S.SearchSpace(16, 10000.0, 64, 256), CRIT_ATT], ids=["evolution", "critical"])
@pytest.mark.parametrize("budget", [dict(generations=4), dict(generations=9, max_evals=45)])
def test_any_evaluator_width_gives_the_same_search(tmp_path, space, budget):
    cfg = S.SearchConfig(seed=3, **budget, **SMALL)
    fitness = quadratic_fitness(space, critical_target(CRIT, 2, [320, 330, 400, 410, 500, 500]).factor_steps, 2)
    one = S.run(space, fitness, cfg, tmp_path / "one")
    for width in (1, 3, None):  # None: a whole generation per call
        evaluator = Batched(fitness, width)
        other = S.run(space, None, cfg, tmp_path / f"w{width}", evaluator=evaluator)
        assert (other.best, other.fitness) == (one.best, one.fitness)
        assert strip_seconds(other.stats) == strip_seconds(one.stats)
        assert strip_seconds(S.read_history(tmp_path / f"w{width}")) == strip_seconds(S.read_history(tmp_path / "one"))
        assert sum(evaluator.calls) == one.summary["evals"]
        if width:
            assert max(evaluator.calls) <= width
    if "max_evals" in budget:
        assert one.summary["evals"] == 45


def test_run_takes_fitness_or_evaluator():
    space = S.SearchSpace(16, 10000.0, 64, 256)
    with pytest.raises(TypeError, match="either fitness or evaluator"):
        S.run(space, None, S.SearchConfig(generations=0))
    with pytest.raises(TypeError, match="either fitness or evaluator"):
        S.run(space, quadratic_fitness(), S.SearchConfig(generations=0), evaluator=S.Serial(quadratic_fitness()))
    with pytest.raises(RuntimeError, match="returned 1 values for 3"):
        S.run(space, None, S.SearchConfig(generations=0, population=3, parents=3),
              evaluator=lambda scalings: [1.0])
