"""A search judged on validation documents (issue 15), driven by synthetic fitness functions whose
optimum differs from the validation optimum, as a fitness that overfits its few documents does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from longrope import scaling as sc
from longrope import search as S
from test_search import SMALL, SPACE, TARGET, quadratic_fitness, strip_seconds

# the validation documents agree on the factors but prefer another n̂, and strongly: a fitness on a
# few documents that cannot tell n̂ values apart
VALID_N_HAT = 1


def valid_fitness(calls=None):
    factors = quadratic_fitness(calls=calls)

    def fitness(scaling: sc.LongRoPEScaling) -> float:
        return factors(scaling) + 0.2 * abs(SPACE.n_hats.index(scaling.n_hat) - VALID_N_HAT)

    return fitness


def validation(calls=None):
    return S.Serial(valid_fitness(calls))


def oracle() -> sc.LongRoPEScaling:
    """The validation optimum itself, offered as a reference: no search of a few generations finds it."""
    return SPACE.scaling(S.Genome(TARGET, VALID_N_HAT))


def test_returns_the_validation_best_not_the_fittest():
    result = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=8, seed=1, **SMALL),
                   validation=validation())
    fit, valid = quadratic_fitness(), valid_fitness()
    fittest = result.summary["fittest"]
    # the returned genome is scored on validation as the validation function says ...
    assert result.validation == pytest.approx(valid(result.scaling))
    assert result.fitness == pytest.approx(fit(result.scaling))
    # ... it is better there than the fittest genome, which it is not (the optima differ)
    assert result.validation < fittest["validation"]
    assert result.fitness > fittest["fitness"]
    assert result.summary["selection"] == "validation" and result.returned == "search"
    # every generation logged its fittest genome's validation score
    assert all(s["validation"] is not None for s in result.stats)
    assert len(result.stats) == 9


def test_validation_best_among_every_genome_it_scored(tmp_path):
    calls = []
    result = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=5, seed=2, validate_top=6, **SMALL),
                   tmp_path / "s", validation=validation(calls))
    valid = valid_fitness()
    state = S.read_state(tmp_path / "s")
    scored = [valid(SPACE.scaling(S.Genome(tuple(x[0]), x[1]))) for x in state["validation"]]
    assert len(scored) == len(calls) >= 6  # each scored once: the seeds, each generation's fittest, the top 6
    assert result.validation == pytest.approx(min(scored))
    # the seeds were among them: PI, NTK and YaRN on the grid
    seeds = {SPACE.scaling(g).long_factor for g in SPACE.baselines().values()}
    assert seeds <= {f for f, _ in calls}


def test_never_worse_than_the_best_reference_and_says_so(tmp_path):
    references = {**SPACE.reference_scalings(), "oracle": oracle()}
    result = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=3, seed=3, **SMALL), tmp_path / "s",
                   validation=validation(), references=references)
    assert result.returned == "oracle"
    assert result.scaling == references["oracle"]
    assert result.validation == pytest.approx(valid_fitness()(references["oracle"]))
    on_disk = sc.load(tmp_path / "s" / S.SCALING)
    assert on_disk.long_factor == references["oracle"].long_factor
    summary = json.loads((tmp_path / "s" / S.SUMMARY).read_text())
    assert summary["returned"] == "oracle" and summary["best_reference"]["name"] == "oracle"
    assert summary["gain_over_best_reference"] == 0.0
    assert sc.load(tmp_path / "s" / S.REFERENCE).long_factor == references["oracle"].long_factor


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_with_the_plain_references_the_result_is_at_least_as_good_as_each(seed):
    references = SPACE.reference_scalings()
    assert set(references) == {"pi", "ntk", "yarn", "pi+su", "ntk+su", "yarn+su", "yarn+1"}
    result = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=2, seed=seed, **SMALL),
                   validation=validation(), references=references)
    valid = valid_fitness()
    best_reference = min(valid(r) for r in references.values())
    assert result.validation <= best_reference
    gain = result.summary["gain_over_best_reference"]
    assert gain == pytest.approx(1 - result.validation / best_reference, abs=1e-6)
    name = result.summary["best_reference"]["name"]
    assert result.summary["best_reference"]["validation"] == pytest.approx(valid(references[name]))


def test_without_validation_the_fittest_is_returned_unless_a_reference_beats_it():
    plain = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=3, seed=4, **SMALL))
    assert plain.summary["selection"] == "fitness" and plain.validation is None
    assert plain.fitness == min(plain.summary["stats"][-1]["best"], plain.fitness)
    better = SPACE.scaling(S.Genome(TARGET, 5))  # the fitness optimum itself
    judged = S.run(SPACE, quadratic_fitness(), S.SearchConfig(generations=3, seed=4, **SMALL),
                   references={"target": better})
    assert judged.returned == "target" and judged.fitness == pytest.approx(0.0)
    assert judged.best == plain.best  # the evolution itself is the same


def test_reference_scalings_are_the_methods_beyond_the_original_context():
    import torch
    references = SPACE.reference_scalings()
    n = SPACE.target_length
    for name, method in (("pi", sc.LinearScaling(factor=SPACE.factor)), ("ntk", sc.NTKScaling(factor=SPACE.factor)),
                         ("yarn", sc.YarnScaling(factor=SPACE.factor,
                                                 original_max_position_embeddings=SPACE.original_length))):
        ours, theirs = references[name], method
        torch.testing.assert_close(ours.inv_freq(SPACE.dim, SPACE.base, n).double(),
                                   theirs.inv_freq(SPACE.dim, SPACE.base, n).double(), rtol=1e-6, atol=0)
        assert ours.attention_factor(n) == pytest.approx(theirs.attention_factor(n))
    su = math.sqrt(1 + math.log(SPACE.factor) / math.log(SPACE.original_length))
    assert references["yarn+su"].attention_factor(n) == pytest.approx(su)
    assert references["yarn+1"].attention_factor(n) == 1.0


class Crash(Exception):
    pass


def crashing(fitness, after: int):
    """`fitness` that kills the search at its call number `after` (a process killed mid-generation)."""
    calls = []

    def wrapped(scaling):
        calls.append(1)
        if len(calls) == after:
            raise Crash
        return fitness(scaling)

    return wrapped


def test_killed_and_resumed_with_validation_equals_uninterrupted(tmp_path):
    cfg = S.SearchConfig(generations=5, seed=5, **SMALL)
    refs = SPACE.reference_scalings()
    straight = S.run(SPACE, quadratic_fitness(), cfg, tmp_path / "a", validation=validation(), references=refs)
    killed_at = len(refs) + SMALL["population"] + 3 * 8 + 3  # inside generation 4
    with pytest.raises(Crash):
        S.run(SPACE, crashing(quadratic_fitness(), killed_at), cfg, tmp_path / "b", validation=validation(),
              references=refs)
    assert S.read_state(tmp_path / "b")["generation"] == 4
    calls = []
    resumed = S.run(SPACE, quadratic_fitness(), cfg, tmp_path / "b", resume=True, validation=validation(calls),
                    references=refs)
    assert (resumed.best, resumed.fitness, resumed.validation) == (straight.best, straight.fitness,
                                                                   straight.validation)
    assert strip_seconds(resumed.stats) == strip_seconds(straight.stats)
    assert resumed.summary["references"] == straight.summary["references"]
    assert not any(f == refs["yarn"].long_factor for f, _ in calls)  # references were not scored again
    assert strip_seconds(S.read_history(tmp_path / "b")) == strip_seconds(S.read_history(tmp_path / "a"))
