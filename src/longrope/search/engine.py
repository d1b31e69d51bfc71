"""The evolutionary search (Ding et al. 2024, §3.2 and Algorithm 1) and its book of files.

Algorithm 1 of the paper, as in its reference code: the initial population is PI, NTK and YaRN
and mutations of them; each generation keeps the best `parents` (truncation selection) and adds
`mutations` mutated and `crossovers` crossed-over children; every genome is evaluated once.
One addition: a share `local` of gene mutations are small steps rather than uniform redraws,
so the search can polish a good candidate (set local=0 for the paper's operator).

The fitness is any callable `fitness(scaling) -> float`, lower is better, or an *evaluator*: a
callable from a list of scalings to their fitness values (`Serial` here; the model-backed and
distributed ones in `evaluators`). The evolution never depends on the evaluator: the children of
a generation are drawn before any is evaluated and results are kept in their order.

Reproducibility: one seeded numpy Generator drives every random choice. After each generation
`search_state.json` (population, fitness cache, RNG state, config, identity) is replaced
atomically, and every evaluation is appended to `history.jsonl` as it happens, so a search killed
mid-generation resumes from the last state, takes the evaluations it already paid for from the
log, and ends with exactly the result an uninterrupted run gives.

Generalisation (issue 15): with a `validation` evaluator (the same measure on documents the
fitness never sees) each generation's fittest genome, the seeds and, at the end, the
`validate_top` fittest are scored on validation, and the search returns the best of them *on
validation*, not the fittest. `references` (named scalings: PI, NTK, YaRN, YaRN-shaped LongRoPE
under each temperature, see `space.reference_scalings`) are scored too, and one of them is
returned when none of the searched genomes beats it: a search never returns something worse than
its best seed on the criterion it is judged by.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .. import runs
from ..errors import UsageError
from ..scaling import LongRoPEScaling
from .space import Genome, SearchSpace, mutate

# files a search writes into its output folder
STATE, HISTORY, SCALING, SUMMARY = "search_state.json", "history.jsonl", "scaling.json", "summary.json"
REFERENCE = "best_reference.json"  # the best of the references: the baseline to report beside scaling.json
PLOT = "search.png"  # drawn by the recipe
OUTPUT_FILES = (STATE, HISTORY, SCALING, SUMMARY, REFERENCE, PLOT)
STATE_VERSION = 1

Fitness = Callable[[LongRoPEScaling], float]
Evaluator = Callable[[Sequence[LongRoPEScaling]], Sequence[float]]  # may have `width`: candidates per call


class Serial:
    """The single-process evaluator: the candidates one after another through `fitness`."""

    width = 1  # the budget (max_evals, max_minutes) is checked before every evaluation

    def __init__(self, fitness: Fitness):
        self.fitness = fitness

    def __call__(self, scalings: Sequence[LongRoPEScaling]) -> list[float]:
        return [self.fitness(s) for s in scalings]


@dataclass
class SearchConfig:
    """The paper's settings (population 64, 16 + 16 children, 32 parents, p = 0.3, 40
    generations); a budget stops the search early, after the evaluation that exhausts it."""

    # "help": the command line's (`cli.add_config_options`); a field without one is a hidden option
    population: int = field(default=64, metadata={"help": "initial population"})
    mutations: int = field(default=16, metadata={"help": "mutated children per generation"})
    crossovers: int = field(default=16, metadata={"help": "crossed-over children per generation"})
    parents: int = field(default=32, metadata={"help": "survivors of truncation selection"})
    p: float = field(default=0.3, metadata={"help": "per-factor mutation probability"})
    local: float = field(default=0.25, metadata={"help": "share of small-step mutations, 0 = the paper's "
                                                         "uniform redraw"})
    generations: int = field(default=40, metadata={"help": "generations after the initial one"})
    max_evals: int | None = field(default=None, metadata={"help": "stop after this many evaluations"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this many minutes, resumed "
                                                                      "sessions included (not reproducible)"})
    seed: int = field(default=0, metadata={"help": "search and document choice"})
    validate_top: int = field(default=4, metadata={"help": "with validation documents: the N fittest genomes are "
                                                           "also scored on them at the end"})
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
            (self.validate_top >= 1, f"validate_top must be >= 1, got {self.validate_top}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"search config: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resumed(cls, saved_state: Mapping[str, Any] | None, **given: Any) -> "SearchConfig":
        """The config of a saved search (`read_state`; None: the defaults) with the `given`
        fields that are not None, validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in (saved_state or {}).get("config", {}).items() if k in known}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values).validate()


# --------------------------------------------------------------------------------------------
# selection and breeding: (genomes, rng) -> genomes; the variation operators are the space's


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
    best: Genome  # the searched genome chosen: the best on validation (without validation: the fittest)
    fitness: float  # of what is returned (`scaling`)
    scaling: LongRoPEScaling  # what is returned: `best`'s, or a reference's that beat it
    stats: list[dict]  # per generation: best, median, evals, seconds (and the best's validation)
    summary: dict  # what summary.json holds
    out: Path | None = None
    returned: str = "search"  # or the name of the reference returned instead
    validation: float | None = None  # of what is returned, when there were validation documents


def run(space: SearchSpace, fitness: Fitness | None = None, config: SearchConfig | None = None,
        out: str | os.PathLike | None = None, *, evaluator: Evaluator | None = None,
        identity: Mapping[str, Any] | None = None, resume: bool = False, force: bool = False,
        on_generation: Callable[[dict], None] | None = None,
        on_evaluation: Callable[[dict], None] | None = None,
        extra_summary: Mapping[str, Any] | None = None, validation: Evaluator | None = None,
        references: Mapping[str, LongRoPEScaling] | None = None) -> SearchResult:
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
    after a crash. `progress_hooks` shows all this on a progress bar.

    `validation` (an evaluator on documents the fitness does not see) and `references` (named
    scalings) choose what is returned, as the module says; neither changes the evolution. A
    single-scaling validation function goes in as `Serial(function)`."""
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
    book.judge = _Judge(validation, references or {}, state)
    book.judge.score_references(evaluator)

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
        if g == 0:  # the seeds themselves are candidates for what is returned
            book.judge.validate([b for b in space.baselines().values() if b in state.cache], space)
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
        if "validation" in stats:  # the issue asks each generation to log how its best generalises
            fmt = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731
            bar.note(f"generation {stats['generation']}: fittest {fmt(stats['best'])}, "
                     f"on validation {fmt(stats['validation'])}")
            bar.update(0, val=float("inf") if stats["validation"] is None else stats["validation"])

    return {"on_evaluation": on_evaluation, "on_generation": on_generation}


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
    validation: dict[Genome, float] = field(default_factory=dict)  # genomes scored on validation
    references: dict[str, dict] = field(default_factory=dict)  # name -> {"fitness", "validation"}


class _Judge:
    """What the search returns: genomes scored on validation (kept in the state, so a resumed
    search does not pay twice) and the references. Without validation it judges by fitness."""

    def __init__(self, validation: Evaluator | None, references: Mapping[str, LongRoPEScaling], state: _State):
        self.validator, self.references, self.state = validation, dict(references), state

    def score_references(self, evaluator: Evaluator) -> None:
        """Fitness (and validation) of each reference not yet scored: before the first generation."""
        todo = [name for name in self.references if name not in self.state.references]
        if not todo:
            return
        scalings = [self.references[name] for name in todo]
        start = time.perf_counter()
        fitness = list(evaluator(scalings))
        valid = list(self.validator(scalings)) if self.validator else [None] * len(todo)
        self.state.fitness_seconds += time.perf_counter() - start  # model time, not the search's overhead
        for name, f, v in zip(todo, fitness, valid):
            self.state.references[name] = {"fitness": _num(float(f)),
                                           "validation": None if v is None else _num(float(v))}

    def validate(self, genomes: Sequence[Genome], space: SearchSpace) -> None:
        todo = [g for g in dict.fromkeys(genomes) if g not in self.state.validation]
        if self.validator and todo:
            start = time.perf_counter()
            values = self.validator([space.scaling(g) for g in todo])
            self.state.fitness_seconds += time.perf_counter() - start
            self.state.validation.update({g: _rank(float(v)) for g, v in zip(todo, values)})

    def score(self, g: Genome) -> float:
        """The criterion a genome is judged by (lower is better)."""
        return self.state.validation[g] if self.validator else _rank(self.state.cache[g])

    def choose(self, space: SearchSpace, top: int) -> tuple[Genome, str | None]:
        """The genome to return, and the reference that beats it on the criterion (or None)."""
        s = self.state
        fittest = select(list(s.cache), s.cache, top if self.validator else 1)
        self.validate(fittest, space)
        pool = list(s.validation) if self.validator else fittest
        best = min(pool, key=lambda g: (self.score(g), _rank(s.cache.get(g))))
        key = "validation" if self.validator else "fitness"
        scored = {n: _rank(r[key]) for n, r in s.references.items()}
        better = min(scored, key=scored.get, default=None)
        return best, (better if better is not None and scored[better] < self.score(best) else None)


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x  # JSON has no inf/nan


# a genome in search_state.json: [factor steps, n̂ index, *values(, {"critical": c, "attention": a})],
# the last item only for the genes beyond the paper's (values: the fitness, in the cache)
def _state_item(g: Genome, *values) -> list:
    extras = {k: v for k, v in (("critical", g.critical_pairs), ("attention", g.attention_steps)) if v is not None}
    return [list(g.factor_steps), g.n_hat_index, *values] + ([extras] if extras else [])


def _from_state_item(item: Sequence, n_values: int = 0) -> Genome:
    extras = item[2 + n_values] if len(item) > 2 + n_values else {}
    return Genome(tuple(item[0]), item[1], extras.get("critical"), extras.get("attention"))


def read_state(out: str | os.PathLike) -> dict | None:
    path = Path(out) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable search state ({exc}); use another --out or --force") from None


def read_history(out: str | os.PathLike) -> list[dict]:
    """Every evaluation of the search in `out`, in order."""
    path = Path(out) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        self.judge: _Judge = _Judge(None, {}, state)  # what is returned (set by `run`)
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
            state = cls._load(saved)
            pending = cls._recover(out / HISTORY, space, state.cache)
        return cls(out, space, config, identity, state, pending)

    @staticmethod
    def _load(saved: dict) -> _State:
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = saved["rng"]
        cache = {_from_state_item(x, 1): math.inf if x[2] is None else x[2] for x in saved["cache"]}
        validation = {_from_state_item(x, 1): _rank(x[2]) for x in saved.get("validation", [])}
        return _State(rng=rng, generation=saved["generation"],
                      population=[_from_state_item(x) for x in saved["population"]], cache=cache,
                      stats=saved["stats"], seconds=saved["seconds"], fitness_seconds=saved["fitness_seconds"],
                      validation=validation, references=saved.get("references", {}))

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
        stats = {"generation": state.generation, "best": _num(float(values.min())),
                 "median": _num(float(np.median(values))), "evals": len(state.cache)}
        if self.judge.validator and state.population:  # how the fittest generalises, generation by generation
            fittest = select(state.population, state.cache, 1)[0]
            self.judge.validate([fittest], self.space)
            stats["validation"] = _num(state.validation[fittest])
        state.stats.append({**stats, "seconds": round(self.elapsed(), 3)})
        state.generation += 1
        self.save()

    def save(self, finished: str | None = None) -> None:
        if not self.out:
            return
        s = self.state
        s.seconds = self.elapsed()
        data = {"version": STATE_VERSION, "identity": self.identity, "config": self.config.to_dict(),
                "generation": s.generation, "finished": finished, "rng": s.rng.bit_generator.state,
                "population": [_state_item(g) for g in s.population],
                "cache": [_state_item(g, _num(v)) for g, v in s.cache.items()],
                "stats": s.stats, "seconds": s.seconds, "fitness_seconds": s.fitness_seconds,
                "validation": [_state_item(g, _num(v)) for g, v in s.validation.items()],
                "references": s.references}
        runs.write_text(self.out / STATE, json.dumps(data) + "\n")

    def finish(self, extra_summary: Mapping[str, Any] | None) -> SearchResult:
        s, c = self.state, self.config
        if not s.cache:
            raise UsageError("search: no candidate was evaluated (budget too small?)")
        best, beaten_by = self.judge.choose(self.space, c.validate_top)
        stopped = "generations" if s.generation > c.generations else (
            "max_evals" if c.max_evals is not None and len(s.cache) >= c.max_evals else "max_minutes")
        seconds = self.elapsed()
        judged = self._judged(best, beaten_by)
        summary = {
            "best_fitness": judged["fitness"],
            "best": self.space.describe(best), **judged["summary"],
            "baselines": {name: _num(s.cache.get(g)) for name, g in self.space.baselines().items()},
            "evals": len(s.cache), "generations": s.generation, "stopped": stopped,
            "seconds": round(seconds, 3), "fitness_seconds": round(s.fitness_seconds, 3),
            "evals_per_min": round(60 * len(s.cache) / seconds, 3) if seconds > 0 else None,
            # the target: time outside model forwards < 10% of the search (validation and
            # references are model time too)
            "overhead_share": round(1 - s.fitness_seconds / seconds, 4) if seconds > 0 else None,
            "config": c.to_dict(), "identity": self.identity, "versions": runs.versions(),
            "stats": s.stats, "space": self.space.summary(), **(extra_summary or {}),
        }
        scaling = self.judge.references[beaten_by] if beaten_by else self.space.scaling(best)
        if self.log:
            self.log.close()
        if self.out:
            self.save(finished=stopped)
            runs.write_text(self.out / SCALING, scaling.to_json())
            runs.write_text(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
            if "best_reference" in summary:
                runs.write_text(self.out / REFERENCE,
                                self.judge.references[summary["best_reference"]["name"]].to_json())
        fitness = math.inf if judged["fitness"] is None else judged["fitness"]
        return SearchResult(best, fitness, scaling, s.stats, summary, self.out, beaten_by or "search",
                            judged["validation"])

    def _judged(self, best: Genome, beaten_by: str | None) -> dict:
        """What the summary says of the choice: the criterion, the returned candidate's scores, the
        references' and the gain over the best of them (1 - returned / best reference)."""
        s, judge = self.state, self.judge
        if beaten_by:
            fitness, valid = s.references[beaten_by]["fitness"], s.references[beaten_by]["validation"]
        else:
            fitness, valid = _num(s.cache[best]), _num(s.validation[best]) if judge.validator else None
        out: dict[str, Any] = {"selection": "validation" if judge.validator else "fitness",
                               "returned": beaten_by or "search"}
        if judge.validator:
            out["best_validation"] = valid
            out["validated"] = len(s.validation)
            fittest = select(list(s.cache), s.cache, 1)[0]
            out["fittest"] = {"fitness": _num(s.cache[fittest]), "validation": _num(s.validation.get(fittest))}
        if s.references:
            key = out["selection"]
            name = min(s.references, key=lambda n: _rank(s.references[n][key]))
            ref = s.references[name]
            mine = valid if judge.validator else fitness
            out["references"] = s.references
            out["best_reference"] = {"name": name, **ref}
            out["gain_over_best_reference"] = (round(1 - mine / ref[key], 6)
                                               if mine is not None and ref[key] else None)
        return {"fitness": fitness, "validation": valid, "summary": out}
