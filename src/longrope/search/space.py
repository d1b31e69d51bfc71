"""What a search looks for: the genome, the spaces it lives in, and their variation operators.

A genome holds integers, so equality, hashing and the fitness cache are exact: rescale factors as
steps of GRID_STEP above 1 (λ_i = 1 + 0.01·factor_steps[i], non-decreasing in i) and n̂ as an
index into the space's n̂ choices. A space turns a genome into a scaling and back, knows its
bounds and seeds (PI, NTK and YaRN on the grid) and mutates and crosses its genomes, so another
space (`CriticalDimSpace`, `ShortFactorSpace`) plugs into the same search loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import scaling as sc
from ..errors import UsageError
from ..scaling import LongRoPEScaling, longrope_attention_factor, ntk_factors, pi_factors, yarn_factors

GRID_STEP = 0.01
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
ATTENTION_TOP = 50  # searched attention factor: 1 + 0.01·a, a in [0, 50] (1.00 .. 1.50)
SHORT_CAP = 1.5  # default upper bound of the searched short factors


@dataclass(frozen=True)
class Genome:
    """One candidate, as grid positions: λ_i = 1 + GRID_STEP·factor_steps[i], n̂ = the space's
    n_hats[n_hat_index]."""

    factor_steps: tuple[int, ...]
    n_hat_index: int = 0
    critical_pairs: int | None = None  # CriticalDimSpace: pairs [0, critical_pairs) keep NTK's factors
    attention_steps: int | None = None  # with search_attention: attention factor 1 + GRID_STEP·attention_steps


def n_hat_choices(original_length: int) -> tuple[int, ...]:
    """The n̂ values a search tries for a model trained at `original_length`."""
    return tuple(n for n in N_HAT_CHOICES if n < original_length)


def _mutate_steps(values: list[int], low: int, top: int, rng: np.random.Generator, p: float,
                  local: float, floors: Sequence[int] | None = None) -> list[int]:
    """Each gene, with probability p, redrawn between its neighbours (left: already redrawn, right:
    not yet), so a non-decreasing vector stays so; the ends are bounded by `low` and `top`, and
    gene i by floors[i] (non-decreasing) where given."""
    last = len(values) - 1
    for i in np.flatnonzero(rng.random(len(values)) < p):
        lo = max(values[i - 1] if i > 0 else low, floors[i] if floors is not None else low)
        hi = values[i + 1] if i < last else top
        if rng.random() < local:
            values[i] = min(max(values[i] + _small_step(rng), lo), hi)
        else:
            values[i] = int(rng.integers(lo, hi + 1))
    return values


def _small_step(rng: np.random.Generator) -> int:
    """±1, 2, 4... grid steps, smaller ones likelier: polishing a good candidate needs small moves."""
    return int(rng.geometric(0.5)) * (1 if rng.random() < 0.5 else -1)


def crossover(a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
    """Each gene (and n̂) from either parent with equal chance; None when the mix is not
    non-decreasing (where the parents' curves cross), so the caller draws again."""
    take_a = rng.random(len(a.factor_steps)) < 0.5
    child = tuple(int(x) for x in np.where(take_a, a.factor_steps, b.factor_steps))
    n_hat_index = a.n_hat_index if rng.random() < 0.5 else b.n_hat_index
    if any(x > y for x, y in zip(child, child[1:])):
        return None
    return dataclasses.replace(a, factor_steps=child, n_hat_index=n_hat_index)


def mutate(g: Genome, space: SearchSpace, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
    """Each λ_i, with probability p, is redrawn between its neighbours (left: already redrawn,
    right: not yet), which keeps the vector non-decreasing without any repair; the ends are
    bounded by 1 and 1.25·s. The redraw is uniform (the paper), or with probability `local` a
    small step of ±1, 2, 4... grid steps: a uniform redraw between neighbours 50 steps apart lands
    within one step of the optimum 1 time in 30, so polishing needs small moves. n̂ is redrawn
    (uniformly) with probability p too. (`space.mutate`: each space has its own operator.)"""
    return space.mutate(g, rng, p, local)


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
    # the pairs that never turned fully in pretraining get λ ≥ s, so no pair meets an angle
    # pretraining never showed within the target length (`scaling.keep_angles_seen`)
    keep_angles_seen: bool = False

    algorithm = "evolution"  # not a field: the name of the space on the command line and in identity

    def __post_init__(self):
        if self.target_length <= self.original_length:
            raise UsageError(f"--target-length {self.target_length} must be above the model's context "
                             f"{self.original_length}")
        if self.dim < 2 or self.dim % 2:
            raise UsageError(f"rotary dimension must be an even number >= 2, got {self.dim}")
        if self.keep_angles_seen and self.algorithm != "evolution":
            raise UsageError(f"--keep-angles-seen: goes with --algorithm evolution, not {self.algorithm}")

    @property
    def factor(self) -> float:
        """The scale s = target / original length (`LongRoPEScaling.factor`, transformers' name)."""
        return self.target_length / self.original_length

    @property
    def size(self) -> int:
        return self.dim // 2

    @property
    def top(self) -> int:
        """Largest grid step: λ ≤ 1.25·s (the paper's upper bound)."""
        return int(math.floor((1.25 * self.factor - 1) / GRID_STEP + 1e-9))

    @property
    def n_hats(self) -> tuple[int, ...]:
        return n_hat_choices(self.original_length)

    @cached_property  # read for every child and candidate in the search loop
    def floors(self) -> tuple[int, ...]:
        """Each factor's smallest grid step: 0, or with keep_angles_seen s's (rounded up) for the
        pairs that never turned fully in pretraining."""
        if not self.keep_angles_seen:
            return (0,) * self.size
        at_s = int(math.ceil((self.factor - 1) / GRID_STEP - 1e-9))
        return tuple(at_s if unturned else 0 for unturned in
                     sc.unturned_pairs(self.dim, self.base, self.original_length).tolist())

    # -- the attention gene ------------------------------------------------------------------
    def attention_value(self, genome: Genome) -> float | str:
        """What the scaling's attention_factor is: the gene's number, or the fixed choice."""
        if genome.attention_steps is None:
            return self.attention_factor
        return round(1 + GRID_STEP * genome.attention_steps, 2)

    @property
    def initial_attention(self) -> int | None:
        """The attention gene of the seeds: the fixed choice ("su") snapped to the grid."""
        if not self.search_attention:
            return None
        value = longrope_attention_factor(self.attention_factor, self.factor, self.original_length)
        return int(min(max(round((value - 1) / GRID_STEP), 0), ATTENTION_TOP))

    def _vary_attention(self, child: Genome, rng: np.random.Generator, p: float, local: float) -> Genome:
        if child.attention_steps is None or rng.random() >= p:
            return child
        if rng.random() < local:
            value = min(max(child.attention_steps + _small_step(rng), 0), ATTENTION_TOP)
        else:
            value = int(rng.integers(ATTENTION_TOP + 1))
        return dataclasses.replace(child, attention_steps=value)

    def _vary_n_hat(self, n_hat_index: int, rng: np.random.Generator, p: float) -> int:
        if len(self.n_hats) > 1 and rng.random() < p:
            return int(rng.integers(len(self.n_hats)))
        return n_hat_index

    # -- genome <-> scaling ------------------------------------------------------------------
    def lambdas(self, genome: Genome) -> tuple[float, ...]:
        return tuple(round(1 + GRID_STEP * i, 2) for i in genome.factor_steps)

    def scaling(self, genome: Genome) -> LongRoPEScaling:
        return LongRoPEScaling.from_target(self.lambdas(genome), self.original_length, self.target_length,
                                           n_hat=self.n_hats[genome.n_hat_index],
                                           attention_setting=self.attention_value(genome))

    def snap(self, lambdas: Iterable[float], n_hat: int = 0) -> Genome:
        """The nearest grid genome: round to 0.01, clip to [1, 1.25·s], then a running maximum
        (the smallest change that makes the vector non-decreasing). `n_hat` is a value."""
        steps = np.rint((np.asarray(list(lambdas), dtype=np.float64) - 1) / GRID_STEP)
        steps = np.maximum.accumulate(np.clip(np.maximum(steps, self.floors), 0, self.top)).astype(int)
        return Genome(tuple(int(i) for i in steps), self.n_hats.index(n_hat), attention_steps=self.initial_attention)

    def genome(self, lambdas: Iterable[float], n_hat: int = 0, critical_pairs: int | None = None,
               attention_factor: float | None = None) -> Genome:
        """Parse exact grid values back (history lines); ValueError if not a valid genome."""
        attention = None if attention_factor is None else int(round((float(attention_factor) - 1) / GRID_STEP))
        g = Genome(tuple(int(round((float(v) - 1) / GRID_STEP)) for v in lambdas), self.n_hats.index(n_hat),
                   critical_pairs, attention)
        if not self.contains(g):
            raise ValueError(f"not a genome of this search space: {lambdas}")
        return g

    def _valid_genes(self, g: Genome) -> bool:
        """Non-decreasing factors, an n̂ of the space, and the attention gene iff it is searched."""
        f = g.factor_steps
        attention_ok = (g.attention_steps is not None and 0 <= g.attention_steps <= ATTENTION_TOP
                        if self.search_attention else g.attention_steps is None)
        return (len(f) == self.size and all(a <= b for a, b in zip(f, f[1:]))
                and 0 <= g.n_hat_index < len(self.n_hats) and attention_ok)

    def contains(self, g: Genome) -> bool:
        return (self._valid_genes(g) and all(low <= i <= self.top for low, i in zip(self.floors, g.factor_steps))
                and g.critical_pairs is None)

    # -- records: history lines, summary --------------------------------------------------------
    def record(self, g: Genome) -> dict[str, Any]:
        """The genome as a history line holds it (values, not grid positions)."""
        out: dict[str, Any] = {"factors": list(self.lambdas(g)), "n_hat": self.n_hats[g.n_hat_index]}
        if g.critical_pairs is not None:
            out["critical"] = g.critical_pairs
        if g.attention_steps is not None:
            out["attention_factor"] = self.attention_value(g)
        return out

    def from_record(self, record: Mapping[str, Any]) -> Genome:
        return self.genome(record["factors"], record["n_hat"], record.get("critical"),
                           record.get("attention_factor"))

    def describe(self, g: Genome) -> dict[str, Any]:
        """The genome for summary.json's "best"."""
        out: dict[str, Any] = {"long_factor": list(self.lambdas(g)), "n_hat": self.n_hats[g.n_hat_index]}
        if g.attention_steps is not None:
            out["attention_factor"] = self.attention_value(g)
        return out

    def summary(self) -> dict[str, Any]:
        """What summary.json says about the space beyond its identity."""
        return {"algorithm": self.algorithm, "search_attention": self.search_attention,
                **({"keep_angles_seen": True} if self.keep_angles_seen else {})}

    # -- variation ---------------------------------------------------------------------------
    def mutate(self, g: Genome, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
        """The paper's operator (see the module function `mutate`)."""
        steps = _mutate_steps(list(g.factor_steps), 0, self.top, rng, p, local, self.floors)
        n_hat_index = self._vary_n_hat(g.n_hat_index, rng, p)
        return self._vary_attention(dataclasses.replace(g, factor_steps=tuple(steps), n_hat_index=n_hat_index),
                                    rng, p, local)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
        child = crossover(a, b, rng)
        if child is not None and a.attention_steps is not None:
            child = dataclasses.replace(child, attention_steps=self._either_attention(a, b, rng))
        return child

    @staticmethod
    def _either_attention(a: Genome, b: Genome, rng: np.random.Generator) -> int | None:
        return a.attention_steps if rng.random() < 0.5 else b.attention_steps

    def references(self) -> dict[str, list[float]]:
        """PI's, NTK-aware's and YaRN's exact factors for this model and scale."""
        d, b, s = self.dim, self.base, self.factor
        return {"pi": pi_factors(d, b, s).tolist(), "ntk": ntk_factors(d, b, s).tolist(),
                "yarn": yarn_factors(d, b, self.original_length, s).tolist()}

    def baselines(self) -> dict[str, Genome]:
        """The given `seeds` ("seed0", ...), then PI, NTK-aware and YaRN (`references`) as factor
        vectors on the grid (n̂ = 0): the seeds of the search."""
        seeded = {f"seed{i}": self.snap(lambdas, n_hat) for i, (lambdas, n_hat) in enumerate(self.seeds)}
        return {**seeded, **{name: self.snap(factors) for name, factors in self.references().items()}}

    def reference_scalings(self) -> dict[str, LongRoPEScaling]:
        """The strongest plain baselines, exact (not snapped to the grid), as LongRoPE scalings the
        search may return: PI and NTK-aware as they are (no temperature), YaRN with its own
        0.1·ln s + 1, and the search's own seeds: PI, NTK and YaRN shapes under the space's
        temperature, YaRN's shape also under none. Each is exactly its method at lengths beyond
        the original context (`scaling.equivalent_factors`)."""
        shapes = self.references()
        temperatures = {"pi": [1.0, self.attention_factor], "ntk": [1.0, self.attention_factor],
                        "yarn": ["yarn", self.attention_factor, 1.0]}
        own = {("pi", 1.0), ("ntk", 1.0), ("yarn", "yarn")}  # the methods themselves keep their names
        if self.keep_angles_seen:  # NTK stretches the unturned pairs by less than s
            del temperatures["ntk"]
        out = {}
        for shape, settings in temperatures.items():
            for t in dict.fromkeys(settings):
                name = shape if (shape, t) in own else f"{shape}+{t:g}" if isinstance(t, float) else f"{shape}+{t}"
                out[name] = LongRoPEScaling.from_target(shapes[shape], self.original_length, self.target_length,
                                                        attention_setting=t)
        return out

    def identity(self) -> dict[str, Any]:
        out = {"dim": self.dim, "base": self.base, "original_length": self.original_length,
               "target_length": self.target_length, "attention_factor": self.attention_factor}
        # only where they differ from the paper's search, so older checkpoints still resume
        if self.algorithm != "evolution":
            out["algorithm"] = self.algorithm
        if self.search_attention:
            out["search_attention"] = True
        if self.keep_angles_seen:
            out["keep_angles_seen"] = True
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
        """Smallest grid step of the searched part: λ ≥ s."""
        return int(math.ceil((self.factor - 1) / GRID_STEP - 1e-9))

    @property
    def top(self) -> int:
        """Largest grid step: λ ≤ 2·s."""
        return int(math.floor((2 * self.factor - 1) / GRID_STEP + 1e-9))

    @cached_property
    def ntk(self) -> tuple[int, ...]:
        """NTK-aware factors on the grid, for every pair."""
        steps = np.rint((ntk_factors(self.dim, self.base, self.factor).numpy() - 1) / GRID_STEP)
        return tuple(int(i) for i in np.maximum.accumulate(np.maximum(steps, 0)))

    @property
    def critical_dim(self) -> int:
        """d_tcd, in dimensions (twice the pairs)."""
        return theoretical_critical_dim(self.dim, self.base, self.original_length)

    def make(self, critical_pairs: int, searched_steps: Iterable[float | int], n_hat_index: int = 0,
             attention_steps: int | None = None) -> Genome:
        """A repaired genome: NTK below `critical_pairs`, the searched grid steps (one per pair
        from there on; missing ones repeat the last) clipped to [s, 2s] and made non-decreasing."""
        c = int(min(max(critical_pairs, 0), self.size))
        head = list(self.ntk[:c])
        tail = [int(x) for x in searched_steps][:self.size - c]
        tail += [tail[-1] if tail else self.low] * (self.size - c - len(tail))
        floor = max([self.low] + head[-1:])
        tail = np.maximum.accumulate(np.clip(np.asarray(tail, dtype=np.int64), floor, self.top)) if tail else []
        steps = tuple(head + [int(x) for x in tail])
        while c < self.size and steps[c] == self.ntk[c]:  # NTK's own value (its last pair, λ = s)
            c += 1  # one genome per scaling: count it in the NTK part
        return Genome(steps, n_hat_index, c, attention_steps)

    def snap(self, lambdas: Iterable[float], n_hat: int = 0, critical_pairs: int | None = None) -> Genome:
        """Into this space: c defaults to the first pair with λ ≥ s (NTK before it); the values
        from c on are rounded to the grid and repaired."""
        values = np.asarray(list(lambdas), dtype=np.float64)
        if critical_pairs is None:
            above = np.flatnonzero(values >= self.factor - 1e-9)
            critical_pairs = int(above[0]) if above.size else self.size
        steps = np.rint((values - 1) / GRID_STEP)
        return self.make(critical_pairs, steps[critical_pairs:], self.n_hats.index(n_hat), self.initial_attention)

    def contains(self, g: Genome) -> bool:
        f, c = g.factor_steps, g.critical_pairs
        return (self._valid_genes(g) and c is not None and 0 <= c <= self.size
                and f[:c] == self.ntk[:c] and all(self.low <= i <= self.top for i in f[c:])
                and (c == self.size or f[c] != self.ntk[c]))

    def describe(self, g: Genome) -> dict[str, Any]:
        return {**super().describe(g), "critical_pairs": g.critical_pairs, "critical_dim": 2 * g.critical_pairs}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "theoretical_critical_dim": self.critical_dim,
                "theoretical_critical_pairs": self.critical_dim // 2}

    def mutate(self, g: Genome, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
        """c moves by ±1, 2, 4... pairs with probability p (pairs that enter the searched part
        start at the searched part's first value); then the searched genes as the paper's
        operator, between s and 2s; n̂ and the attention gene as in `SearchSpace`."""
        c = g.critical_pairs
        if rng.random() < p:
            c = int(min(max(c + _small_step(rng), 0), self.size))
        old = g.factor_steps[g.critical_pairs:]
        first = old[0] if old else self.low
        tail = [first] * max(0, g.critical_pairs - c) + list(old[max(0, c - g.critical_pairs):])
        # NTK's values never exceed s, so the searched genes' lower bound is s; `make` repairs
        # and makes the result canonical once the genes have moved
        tail = _mutate_steps(tail, self.low, self.top, rng, p, local)
        n_hat_index = self._vary_n_hat(g.n_hat_index, rng, p)
        return self._vary_attention(self.make(c, tail, n_hat_index, g.attention_steps), rng, p, local)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
        """c from either parent, each searched gene from either parent (a parent's NTK value
        counts as s there); None when the mix is not non-decreasing."""
        c = a.critical_pairs if rng.random() < 0.5 else b.critical_pairs
        take_a = rng.random(self.size) < 0.5
        mix = [max(x, self.low) for x in np.where(take_a, a.factor_steps, b.factor_steps)[c:]]
        if any(x > y for x, y in zip(mix, mix[1:])):
            return None
        child = self.make(c, mix, a.n_hat_index if rng.random() < 0.5 else b.n_hat_index, a.attention_steps)
        if a.attention_steps is not None:
            child = dataclasses.replace(child, attention_steps=self._either_attention(a, b, rng))
        return child

    def baselines(self) -> dict[str, Genome]:
        """PI, NTK and YaRN snapped into this space, and NTK below d_tcd with λ = s from there."""
        seeds = super().baselines()  # uses self.snap: already in this space
        seeds["tcd"] = self.make(self.critical_dim // 2, [], 0, self.initial_attention)
        return seeds


# the spaces a search is started with by name (--algorithm, and "algorithm" in a search's identity)
SPACES: dict[str, type[SearchSpace]] = {"evolution": SearchSpace, "critical-dim": CriticalDimSpace}
ALGORITHMS = tuple(SPACES)


def seeds_from(scaling: LongRoPEScaling, target_length: int,
               original_length: int | None = None) -> tuple[tuple[tuple[float, ...], int], ...]:
    """A searched scaling as seeds of a search at `target_length`: its factors as they are and
    carried to the new scale (`scaling.carry`), each with its n̂: the paper's progressive
    extension, where the factors searched for a shorter length start the search for a longer one.
    With `original_length` (the model's context), an n̂ the search does not try is refused
    (UsageError)."""
    if original_length is not None:
        choices = n_hat_choices(original_length)
        if scaling.n_hat not in choices:
            raise UsageError(f"n_hat {scaling.n_hat} is not one the search uses ({', '.join(map(str, choices))})")
    carried = sc.carry(scaling, target_length).long_factor
    return ((tuple(scaling.long_factor), scaling.n_hat), (carried, scaling.n_hat))


def load_longrope(option: str, spec: str, dim: int, original_length: int, takes: str) -> LongRoPEScaling:
    """The LongRoPE scaling (file or preset) `spec` given to `option`, made for a model whose
    context is `original_length`; otherwise a UsageError naming both (`takes`: what the option
    takes instead)."""
    try:
        scaling = sc.load(sc.preset_path(spec), dim)
    except UsageError as exc:
        raise UsageError(f"{option} {spec}: {str(exc).removeprefix(f'--scaling {spec}: ')}") from None
    if not isinstance(scaling, LongRoPEScaling):
        raise UsageError(f"{option} {spec}: a {scaling.rope_type} scaling; {option} takes {takes}")
    if scaling.original_max_position_embeddings != original_length:
        raise UsageError(f"{option} {spec}: made for a context of {scaling.original_max_position_embeddings}, the "
                         f"model's is {original_length}")
    return scaling


def init_seeds(spec: str, dim: int, original_length: int, target_length: int) -> tuple:
    """`--init A.json,B,...`: the seeds (`seeds_from`) of each searched scaling, a file or preset."""
    seeds = []
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        scaling = load_longrope("--init", entry, dim, original_length,
                                "searched LongRoPE scalings (PI, NTK and YaRN are always in the initial population)")
        try:
            seeds.extend(seeds_from(scaling, target_length, original_length))
        except UsageError as exc:
            raise UsageError(f"--init {entry}: {exc}") from None
    return tuple(seeds)


def resumed_space(dim: int, base: float, original_length: int, target_length: int,
                  saved_identity: Mapping[str, Any], algorithm: str | None = None,
                  search_attention: bool | None = None, seeds: Sequence | None = None,
                  readjusted: LongRoPEScaling | None = None, cap: float | None = None,
                  keep_angles_seen: bool | None = None) -> SearchSpace:
    """The space of a search: each choice given (None: not given), else the saved search's (its
    identity, as `SearchSpace.identity` wrote it, names only the non-default ones; {}: no saved
    search), else the default. A short-context readjustment (`ShortFactorSpace`, at the scaling's
    own lengths: `target_length` does not apply) is of `readjusted`, else of the saved search's
    scaling, its factors at most `cap`, else the saved search's, else SHORT_CAP."""
    if readjusted is not None or (algorithm is None and saved_identity.get("algorithm") == ShortFactorSpace.algorithm):
        scaling = readjusted or sc.from_dict(saved_identity["scaling"], dim)
        return ShortFactorSpace.for_scaling(scaling, dim, base, cap or saved_identity.get("cap", SHORT_CAP))
    kept = saved_identity.get("seeds") or ()
    return SPACES[algorithm or saved_identity.get("algorithm", "evolution")](
        dim, base, original_length, target_length,
        search_attention=bool(saved_identity.get("search_attention", False) if search_attention is None
                              else search_attention),
        seeds=tuple((tuple(lambdas), int(n_hat)) for lambdas, n_hat in (kept if seeds is None else seeds)),
        keep_angles_seen=bool(saved_identity.get("keep_angles_seen", False) if keep_angles_seen is None
                              else keep_angles_seen))


@dataclass(frozen=True)
class ShortFactorSpace(SearchSpace):
    """Short-context readjustment (LongRoPE §3.3): search `short_factor` (used for sequences up to
    the original context) of an extended scaling, its `long_factor`, n̂ and attention factor kept.

    A genome is d/2 non-decreasing factors on the 0.01 grid in [1, cap]: a short sequence needs at
    most a mild interpolation (the model was trained there with λ = 1; what the factors can offset
    is a fine-tune's drift and, where the short regime keeps the long attention factor, some of
    that temperature), so the cap is far below 1.25·s. The all-ones vector is the first seed (and
    the scaling's own short factors, if any, the second), so it is always evaluated and the
    search's best is never worse than all-ones on the fitness documents; both, exact, are its
    references (`reference_scalings`), so what a search with validation returns is never worse
    than either there. Build it with `for_scaling`."""

    long: LongRoPEScaling | None = None
    cap: float = SHORT_CAP

    algorithm = "short-factor"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.long, LongRoPEScaling):
            raise UsageError("short-factor search: needs the extended LongRoPE scaling (long=...)")
        if not 1 < self.cap <= 1.25 * self.factor:
            raise UsageError(f"short-factor search: cap must be in (1, {1.25 * self.factor:g}], got {self.cap}")

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

    def references(self) -> dict[str, list[float]]:
        """All-ones short factors and the scaling's current ones, if any: what a readjustment must
        beat (PI, NTK and YaRN would change the long factors it keeps). Snapped into the space they
        are the seeds (`baselines`); exact, the references (`reference_scalings`)."""
        out = {"ones": [1.0] * self.size}
        if self.long.short_factor is not None:
            out["current"] = list(self.long.short_factor)
        return out

    def reference_scalings(self) -> dict[str, LongRoPEScaling]:
        return {name: self.long.replace(short_factor=tuple(factors)) for name, factors in self.references().items()}

    def describe(self, g: Genome) -> dict[str, Any]:
        return {"short_factor": list(self.lambdas(g)), "n_hat": self.long.n_hat}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "cap": self.cap}

    def identity(self) -> dict[str, Any]:
        # the whole scaling (current short factors and short attention factor included): the
        # seeds and references depend on it, and `resumed_space` rebuilds the space from it
        return {**super().identity(), "algorithm": self.algorithm, "cap": self.cap, "scaling": self.long.to_dict()}
