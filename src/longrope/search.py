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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import UsageError
from .scaling import LongRoPEScaling, ntk_factors, pi_factors, yarn_factors

GRID_STEP = 0.01
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
# files a search writes into its output folder
STATE, HISTORY, SCALING, SUMMARY = "search_state.json", "history.jsonl", "scaling.json", "summary.json"
PLOT = "search.png"  # drawn by the recipe
OUTPUT_FILES = (STATE, HISTORY, SCALING, SUMMARY, PLOT)
STATE_VERSION = 1

Fitness = Callable[[LongRoPEScaling], float]


# --------------------------------------------------------------------------------------------
# the search space and its genomes


@dataclass(frozen=True)
class Genome:
    """One candidate: grid indices (λ_i = 1 + 0.01·factors[i]) and an index into the space's
    n̂ choices. Integers, so equality, hashing and the cache are exact."""

    factors: tuple[int, ...]
    n_hat: int = 0


@dataclass(frozen=True)
class SearchSpace:
    """Everything a genome needs to become a scaling: the model's rotary dim, base and context,
    and the target length."""

    dim: int
    base: float
    original_length: int
    target_length: int
    attention_factor: float | str = "su"

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
        return tuple(n for n in N_HAT_CHOICES if n < self.original_length)

    def lambdas(self, genome: Genome) -> tuple[float, ...]:
        return tuple(round(1 + GRID_STEP * i, 2) for i in genome.factors)

    def scaling(self, genome: Genome) -> LongRoPEScaling:
        return LongRoPEScaling.from_target(self.lambdas(genome), self.original_length, self.target_length,
                                           n_hat=self.n_hats[genome.n_hat],
                                           attention_factor_value=self.attention_factor)

    def snap(self, lambdas: Iterable[float], n_hat: int = 0) -> Genome:
        """The nearest grid genome: round to 0.01, clip to [1, 1.25·s], then a running maximum
        (the smallest change that makes the vector non-decreasing). `n_hat` is a value."""
        idx = np.rint((np.asarray(list(lambdas), dtype=np.float64) - 1) / GRID_STEP)
        idx = np.maximum.accumulate(np.clip(idx, 0, self.top)).astype(int)
        return Genome(tuple(int(i) for i in idx), self.n_hats.index(n_hat))

    def genome(self, lambdas: Iterable[float], n_hat: int = 0) -> Genome:
        """Parse exact grid values back (history lines); ValueError if not a valid genome."""
        g = Genome(tuple(int(round((float(v) - 1) / GRID_STEP)) for v in lambdas), self.n_hats.index(n_hat))
        if not self.contains(g):
            raise ValueError(f"not a genome of this search space: {lambdas}")
        return g

    def contains(self, g: Genome) -> bool:
        f = g.factors
        return (len(f) == self.size and all(0 <= i <= self.top for i in f)
                and all(a <= b for a, b in zip(f, f[1:])) and 0 <= g.n_hat < len(self.n_hats))

    def baselines(self) -> dict[str, Genome]:
        """PI, NTK-aware and YaRN as factor vectors on the grid (n̂ = 0)."""
        d, b, s = self.dim, self.base, self.scale
        return {"pi": self.snap(pi_factors(d, b, s).tolist()),
                "ntk": self.snap(ntk_factors(d, b, s).tolist()),
                "yarn": self.snap(yarn_factors(d, b, self.original_length, s).tolist())}

    def identity(self) -> dict[str, Any]:
        return {"dim": self.dim, "base": self.base, "original_length": self.original_length,
                "target_length": self.target_length, "attention_factor": self.attention_factor}


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


def mutate(g: Genome, space: SearchSpace, rng: np.random.Generator, p: float, local: float = 0.0) -> Genome:
    """Each λ_i, with probability p, is redrawn between its neighbours (left: already redrawn,
    right: not yet), which keeps the vector non-decreasing without any repair; the ends are
    bounded by 1 and 1.25·s. The redraw is uniform (the paper), or with probability `local` a
    small step of ±1, 2, 4... grid steps: a uniform redraw between neighbours 50 steps apart lands
    within one step of the optimum 1 time in 30, so polishing needs small moves. n̂ is redrawn
    (uniformly) with probability p too."""
    new = list(g.factors)
    last = len(new) - 1
    for i in np.flatnonzero(rng.random(len(new)) < p):
        lo = new[i - 1] if i > 0 else 0
        hi = new[i + 1] if i < last else space.top
        if rng.random() < local:
            step = int(rng.geometric(0.5)) * (1 if rng.random() < 0.5 else -1)
            new[i] = min(max(new[i] + step, lo), hi)
        else:
            new[i] = int(rng.integers(lo, hi + 1))
    n_hat = g.n_hat
    if len(space.n_hats) > 1 and rng.random() < p:
        n_hat = int(rng.integers(len(space.n_hats)))
    return Genome(tuple(new), n_hat)


def crossover(a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
    """Each gene (and n̂) from either parent with equal chance; None when the mix is not
    non-decreasing (where the parents' curves cross), so the caller draws again."""
    take_a = rng.random(len(a.factors)) < 0.5
    child = tuple(int(x) for x in np.where(take_a, a.factors, b.factors))
    n_hat = a.n_hat if rng.random() < 0.5 else b.n_hat
    if any(x > y for x, y in zip(child, child[1:])):
        return None
    return Genome(child, n_hat)


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
    """PI, NTK and YaRN on the grid, then mutations of them up to `config.population`."""
    seeds = list(dict.fromkeys(space.baselines().values()))  # distinct, in order
    population = seeds[:config.population]
    taken = set(population)
    while len(population) < config.population:
        parent = seeds[int(rng.integers(len(seeds)))]
        child = _novel(lambda: mutate(parent, space, rng, config.p, config.local), taken, config.max_tries)
        if child is None:
            break  # the space is too small to fill the population
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
        children.append(_novel(lambda: crossover(parents[i], parents[j], rng), taken, tries) or mutant(parents[i]))
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


def run(space: SearchSpace, fitness: Fitness, config: SearchConfig | None = None,
        out: str | os.PathLike | None = None, *, identity: Mapping[str, Any] | None = None,
        resume: bool = False, force: bool = False, on_generation: Callable[[dict], None] | None = None,
        extra_summary: Mapping[str, Any] | None = None) -> SearchResult:
    """Search factors minimising `fitness`. With `out`, checkpoint there and write scaling.json,
    history.jsonl, summary.json; `resume` continues the search in `out` (or starts it if `out`
    holds none), `force` replaces a search there. `identity` (model, data, ...) must match on
    resume. `on_generation(stats)` is called after each generation (progress display)."""
    config = (config or SearchConfig()).validate()
    identity = {**space.identity(), **(identity or {})}
    book = _Book.open(out, space, config, identity, resume, force)
    state = book.state

    while state.generation <= config.generations and not book.spent():
        g = state.generation
        # all children are drawn before any is evaluated, from the RNG and cache as checkpointed,
        # so a resumed generation draws the same children whatever the crash had evaluated
        parents = select(state.population, state.cache, config.parents) if g else []
        children = (breed(parents, space, state.rng, config, seen=state.cache) if g
                    else initial_population(space, state.rng, config))
        for child in children:
            if book.spent():
                break
            book.evaluate(child, g, fitness)
        state.population = parents + [c for c in children if c in state.cache]
        book.end_generation()
        if on_generation:
            on_generation(state.stats[-1])

    return book.finish(extra_summary)


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


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Readers see the old file or the new one, never half of one (also after a crash)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
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
    for key in sorted(set(saved) | set(given)):
        if saved.get(key) != given.get(key):
            raise UsageError(f"--resume {out}: that {what} {key}={saved.get(key)!r}, not {given.get(key)!r}; "
                             "use another --out (or drop the option)")


class _Book:
    """The search's memory: state, the fitness cache and its append-only log, the clock and
    the budget. Everything that touches files lives here."""

    def __init__(self, out, space, config, identity, state, pending):
        self.out, self.space, self.config, self.identity = out, space, config, identity
        self.state, self.pending = state, pending
        self.t0 = time.perf_counter() - state.seconds
        self.log = open(out / HISTORY, "a", encoding="utf-8") if out else None

    @classmethod
    def open(cls, out, space, config, identity, resume, force) -> "_Book":
        state, pending = _State(rng=np.random.default_rng(config.seed)), {}
        if out is None:
            return cls(None, space, config, identity, state, pending)
        out = Path(out)
        saved = check_out(out, resume, force, space, config, identity)
        if saved is None:
            out.mkdir(parents=True, exist_ok=True)
            for name in OUTPUT_FILES:  # --force: only our own files go
                (out / name).unlink(missing_ok=True)
        else:
            state = cls._load(saved, space)
            pending = cls._recover(out / HISTORY, space, state.cache)
        return cls(out, space, config, identity, state, pending)

    @staticmethod
    def _load(saved: dict, space: SearchSpace) -> _State:
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = saved["rng"]
        genome = lambda item: Genome(tuple(item[0]), item[1])  # noqa: E731
        return _State(rng=rng, generation=saved["generation"],
                      population=[genome(x) for x in saved["population"]],
                      cache={genome(x): math.inf if x[2] is None else x[2] for x in saved["cache"]},
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
                g = space.genome(record["factors"], record["n_hat"])
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

    def evaluate(self, genome: Genome, generation: int, fitness: Fitness) -> float:
        state = self.state
        if genome in state.cache:
            return state.cache[genome]
        if genome in self.pending:  # paid for before a crash: take it from the log
            record = self.pending.pop(genome)
            value = math.inf if record["fitness"] is None else record["fitness"]
            seconds = record["seconds"]
            self.t0 -= seconds  # that time was lost with the crashed process; count it again
        else:
            start = time.perf_counter()
            value = float(fitness(self.space.scaling(genome)))
            seconds = time.perf_counter() - start
            value = math.inf if math.isnan(value) else value
            if self.log:
                record = {"generation": generation, "factors": list(self.space.lambdas(genome)),
                          "n_hat": self.space.n_hats[genome.n_hat], "fitness": _num(value),
                          "seconds": round(seconds, 6)}
                self.log.write(json.dumps(record) + "\n")
                self.log.flush()  # survives a killed process (the OS holds it)
        state.cache[genome] = value
        state.fitness_seconds += seconds
        return value

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
                "population": [[list(g.factors), g.n_hat] for g in s.population],
                "cache": [[list(g.factors), g.n_hat, _num(v)] for g, v in s.cache.items()],
                "stats": s.stats, "seconds": s.seconds, "fitness_seconds": s.fitness_seconds}
        _write_atomic(self.out / STATE, json.dumps(data) + "\n")

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
            "best": {"long_factor": list(self.space.lambdas(best)), "n_hat": self.space.n_hats[best.n_hat]},
            "baselines": {name: _num(s.cache.get(g)) for name, g in self.space.baselines().items()},
            "evals": len(s.cache), "generations": s.generation, "stopped": stopped,
            "seconds": round(seconds, 3), "fitness_seconds": round(s.fitness_seconds, 3),
            "evals_per_min": round(60 * len(s.cache) / seconds, 3) if seconds > 0 else None,
            # the target: time outside model forwards < 10% of the search
            "overhead_share": round(1 - s.fitness_seconds / seconds, 4) if seconds > 0 else None,
            "config": c.to_dict(), "identity": self.identity, "versions": _versions(),
            "stats": s.stats, **(extra_summary or {}),
        }
        scaling = self.space.scaling(best)
        if self.log:
            self.log.close()
        if self.out:
            self.save(finished=stopped)
            _write_atomic(self.out / SCALING, scaling.to_json())
            _write_atomic(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return SearchResult(best, s.cache[best], scaling, s.stats, summary, self.out)


def _versions() -> dict[str, str]:
    import platform

    from . import __version__

    out = {"longrope": __version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def read_history(out: str | os.PathLike) -> list[dict]:
    """Every evaluation of the search in `out`, in order."""
    path = Path(out) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
