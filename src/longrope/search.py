"""Evolutionary search for LongRoPE's rescale factors (Ding et al. 2024, §3.2 and Algorithm 1).

A candidate is a vector of d/2 rescale factors λ_i (angle n·θ_i/λ_i) on a grid of step 0.01 in
[1, 1.25·s], non-decreasing in i, plus the number n̂ of leading positions left unscaled. The
fitness is any callable `fitness(scaling) -> float`, lower is better (perplexity of the scaled
model on long windows, see `model_fitness`), so the engine is tested with synthetic ones.

Algorithm 1 of the paper, as in its reference code: the initial population is PI, NTK and YaRN
and mutations of them; each generation keeps the best `parents` (truncation selection) and adds
`mutations` mutated and `crossovers` crossed-over children; every genome is evaluated once.
One addition: a share `local` of gene mutations are small steps rather than uniform redraws,
so the search can polish a good candidate (set local=0 for the paper's operator).

Reproducibility: one seeded numpy Generator drives every random choice. After each generation
`search_state.json` (population, fitness cache, RNG state, config, identity) is replaced
atomically, and every evaluation is appended to `history.jsonl` as it happens, so a search killed
mid-generation resumes from the last state, takes the evaluations it already paid for from the
log, and ends with exactly the result an uninterrupted run gives.

LongRoPE2 (Shang et al. 2025) options, in the same engine: `CriticalDimSpace` (pairs below a
searched critical index c keep NTK's factors, those from c on are searched in [s, 2s]), a searched
attention factor (`search_attention=True`), and any fitness (the recipe's needle-driven one).

Evaluation goes through an *evaluator*: a callable from a list of scalings to their fitness values
(`Serial` loops over a fitness; `Batched` runs several candidates in one batched forward;
`DistributedEvaluator` spreads them over the ranks of a torch.distributed group, see
`run_distributed`). The evolution never depends on the evaluator: the
children of a generation are drawn before any is evaluated and results are kept in their order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import runs
from .errors import UsageError
from .scaling import LongRoPEScaling, longrope_attention_factor, ntk_factors, pi_factors, yarn_factors

GRID_STEP = 0.01
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
# files a search writes into its output folder
STATE, HISTORY, SCALING, SUMMARY = "search_state.json", "history.jsonl", "scaling.json", "summary.json"
PLOT = "search.png"  # drawn by the recipe
OUTPUT_FILES = (STATE, HISTORY, SCALING, SUMMARY, PLOT)
STATE_VERSION = 1
ATTENTION_TOP = 50  # searched attention factor: 1 + 0.01·a, a in [0, 50] (1.00 .. 1.50)
ALGORITHMS = ("evolution", "critical-dim")

Fitness = Callable[[LongRoPEScaling], float]
Evaluator = Callable[[Sequence[LongRoPEScaling]], Sequence[float]]  # may have `width`: candidates per call


# --------------------------------------------------------------------------------------------
# the search space and its genomes


@dataclass(frozen=True)
class Genome:
    """One candidate: grid indices (λ_i = 1 + 0.01·factors[i]) and an index into the space's
    n̂ choices. Integers, so equality, hashing and the cache are exact."""

    factors: tuple[int, ...]
    n_hat: int = 0
    critical: int | None = None  # CriticalDimSpace: pairs [0, critical) keep NTK's factors
    attention: int | None = None  # with search_attention: attention factor 1 + 0.01·attention

    def extras(self) -> dict[str, int]:
        """The genes beyond factors and n̂ that this genome has (empty for the paper's genome)."""
        return {k: v for k, v in (("critical", self.critical), ("attention", self.attention)) if v is not None}


def n_hat_choices(original_length: int) -> tuple[int, ...]:
    """The n̂ values a search tries for a model trained at `original_length`."""
    return tuple(n for n in N_HAT_CHOICES if n < original_length)


@dataclass(frozen=True)
class SearchSpace:
    """Everything a genome needs to become a scaling: the model's rotary dim, base and context,
    and the target length. The genome ↔ scaling mapping and the variation operators are methods,
    so another space (`CriticalDimSpace`) plugs into the same search loop."""

    dim: int
    base: float
    original_length: int
    target_length: int
    attention_factor: float | str = "su"
    search_attention: bool = False  # an attention-factor gene (1.00..1.50) instead of `attention_factor`
    # extra members of the initial population, (λ values, n̂) pairs snapped into the space, before
    # PI, NTK and YaRN: progressive extension starts a longer search from earlier factors (`seeds_from`)
    seeds: tuple[tuple[tuple[float, ...], int], ...] = ()

    algorithm = "evolution"  # not a field: the name of the space on the command line and in identity

    def __post_init__(self):
        if self.target_length <= self.original_length:
            raise UsageError(f"--target-length {self.target_length} must be above the model's context "
                             f"{self.original_length}")
        if self.dim < 2 or self.dim % 2:
            raise UsageError(f"rotary dimension must be an even number >= 2, got {self.dim}")

    @property
    def scale(self) -> float:
        return self.target_length / self.original_length

    @property
    def size(self) -> int:
        return self.dim // 2

    @property
    def top(self) -> int:
        """Largest grid index: λ ≤ 1.25·s (the paper's upper bound)."""
        return int(math.floor((1.25 * self.scale - 1) / GRID_STEP + 1e-9))

    @property
    def n_hats(self) -> tuple[int, ...]:
        return n_hat_choices(self.original_length)

    # -- the attention gene ------------------------------------------------------------------
    def attention_value(self, genome: Genome) -> float | str:
        """What the scaling's attention_factor is: the gene's number, or the fixed choice."""
        if genome.attention is None:
            return self.attention_factor
        return round(1 + GRID_STEP * genome.attention, 2)

    @property
    def initial_attention(self) -> int | None:
        """The attention gene of the seeds: the fixed choice ("su") snapped to the grid."""
        if not self.search_attention:
            return None
        value = longrope_attention_factor(self.attention_factor, self.scale, self.original_length)
        return int(min(max(round((value - 1) / GRID_STEP), 0), ATTENTION_TOP))

    def _vary_attention(self, child: Genome, rng: np.random.Generator, p: float, local: float) -> Genome:
        if child.attention is None or rng.random() >= p:
            return child
        if rng.random() < local:
            step = int(rng.geometric(0.5)) * (1 if rng.random() < 0.5 else -1)
            value = min(max(child.attention + step, 0), ATTENTION_TOP)
        else:
            value = int(rng.integers(ATTENTION_TOP + 1))
        return dataclasses.replace(child, attention=value)

    # -- genome <-> scaling ------------------------------------------------------------------
    def lambdas(self, genome: Genome) -> tuple[float, ...]:
        return tuple(round(1 + GRID_STEP * i, 2) for i in genome.factors)

    def scaling(self, genome: Genome) -> LongRoPEScaling:
        return LongRoPEScaling.from_target(self.lambdas(genome), self.original_length, self.target_length,
                                           n_hat=self.n_hats[genome.n_hat],
                                           attention_factor_value=self.attention_value(genome))

    def snap(self, lambdas: Iterable[float], n_hat: int = 0) -> Genome:
        """The nearest grid genome: round to 0.01, clip to [1, 1.25·s], then a running maximum
        (the smallest change that makes the vector non-decreasing). `n_hat` is a value."""
        idx = np.rint((np.asarray(list(lambdas), dtype=np.float64) - 1) / GRID_STEP)
        idx = np.maximum.accumulate(np.clip(idx, 0, self.top)).astype(int)
        return Genome(tuple(int(i) for i in idx), self.n_hats.index(n_hat), attention=self.initial_attention)

    def genome(self, lambdas: Iterable[float], n_hat: int = 0, critical: int | None = None,
               attention_factor: float | None = None) -> Genome:
        """Parse exact grid values back (history lines); ValueError if not a valid genome."""
        attention = None if attention_factor is None else int(round((float(attention_factor) - 1) / GRID_STEP))
        g = Genome(tuple(int(round((float(v) - 1) / GRID_STEP)) for v in lambdas), self.n_hats.index(n_hat),
                   critical, attention)
        if not self.contains(g):
            raise ValueError(f"not a genome of this search space: {lambdas}")
        return g

    def contains(self, g: Genome) -> bool:
        f = g.factors
        return (len(f) == self.size and all(0 <= i <= self.top for i in f)
                and all(a <= b for a, b in zip(f, f[1:])) and 0 <= g.n_hat < len(self.n_hats)
                and g.critical is None and self._attention_ok(g))

    def _attention_ok(self, g: Genome) -> bool:
        if not self.search_attention:
            return g.attention is None
        return g.attention is not None and 0 <= g.attention <= ATTENTION_TOP

    # -- records: history lines, summary, checkpoint ------------------------------------------
    def record(self, g: Genome) -> dict[str, Any]:
        """The genome as a history line holds it (values, not indices)."""
        out: dict[str, Any] = {"factors": list(self.lambdas(g)), "n_hat": self.n_hats[g.n_hat]}
        if g.critical is not None:
            out["critical"] = g.critical
        if g.attention is not None:
            out["attention_factor"] = self.attention_value(g)
        return out

    def from_record(self, record: Mapping[str, Any]) -> Genome:
        return self.genome(record["factors"], record["n_hat"], record.get("critical"),
                           record.get("attention_factor"))

    def describe(self, g: Genome) -> dict[str, Any]:
        """The genome for summary.json's "best"."""
        out: dict[str, Any] = {"long_factor": list(self.lambdas(g)), "n_hat": self.n_hats[g.n_hat]}
        if g.attention is not None:
            out["attention_factor"] = self.attention_value(g)
        return out

    def summary(self) -> dict[str, Any]:
        """What summary.json says about the space beyond its identity."""
        return {"algorithm": self.algorithm, "search_attention": self.search_attention}

    # -- variation ---------------------------------------------------------------------------
    def mutate(self, g: Genome, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
        new = _mutate_genes(list(g.factors), 0, self.top, rng, p, local)
        n_hat = g.n_hat
        if len(self.n_hats) > 1 and rng.random() < p:
            n_hat = int(rng.integers(len(self.n_hats)))
        return self._vary_attention(dataclasses.replace(g, factors=tuple(new), n_hat=n_hat), rng, p, local)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
        child = crossover(a, b, rng)
        if child is not None and a.attention is not None:
            child = dataclasses.replace(child, attention=a.attention if rng.random() < 0.5 else b.attention)
        return child

    def baselines(self) -> dict[str, Genome]:
        """The given `seeds` ("seed0", ...), then PI, NTK-aware and YaRN as factor vectors on the
        grid (n̂ = 0): the seeds of the search."""
        d, b, s = self.dim, self.base, self.scale
        seeded = {f"seed{i}": self.snap(lambdas, n_hat) for i, (lambdas, n_hat) in enumerate(self.seeds)}
        return {**seeded, "pi": self.snap(pi_factors(d, b, s).tolist()),
                "ntk": self.snap(ntk_factors(d, b, s).tolist()),
                "yarn": self.snap(yarn_factors(d, b, self.original_length, s).tolist())}

    def identity(self) -> dict[str, Any]:
        out = {"dim": self.dim, "base": self.base, "original_length": self.original_length,
               "target_length": self.target_length, "attention_factor": self.attention_factor}
        # only where they differ from the paper's search, so older checkpoints still resume
        if self.algorithm != "evolution":
            out["algorithm"] = self.algorithm
        if self.search_attention:
            out["search_attention"] = True
        if self.seeds:
            out["seeds"] = [[list(lambdas), n_hat] for lambdas, n_hat in self.seeds]
        return out


def theoretical_critical_dim(dim: int, base: float, original_length: int) -> int:
    """LongRoPE2's theoretical critical dimension d_tcd = 2⌈(d/2)·log_b(L/2π)⌉, clipped to [0, d]:
    the dimensions from d_tcd on rotate less than once in the original context L, so their
    training never saw a full period."""
    value = 2 * math.ceil((dim / 2) * math.log(original_length / (2 * math.pi)) / math.log(base))
    return int(min(max(value, 0), dim))


@dataclass(frozen=True)
class CriticalDimSpace(SearchSpace):
    """LongRoPE2's search space: frequency pairs below a critical index c (a gene) keep NTK-aware
    scaling (λ_i = θ_i/θ'_i with base b·s^(d/(d−2)), on the grid), pairs from c on are searched
    in [s, 2s], non-decreasing. NTK's λ_i < s for every pair but the last, so the whole vector is
    non-decreasing; the repair still lifts the searched part to at least the NTK part's last value.

    Genomes hold the whole factor vector (NTK part included) and c, so equal scalings are equal
    genomes (a searched value equal to NTK's at c counts in the NTK part). c in [0, d/2]: 0
    searches every pair, d/2 is NTK."""

    algorithm = "critical-dim"

    @property
    def low(self) -> int:
        """Smallest grid index of the searched part: λ ≥ s."""
        return int(math.ceil((self.scale - 1) / GRID_STEP - 1e-9))

    @property
    def top(self) -> int:
        """Largest grid index: λ ≤ 2·s."""
        return int(math.floor((2 * self.scale - 1) / GRID_STEP + 1e-9))

    @cached_property
    def ntk(self) -> tuple[int, ...]:
        """NTK-aware factors on the grid, for every pair."""
        idx = np.rint((ntk_factors(self.dim, self.base, self.scale).numpy() - 1) / GRID_STEP)
        return tuple(int(i) for i in np.maximum.accumulate(np.maximum(idx, 0)))

    @property
    def critical_dim(self) -> int:
        """d_tcd, in dimensions (twice the pairs)."""
        return theoretical_critical_dim(self.dim, self.base, self.original_length)

    def make(self, critical: int, searched: Iterable[float | int], n_hat: int = 0,
             attention: int | None = None) -> Genome:
        """A repaired genome: NTK below `critical`, the searched grid indices (one per pair from
        `critical` on; missing ones repeat the last) clipped to [s, 2s] and made non-decreasing."""
        c = int(min(max(critical, 0), self.size))
        head = list(self.ntk[:c])
        tail = [int(x) for x in searched][:self.size - c]
        tail += [tail[-1] if tail else self.low] * (self.size - c - len(tail))
        floor = max([self.low] + head[-1:])
        tail = np.maximum.accumulate(np.clip(np.asarray(tail, dtype=np.int64), floor, self.top)) if tail else []
        factors = tuple(head + [int(x) for x in tail])
        while c < self.size and factors[c] == self.ntk[c]:  # NTK's own value (its last pair, λ = s)
            c += 1  # one genome per scaling: count it in the NTK part
        return Genome(factors, n_hat, c, attention)

    def snap(self, lambdas: Iterable[float], n_hat: int = 0, critical: int | None = None) -> Genome:
        """Into this space: c defaults to the first pair with λ ≥ s (NTK before it); the values
        from c on are rounded to the grid and repaired."""
        values = np.asarray(list(lambdas), dtype=np.float64)
        if critical is None:
            above = np.flatnonzero(values >= self.scale - 1e-9)
            critical = int(above[0]) if above.size else self.size
        idx = np.rint((values - 1) / GRID_STEP)
        return self.make(critical, idx[critical:], self.n_hats.index(n_hat), self.initial_attention)

    def contains(self, g: Genome) -> bool:
        f, c = g.factors, g.critical
        return (c is not None and 0 <= c <= self.size and len(f) == self.size
                and f[:c] == self.ntk[:c] and all(self.low <= i <= self.top for i in f[c:])
                and (c == self.size or f[c] != self.ntk[c])
                and all(a <= b for a, b in zip(f, f[1:])) and 0 <= g.n_hat < len(self.n_hats)
                and self._attention_ok(g))

    def describe(self, g: Genome) -> dict[str, Any]:
        return {**super().describe(g), "critical_pairs": g.critical, "critical_dim": 2 * g.critical}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "theoretical_critical_dim": self.critical_dim,
                "theoretical_critical_pairs": self.critical_dim // 2}

    def mutate(self, g: Genome, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
        """c moves by ±1, 2, 4... pairs with probability p (pairs that enter the searched part
        start at the searched part's first value); then the searched genes as the paper's
        operator, between s and 2s; n̂ and the attention gene as in `SearchSpace`."""
        c = g.critical
        if rng.random() < p:
            step = int(rng.geometric(0.5)) * (1 if rng.random() < 0.5 else -1)
            c = int(min(max(c + step, 0), self.size))
        old = g.factors[g.critical:]
        first = old[0] if old else self.low
        tail = [first] * max(0, g.critical - c) + list(old[max(0, c - g.critical):])
        # NTK's values never exceed s, so the searched genes' lower bound is s; `make` repairs
        # and makes the result canonical once the genes have moved
        tail = _mutate_genes(tail, self.low, self.top, rng, p, local)
        n_hat = g.n_hat
        if len(self.n_hats) > 1 and rng.random() < p:
            n_hat = int(rng.integers(len(self.n_hats)))
        return self._vary_attention(self.make(c, tail, n_hat, g.attention), rng, p, local)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
        """c from either parent, each searched gene from either parent (a parent's NTK value
        counts as s there); None when the mix is not non-decreasing."""
        c = a.critical if rng.random() < 0.5 else b.critical
        take_a = rng.random(self.size) < 0.5
        mix = [max(x, self.low) for x in np.where(take_a, a.factors, b.factors)[c:]]
        if any(x > y for x, y in zip(mix, mix[1:])):
            return None
        child = self.make(c, mix, a.n_hat if rng.random() < 0.5 else b.n_hat, a.attention)
        if a.attention is not None:
            child = dataclasses.replace(child, attention=a.attention if rng.random() < 0.5 else b.attention)
        return child

    def baselines(self) -> dict[str, Genome]:
        """PI, NTK and YaRN snapped into this space, and NTK below d_tcd with λ = s from there."""
        seeds = super().baselines()  # uses self.snap: already in this space
        seeds["tcd"] = self.make(self.critical_dim // 2, [], 0, self.initial_attention)
        return seeds


def rescale_factors(long_factor: Sequence[float], factor: float, new_factor: float) -> tuple[float, ...]:
    """Carry factors searched for scale s to scale s' > 1: λ' = λ^(ln s' / ln s), which keeps
    λ = 1 (unscaled high frequencies) at 1, maps λ = s to s', and keeps the vector's order."""
    if factor <= 1 or new_factor <= 1:
        raise ValueError(f"rescale_factors: scales must be > 1, got {factor} and {new_factor}")
    power = math.log(new_factor) / math.log(factor)
    return tuple(float(max(1.0, v) ** power) for v in long_factor)


def seeds_from(scaling: LongRoPEScaling, target_length: int) -> tuple[tuple[tuple[float, ...], int], ...]:
    """A searched scaling as seeds of a search at `target_length`: its factors as they are and
    carried to the new scale (`rescale_factors`), each with its n̂: the paper's progressive
    extension, where the factors searched for a shorter length start the search for a longer one."""
    carried = rescale_factors(scaling.long_factor, scaling.factor, target_length / scaling.original_max_position_embeddings)
    return ((tuple(scaling.long_factor), scaling.n_hat), (carried, scaling.n_hat))


SHORT_CAP = 1.5  # default upper bound of the searched short factors


@dataclass(frozen=True)
class ShortFactorSpace(SearchSpace):
    """Short-context readjustment (LongRoPE §3.3): search `short_factor` (used for sequences up to
    the original context) of an extended scaling, its `long_factor`, n̂ and attention factor kept.

    A genome is d/2 non-decreasing factors on the 0.01 grid in [1, cap]: a short sequence needs at
    most a mild interpolation (the model was trained there with λ = 1; what the factors can offset
    is a fine-tune's drift and, where the short regime keeps the long attention factor, some of
    that temperature), so the cap is far below 1.25·s. The all-ones vector is the first seed (and
    the scaling's own short factors, if any, the second), so it is always evaluated and the
    search's best is never worse than all-ones on the fitness documents. Build it with
    `for_scaling`."""

    long: LongRoPEScaling | None = None
    cap: float = SHORT_CAP

    algorithm = "short-factor"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.long, LongRoPEScaling):
            raise UsageError("short-factor search: needs the extended LongRoPE scaling (long=...)")
        if not 1 < self.cap <= 1.25 * self.scale:
            raise UsageError(f"short-factor search: cap must be in (1, {1.25 * self.scale:g}], got {self.cap}")

    @classmethod
    def for_scaling(cls, scaling: LongRoPEScaling, dim: int, base: float, cap: float = SHORT_CAP) -> "ShortFactorSpace":
        return cls(dim, base, scaling.original_max_position_embeddings, scaling.target_length, long=scaling, cap=cap)

    @property
    def top(self) -> int:
        return int(math.floor((self.cap - 1) / GRID_STEP + 1e-9))

    @property
    def n_hats(self) -> tuple[int, ...]:
        return (self.long.n_hat,)  # one choice: n̂ is the long scaling's, never mutated

    def scaling(self, genome: Genome) -> LongRoPEScaling:
        return self.long.replace(short_factor=self.lambdas(genome))

    def snap(self, lambdas: Iterable[float], n_hat: int | None = None) -> Genome:
        return super().snap(lambdas, self.long.n_hat if n_hat is None else n_hat)

    def baselines(self) -> dict[str, Genome]:
        seeds = {"ones": Genome((0,) * self.size, 0)}
        if self.long.short_factor is not None:
            seeds["current"] = self.snap(self.long.short_factor)
        return seeds

    def describe(self, g: Genome) -> dict[str, Any]:
        return {"short_factor": list(self.lambdas(g)), "n_hat": self.long.n_hat}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "cap": self.cap}

    def identity(self) -> dict[str, Any]:
        long = self.long.to_dict()
        return {**super().identity(), "algorithm": self.algorithm, "cap": self.cap,
                "long_factor": long["long_factor"], "n_hat": self.long.n_hat,
                "scaling_attention_factor": long["attention_factor"]}


@dataclass
class SearchConfig:
    """The paper's settings (population 64, 16 + 16 children, 32 parents, p = 0.3, 40
    generations); a budget stops the search early, after the evaluation that exhausts it."""

    population: int = 64  # size of the initial population
    mutations: int = 16  # mutated children per generation
    crossovers: int = 16  # crossed-over children per generation
    parents: int = 32  # survivors of truncation selection
    p: float = 0.3  # per-gene mutation probability
    local: float = 0.25  # share of gene mutations that are small steps (0: the paper's uniform redraw)
    generations: int = 40  # breeding rounds after the initial population
    max_evals: int | None = None  # stop after this many fitness evaluations
    max_minutes: float | None = None  # wall time, resumed sessions included (not reproducible)
    seed: int = 0
    max_tries: int = 16  # attempts to draw a child not yet evaluated

    BUDGET = ("generations", "max_evals", "max_minutes")  # may change when a search is resumed

    def validate(self) -> "SearchConfig":
        checks = [
            (self.population >= 1, f"population must be >= 1, got {self.population}"),
            (1 <= self.parents <= self.population, f"parents must be in [1, population={self.population}], "
                                                   f"got {self.parents}"),
            (self.mutations >= 0 and self.crossovers >= 0 and self.mutations + self.crossovers >= 1,
             "mutations and crossovers must be >= 0, and not both 0"),
            (0 < self.p <= 1, f"p (mutation probability) must be in (0, 1], got {self.p}"),
            (0 <= self.local <= 1, f"local (share of small-step mutations) must be in [0, 1], got {self.local}"),
            (self.generations >= 0, f"generations must be >= 0, got {self.generations}"),
            (self.max_evals is None or self.max_evals >= 1, f"max_evals must be >= 1, got {self.max_evals}"),
            (self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}"),
            (self.max_tries >= 1, f"max_tries must be >= 1, got {self.max_tries}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"search config: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# pure operators: (genomes, rng) -> genomes; every result is monotone and in bounds


def _mutate_genes(values: list[int], low: int, top: int, rng: np.random.Generator, p: float,
                  local: float) -> list[int]:
    """Each gene, with probability p, redrawn between its neighbours (left: already redrawn, right:
    not yet), so a non-decreasing vector stays so; the ends are bounded by `low` and `top`."""
    last = len(values) - 1
    for i in np.flatnonzero(rng.random(len(values)) < p):
        lo = values[i - 1] if i > 0 else low
        hi = values[i + 1] if i < last else top
        if rng.random() < local:
            step = int(rng.geometric(0.5)) * (1 if rng.random() < 0.5 else -1)
            values[i] = min(max(values[i] + step, lo), hi)
        else:
            values[i] = int(rng.integers(lo, hi + 1))
    return values


def mutate(g: Genome, space: SearchSpace, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
    """Each λ_i, with probability p, is redrawn between its neighbours (left: already redrawn,
    right: not yet), which keeps the vector non-decreasing without any repair; the ends are
    bounded by 1 and 1.25·s. The redraw is uniform (the paper), or with probability `local` a
    small step of ±1, 2, 4... grid steps: a uniform redraw between neighbours 50 steps apart lands
    within one step of the optimum 1 time in 30, so polishing needs small moves. n̂ is redrawn
    (uniformly) with probability p too. (`space.mutate`: each space has its own operator.)"""
    return space.mutate(g, rng, p, local)


def crossover(a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
    """Each gene (and n̂) from either parent with equal chance; None when the mix is not
    non-decreasing (where the parents' curves cross), so the caller draws again."""
    take_a = rng.random(len(a.factors)) < 0.5
    child = tuple(int(x) for x in np.where(take_a, a.factors, b.factors))
    n_hat = a.n_hat if rng.random() < 0.5 else b.n_hat
    if any(x > y for x, y in zip(child, child[1:])):
        return None
    return dataclasses.replace(a, factors=child, n_hat=n_hat)


def _rank(fitness: float | None) -> float:
    return math.inf if fitness is None or math.isnan(fitness) else fitness


def select(population: list[Genome], fitness: Mapping[Genome, float], k: int) -> list[Genome]:
    """Truncation selection: the k fittest (stable, so ties keep population order)."""
    return sorted(population, key=lambda g: _rank(fitness[g]))[:k]


def _novel(make: Callable[[], Genome | None], taken: set, tries: int) -> Genome | None:
    """A child not evaluated before and not already drawn, or None after `tries` draws (a
    duplicate would cost a population slot and teach nothing)."""
    for _ in range(tries):
        child = make()
        if child is not None and child not in taken:
            taken.add(child)
            return child
    return None


def initial_population(space: SearchSpace, rng: np.random.Generator, config: SearchConfig) -> list[Genome]:
    """The space's seeds (PI, NTK and YaRN on the grid...), then mutations of them up to
    `config.population`."""
    seeds = list(dict.fromkeys(space.baselines().values()))  # distinct, in order
    population = seeds[:config.population]
    taken = set(population)
    parents = list(seeds)
    while len(population) < config.population and parents:
        parent = parents[int(rng.integers(len(parents)))]
        child = _novel(lambda: mutate(parent, space, rng, config.p, config.local), taken, config.max_tries)
        if child is None:  # its neighbourhood is used up (a small space, or NTK in the critical-dim one)
            parents.remove(parent)
            continue
        population.append(child)
    return population


def breed(parents: list[Genome], space: SearchSpace, rng: np.random.Generator, config: SearchConfig,
          seen: Iterable[Genome]) -> list[Genome]:
    """One generation's children: `mutations` mutated parents, `crossovers` crossed pairs (a
    mutation of the first parent when no valid new mix turns up, as the reference code does)."""
    taken, children, tries = set(seen) | set(parents), [], config.max_tries

    def mutant(parent: Genome) -> Genome | None:
        return _novel(lambda: mutate(parent, space, rng, config.p, config.local), taken, tries)

    for _ in range(config.mutations):
        children.append(mutant(parents[int(rng.integers(len(parents)))]))
    for _ in range(config.crossovers):
        if len(parents) < 2:
            children.append(mutant(parents[0]))
            continue
        i, j = (int(x) for x in rng.choice(len(parents), 2, replace=False))
        children.append(_novel(lambda: space.crossover(parents[i], parents[j], rng), taken, tries)
                        or mutant(parents[i]))
    return [c for c in children if c is not None]


# --------------------------------------------------------------------------------------------
# the search


@dataclass
class SearchResult:
    best: Genome
    fitness: float
    scaling: LongRoPEScaling
    stats: list[dict]  # per generation: best, median, evals, seconds
    summary: dict  # what summary.json holds
    out: Path | None = None


def run(space: SearchSpace, fitness: Fitness | None = None, config: SearchConfig | None = None,
        out: str | os.PathLike | None = None, *, evaluator: Evaluator | None = None,
        identity: Mapping[str, Any] | None = None, resume: bool = False, force: bool = False,
        on_generation: Callable[[dict], None] | None = None,
        on_evaluation: Callable[[dict], None] | None = None,
        extra_summary: Mapping[str, Any] | None = None) -> SearchResult:
    """Search factors minimising `fitness` (one scaling -> a number) or, instead, `evaluator`
    (a list of scalings -> their numbers, in order; its `width`, if any, is how many candidates
    it takes at once: the budget is checked between calls). With `out`, checkpoint there and
    write scaling.json, history.jsonl, summary.json; `resume` continues the search in `out` (or
    starts it if `out` holds none), `force` replaces a search there. `identity` (model, data,
    ...) must match on resume. `on_generation(stats)` is called after each generation.
    `on_evaluation(info)` after each evaluation, with info = {"evals": evaluations so far,
    "generation", "fitness": this one's, "best": the best so far, "seconds": the search's wall
    time, "earlier": False, "start": False}; "earlier" is True for evaluations made before this
    call, which cost no time now: once at the start of a resumed search ("start": True, the
    checkpoint's count, "generation" the next to run) and for each evaluation taken from the log
    after a crash. `progress_hooks` shows all this on a progress bar."""
    if (fitness is None) == (evaluator is None):
        raise TypeError("run: give either fitness or evaluator")
    evaluator = evaluator or Serial(fitness)
    config = (config or SearchConfig()).validate()
    identity = {**space.identity(), **(identity or {})}
    book = _Book.open(out, space, config, identity, resume, force)
    book.on_evaluation = on_evaluation
    state = book.state
    if state.cache:  # a resumed search: its evaluations so far
        book.evaluated(state.generation, None, earlier=True, start=True)

    while state.generation <= config.generations and not book.spent():
        g = state.generation
        # all children are drawn before any is evaluated, from the RNG and cache as checkpointed,
        # so a resumed generation draws the same children whatever the crash had evaluated, and
        # the evolution is the same whoever evaluates them
        parents = select(state.population, state.cache, config.parents) if g else []
        children = (breed(parents, space, state.rng, config, seen=state.cache) if g
                    else initial_population(space, state.rng, config))
        book.evaluate(children, g, evaluator)
        state.population = parents + [c for c in children if c in state.cache]
        book.end_generation()
        if on_generation:
            on_generation(state.stats[-1])

    return book.finish(extra_summary)


def planned_evals(config: SearchConfig, done: int = 0, generation: int = 0) -> int:
    """How many evaluations a search makes in all, when `done` are made and the generations before
    `generation` are finished: every child of the generations still to run (the initial population
    in generation 0, then mutations + crossovers in each), capped by max_evals. An upper bound:
    a child drawn twice or already evaluated costs nothing (a time budget may stop it sooner)."""
    c = config
    left = max(0, c.generations - max(generation, 1) + 1) * (c.mutations + c.crossovers)
    total = done + left + (c.population if generation == 0 else 0)
    return total if c.max_evals is None else max(done, min(total, c.max_evals))


def progress_hooks(bar, config: SearchConfig) -> dict[str, Callable[[dict], None]]:
    """`on_evaluation` and `on_generation` hooks for `run` that keep `bar` (a `progress.Progress`
    counting evaluations, total `planned_evals(config)`) at the search's count, with the best
    fitness so far: evaluations made earlier (a resumed search) count without speeding up the
    estimate, the total is planned again after each generation (so the last one ends at n/n), and
    under max_minutes the estimate of the time left never exceeds what the budget leaves."""

    def on_evaluation(info: dict) -> None:
        if info["start"]:  # a resumed search: plan from its checkpoint
            bar.set_total(planned_evals(config, info["evals"], info["generation"]))
        elif info["evals"] > (bar.total or 0):
            bar.set_total(info["evals"])
        if config.max_minutes is not None:
            bar.limit_time(60 * config.max_minutes - info["seconds"])
        if info["earlier"]:
            bar.skip(info["evals"] - bar.n)
        best = float("inf") if info["best"] is None else info["best"]
        bar.update_to(info["evals"], best=best)

    def on_generation(stats: dict) -> None:
        bar.set_total(planned_evals(config, stats["evals"], stats["generation"] + 1))

    return {"on_evaluation": on_evaluation, "on_generation": on_generation}


class Serial:
    """The single-process evaluator: the candidates one after another through `fitness`."""

    width = 1  # the budget (max_evals, max_minutes) is checked before every evaluation

    def __init__(self, fitness: Fitness):
        self.fitness = fitness

    def __call__(self, scalings: Sequence[LongRoPEScaling]) -> list[float]:
        return [self.fitness(s) for s in scalings]


class Batched:
    """The single-process evaluator that runs several candidates in one forward: each call takes
    up to `width` = `candidates` scalings and evaluates them on the same `windows` in one batched
    lean forward of candidates × windows sequences (at most `max_batch` sequences per forward,
    default all), each sample rotating with its own candidate's frequencies, n̂ and attention
    factor (`rotary.BatchedRotaryEmbedding`). The values are the perplexities `model_fitness`
    gives, up to float rounding of the batched matmuls (~1e-7 relative in float32).

    Worth it for small models, whose forward on one window does not fill the GPU. Models the lean
    forward does not cover are evaluated one candidate at a time (`model_fitness`)."""

    def __init__(self, model, windows, candidates: int, chunk_size: int | None = None,
                 max_batch: int | None = None):
        if int(candidates) < 1:
            raise ValueError(f"Batched: candidates must be at least 1, got {candidates}")
        if max_batch is not None and int(max_batch) < 1:
            raise ValueError(f"Batched: max_batch must be at least 1, got {max_batch}")
        self.model, self.windows = model, list(windows)
        self.width = int(candidates)
        self.chunk_size, self.max_batch = chunk_size, max_batch
        self.serial = model_fitness(model, self.windows, chunk_size)

    def __call__(self, scalings: Sequence[LongRoPEScaling]) -> list[float]:
        from . import evaluate, lean

        scalings = list(scalings)
        longest = max((len(w[0] if isinstance(w, tuple) else w) for w in self.windows), default=0)
        if len(scalings) <= 1 or lean.unsupported_reason(self.model, longest) is not None:
            return [self.serial(s) for s in scalings]
        sums = candidate_nlls(self.model, scalings, self.windows, self.chunk_size, self.max_batch)
        out = []
        for per_window in sums:
            total, count = 0.0, 0
            for s, c in per_window:  # summed in window order, as evaluate.nll_windows does
                total, count = total + s, count + c
            out.append(float(evaluate.perplexity_from(total, count)))
        return out


def candidate_nlls(model, scalings: Sequence[LongRoPEScaling], windows, chunk_size: int | None = None,
                   max_batch: int | None = None) -> list[list[tuple[float, int]]]:
    """[candidate][window] (sum NLL, tokens scored) of each scaling on each window (token tensors
    or (tokens, score_from) pairs), as `evaluate.nll_sum` gives them with that scaling attached,
    from batched lean forwards: windows of one length go together, candidates × windows sequences
    (at most `max_batch` per forward), each with its candidate's rotary. The model's rotary module
    is put back afterwards. Scoring is per sequence, exactly as nll_sum scores."""
    import torch

    from . import lean, models, nll
    from .rotary import BatchedRotaryEmbedding

    chunk = nll.DEFAULT_CHUNK if chunk_size is None else max(1, int(chunk_size))  # the loss's
    info = models.rope_info(model.config)
    owner = models._rotary_owner(model)
    device = model.get_output_embeddings().weight.device
    pairs = [(w if isinstance(w, tuple) else (w, 1)) for w in windows]
    result = [[(0.0, 0)] * len(pairs) for _ in scalings]
    by_length: dict[int, list[int]] = {}
    for j, (ids, score_from) in enumerate(pairs):
        n = int(torch.as_tensor(ids).numel())
        if n > max(1, int(score_from)):
            by_length.setdefault(n, []).append(j)
    saved = owner.rotary_emb
    try:
        with torch.inference_mode():
            for n, js in by_length.items():
                samples = [(i, j) for i in range(len(scalings)) for j in js]
                step = len(samples) if max_batch is None else max(1, int(max_batch))
                for b0 in range(0, len(samples), step):
                    batch = samples[b0:b0 + step]
                    owner.rotary_emb = BatchedRotaryEmbedding.from_scalings(
                        [scalings[i] for i, _ in batch], info.dim, info.base, n)
                    ids = torch.stack([torch.as_tensor(pairs[j][0]).reshape(-1).long() for _, j in batch])
                    ids = ids.to(device)
                    hidden = lean.final_hidden_states_batch(model, ids, chunk_size)
                    for row, (i, j) in enumerate(batch):
                        result[i][j] = nll.sequence_nll(model, hidden[row], ids[row], max(1, int(pairs[j][1])), chunk)
                    del hidden
    finally:
        owner.rotary_emb = saved
    return result


# --------------------------------------------------------------------------------------------
# several processes (torchrun): rank 0 drives the evolution, every rank evaluates a share

DIST_TIMEOUT_MINUTES = 180  # a collective waits this long (a worker waits while rank 0 tokenises)


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int  # the rank on this host: which GPU


def init_distributed(timeout_minutes: float = DIST_TIMEOUT_MINUTES) -> Rank | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), or None for
    a single process. The group uses gloo whatever the devices: only candidates (small Python
    objects) and fitness values travel, so the same code runs on CPUs and GPUs."""
    import datetime

    from .parallel import world_size

    if world_size() <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank()
    return Rank(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def _distributed() -> tuple[int, int] | None:
    """(rank, world) of an initialised process group of more than one process, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def _share(fitness: Fitness, scalings: Sequence[LongRoPEScaling], rank: int, world: int) -> list[tuple]:
    """This rank's candidates (index ≡ rank mod world): (index, value, error message or None).
    Errors are sent back rather than raised, so no rank is left waiting in a collective."""
    out = []
    for index in range(rank, len(scalings), world):
        try:
            out.append((index, float(fitness(scalings[index])), None))
        except Exception as exc:  # reported by rank 0
            out.append((index, math.nan, f"rank {rank}: {type(exc).__name__}: {exc}"))
    return out


class DistributedEvaluator:
    """Rank 0's evaluator: each call sends the candidates to every rank, rank r evaluates those at
    positions r, r + world, ... (rank 0 its own share too) and the values come back in candidate
    order. `width` = world: one candidate per rank per call, so the budget is checked as often as
    the ranks can use. The other ranks run `serve`; `close` (or leaving a `with`) releases them."""

    def __init__(self, fitness: Fitness):
        import torch.distributed as dist

        where = _distributed()
        if where is None or where[0] != 0:
            raise RuntimeError("DistributedEvaluator: only on rank 0 of a process group of several ranks")
        self.dist, self.fitness = dist, fitness
        self.world = self.width = where[1]
        self.closed = False

    def __call__(self, scalings: Sequence[LongRoPEScaling]) -> list[float]:
        scalings = list(scalings)
        self.dist.broadcast_object_list([("evaluate", scalings)], src=0)
        parts: list = [None] * self.world
        self.dist.gather_object(_share(self.fitness, scalings, 0, self.world), parts, dst=0)
        values = [math.nan] * len(scalings)
        errors = []
        for part in parts:
            for index, value, error in part:
                values[index] = value
                if error:
                    errors.append(error)
        if errors:
            raise RuntimeError(f"search: fitness failed: {errors[0]}")
        return values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.dist.broadcast_object_list([("stop", None)], src=0)

    def __enter__(self) -> "DistributedEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(fitness: Fitness) -> int:
    """The other ranks: evaluate this rank's share of each call of rank 0's `DistributedEvaluator`
    until it closes. Returns how many candidates this rank evaluated."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    done = 0
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        kind, scalings = message[0]
        if kind == "stop":
            return done
        mine = _share(fitness, scalings, rank, world)
        done += len(mine)
        dist.gather_object(mine, None, dst=0)


def run_distributed(space: SearchSpace, fitness: Fitness, config: SearchConfig | None = None,
                    out: str | os.PathLike | None = None, **kwargs) -> SearchResult | None:
    """`run` on every rank of an initialised process group (plain `run` without one): rank 0
    drives the search, writes the files and returns the result; the others evaluate their share
    with their own `fitness` (their model replica) and return None. Same result as one process."""
    where = _distributed()
    if where is None:
        return run(space, fitness, config, out, **kwargs)
    if where[0] != 0:
        serve(fitness)
        return None
    with DistributedEvaluator(fitness) as evaluator:
        return run(space, None, config, out, evaluator=evaluator, **kwargs)


def model_fitness(model, windows, chunk_size: int | None = None) -> Fitness:
    """Perplexity of `model` with the candidate scaling attached, on `windows` (token tensors of
    the target length). evaluate is imported here so the search imports without it."""
    from . import evaluate, models

    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}

    def fitness(scaling: LongRoPEScaling) -> float:
        models.attach(model, scaling)
        return float(evaluate.perplexity(model, windows, **kwargs))

    return fitness


# --------------------------------------------------------------------------------------------
# I/O at the edge: state, fitness cache, history log, outputs


@dataclass
class _State:
    rng: np.random.Generator
    generation: int = 0  # the next generation to run (0: the initial population)
    population: list[Genome] = field(default_factory=list)
    cache: dict[Genome, float] = field(default_factory=dict)  # every evaluated genome
    stats: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the search up to the last checkpoint
    fitness_seconds: float = 0.0  # of which inside fitness calls


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x  # JSON has no inf/nan


def read_state(out: str | os.PathLike) -> dict | None:
    path = Path(out) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable search state ({exc}); use another --out or --force") from None


def check_out(out: str | os.PathLike, resume: bool, force: bool, space: SearchSpace | None = None,
              config: SearchConfig | None = None, identity: Mapping[str, Any] | None = None) -> dict | None:
    """Refuse an output folder the search must not touch; on resume return its saved state (None:
    nothing to resume, start afresh), after checking, when `space` is given, that it belongs to
    this model, target and config. Cheap, so recipes call it before loading anything."""
    out = Path(out)
    if resume and force:
        runs.check_out(out, resume=True, force=True)  # the one refusal of the pair
    # the guard (path, marker, writability); an existing search is refused below, more precisely
    runs.check_out(out, force=force, resume=not force)
    saved = read_state(out) if out.is_dir() and not force else None
    if saved is not None and resume:
        if saved.get("version") != STATE_VERSION:
            raise UsageError(f"--resume {out}: search state version {saved.get('version')} is not "
                             f"{STATE_VERSION}; start a new --out")
        if space is not None:
            _check_same(out, "search is for", saved["identity"], {**space.identity(), **(identity or {})})
        if config is not None:
            fixed = {k: v for k, v in config.to_dict().items() if k not in SearchConfig.BUDGET}
            _check_same(out, "search ran with", {k: saved["config"].get(k) for k in fixed}, fixed)
        return saved
    if out.is_dir() and any(out.iterdir()) and not force:
        if resume:
            raise UsageError(f"--resume {out}: no {STATE} there, so nothing to resume; choose another folder "
                             "or pass --force")
        if saved is not None and saved.get("finished"):
            raise UsageError(f"--out {out} holds a finished search; pass --force to replace it, or --resume "
                             "with a larger budget to continue it")
        if saved is not None:
            raise UsageError(f"--out {out} holds an unfinished search; pass --resume to continue it or --force "
                             "to start over")
        raise UsageError(f"--out {out} already exists and is not empty; choose another folder or pass --force")
    return None


def _check_same(out: Path, what: str, saved: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    for key in runs.differences(dict(saved), dict(given))[:1]:
        ours = f"{key}={saved[key]!r}" if key in saved else f"the default {key}"
        theirs = repr(given[key]) if key in given else "the default"
        raise UsageError(f"--resume {out}: that {what} {ours}, not {theirs}; "
                         "use another --out (or drop the option)")


class _Book:
    """The search's memory: state, the fitness cache and its append-only log, the clock and
    the budget. Everything that touches files lives here."""

    def __init__(self, out, space, config, identity, state, pending):
        self.out, self.space, self.config, self.identity = out, space, config, identity
        self.state, self.pending = state, pending
        self.t0 = time.perf_counter() - state.seconds
        self.log = open(out / HISTORY, "a", encoding="utf-8") if out else None
        self.on_evaluation: Callable[[dict], None] | None = None  # see `run`
        self.best = min((_rank(v) for v in state.cache.values()), default=math.inf)

    @classmethod
    def open(cls, out, space, config, identity, resume, force) -> "_Book":
        state, pending = _State(rng=np.random.default_rng(config.seed)), {}
        if out is None:
            return cls(None, space, config, identity, state, pending)
        out = Path(out)
        saved = check_out(out, resume, force, space, config, identity)
        if saved is None:
            runs.open_dir(out, force=force, command="search")
        else:
            state = cls._load(saved, space)
            pending = cls._recover(out / HISTORY, space, state.cache)
        return cls(out, space, config, identity, state, pending)

    @staticmethod
    def _load(saved: dict, space: SearchSpace) -> _State:
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = saved["rng"]
        # population items: [factors, n_hat(, extras)]; cache items: [factors, n_hat, fitness(, extras)]
        genome = lambda item, extras: Genome(tuple(item[0]), item[1], **(extras or {}))  # noqa: E731
        return _State(rng=rng, generation=saved["generation"],
                      population=[genome(x, x[2] if len(x) > 2 else None) for x in saved["population"]],
                      cache={genome(x, x[3] if len(x) > 3 else None): math.inf if x[2] is None else x[2]
                             for x in saved["cache"]},
                      stats=saved["stats"], seconds=saved["seconds"], fitness_seconds=saved["fitness_seconds"])

    @staticmethod
    def _recover(path: Path, space: SearchSpace, cache: Mapping[Genome, float]) -> dict[Genome, dict]:
        """Evaluations logged after the last checkpoint (a crash mid-generation); a torn last line
        is cut off so that appending continues on a clean line."""
        pending: dict[Genome, dict] = {}
        if not path.is_file():
            return pending
        data, good = path.read_bytes(), 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn line")
                record = json.loads(line)
                g = space.from_record(record)
            except (ValueError, KeyError, TypeError):
                break
            good += len(line)
            if g not in cache:
                pending[g] = record
        if good < len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
        return pending

    # -- during the search ------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> bool:
        c = self.config
        return ((c.max_evals is not None and len(self.state.cache) >= c.max_evals)
                or (c.max_minutes is not None and self.elapsed() >= 60 * c.max_minutes))

    def evaluate(self, genomes: Sequence[Genome], generation: int, evaluator: Evaluator) -> None:
        """Evaluate, in order, those of `genomes` not in the cache (taking those logged before a
        crash from the log), `evaluator.width` at a time, until the budget is spent."""
        state, c = self.state, self.config
        width = max(1, int(getattr(evaluator, "width", None) or len(genomes) or 1))
        i = 0
        while i < len(genomes) and not self.spent():
            if genomes[i] in state.cache:
                i += 1
            elif genomes[i] in self.pending:
                self._recovered(genomes[i])
                i += 1
            else:
                room = width if c.max_evals is None else min(width, c.max_evals - len(state.cache))
                batch: list[Genome] = []
                while (i < len(genomes) and len(batch) < room and genomes[i] not in state.cache
                       and genomes[i] not in self.pending and genomes[i] not in batch):
                    batch.append(genomes[i])
                    i += 1
                self._evaluate(batch, generation, evaluator)

    def _recovered(self, genome: Genome) -> None:
        """Paid for before a crash: take it from the log."""
        record = self.pending.pop(genome)
        self.state.cache[genome] = math.inf if record["fitness"] is None else record["fitness"]
        self.state.fitness_seconds += record["seconds"]
        self.t0 -= record["seconds"]  # that time was lost with the crashed process; count it again
        self.evaluated(record.get("generation"), self.state.cache[genome], earlier=True)

    def _evaluate(self, batch: list[Genome], generation: int, evaluator: Evaluator) -> None:
        scalings = [self.space.scaling(g) for g in batch]
        start = time.perf_counter()
        values = list(evaluator(scalings))
        seconds = time.perf_counter() - start
        if len(values) != len(batch):
            raise RuntimeError(f"search: the evaluator returned {len(values)} values for {len(batch)} candidates")
        for genome, value in zip(batch, values):
            value = float(value)
            value = math.inf if math.isnan(value) else value
            if self.log:
                record = {"generation": generation, **self.space.record(genome), "fitness": _num(value),
                          "seconds": round(seconds / len(batch), 6)}  # a batch's time, shared out
                self.log.write(json.dumps(record) + "\n")
            self.state.cache[genome] = value
            self.evaluated(generation, value)
        if self.log:
            self.log.flush()  # survives a killed process (the OS holds it)
        self.state.fitness_seconds += seconds

    def evaluated(self, generation: int | None, value: float | None, earlier: bool = False,
                  start: bool = False) -> None:
        """After each evaluation (the one place they are counted): the `on_evaluation` hook."""
        if value is not None:
            self.best = min(self.best, _rank(value))
        if self.on_evaluation is not None:
            self.on_evaluation({"evals": len(self.state.cache), "generation": generation,
                                "fitness": None if value is None else _num(value), "best": _num(self.best),
                                "seconds": self.elapsed(), "earlier": earlier, "start": start})

    def end_generation(self) -> None:
        state = self.state
        values = np.array([_rank(state.cache[g]) for g in state.population] or [math.inf])
        state.stats.append({"generation": state.generation, "best": _num(float(values.min())),
                            "median": _num(float(np.median(values))), "evals": len(state.cache),
                            "seconds": round(self.elapsed(), 3)})
        state.generation += 1
        self.save()

    def save(self, finished: str | None = None) -> None:
        if not self.out:
            return
        s = self.state
        s.seconds = self.elapsed()
        data = {"version": STATE_VERSION, "identity": self.identity, "config": self.config.to_dict(),
                "generation": s.generation, "finished": finished, "rng": s.rng.bit_generator.state,
                "population": [[list(g.factors), g.n_hat] + ([g.extras()] if g.extras() else [])
                               for g in s.population],
                "cache": [[list(g.factors), g.n_hat, _num(v)] + ([g.extras()] if g.extras() else [])
                          for g, v in s.cache.items()],
                "stats": s.stats, "seconds": s.seconds, "fitness_seconds": s.fitness_seconds}
        runs.write_text(self.out / STATE, json.dumps(data) + "\n")

    def finish(self, extra_summary: Mapping[str, Any] | None) -> SearchResult:
        s, c = self.state, self.config
        if not s.cache:
            raise UsageError("search: no candidate was evaluated (budget too small?)")
        best = select(list(s.cache), s.cache, 1)[0]
        stopped = "generations" if s.generation > c.generations else (
            "max_evals" if c.max_evals is not None and len(s.cache) >= c.max_evals else "max_minutes")
        seconds = self.elapsed()
        summary = {
            "best_fitness": _num(s.cache[best]),
            "best": self.space.describe(best),
            "baselines": {name: _num(s.cache.get(g)) for name, g in self.space.baselines().items()},
            "evals": len(s.cache), "generations": s.generation, "stopped": stopped,
            "seconds": round(seconds, 3), "fitness_seconds": round(s.fitness_seconds, 3),
            "evals_per_min": round(60 * len(s.cache) / seconds, 3) if seconds > 0 else None,
            # the target: time outside model forwards < 10% of the search
            "overhead_share": round(1 - s.fitness_seconds / seconds, 4) if seconds > 0 else None,
            "config": c.to_dict(), "identity": self.identity, "versions": runs.versions(),
            "stats": s.stats, "space": self.space.summary(), **(extra_summary or {}),
        }
        scaling = self.space.scaling(best)
        if self.log:
            self.log.close()
        if self.out:
            self.save(finished=stopped)
            runs.write_text(self.out / SCALING, scaling.to_json())
            runs.write_text(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return SearchResult(best, s.cache[best], scaling, s.stats, summary, self.out)


def read_history(out: str | os.PathLike) -> list[dict]:
    """Every evaluation of the search in `out`, in order."""
    path = Path(out) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
