"""How a search's candidates are evaluated on a model: one after another (`model_fitness`, through
`engine.Serial`), several in one batched forward (`Batched`), or shared out over the ranks of a
torchrun world (`DistributedEvaluator`, `serve`, `run_distributed`, `search_on_ranks`).

Every evaluator is a callable from a list of scalings to their fitness values, in order, with
an optional `width` (candidates per call); the evolution does not depend on which one runs.
Under torchrun rank 0 drives the evolution and alone writes files; each generation's candidates
are shared out, rank r evaluating those at positions r, r + world, ..., so the result is the one
process's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .. import distributed, evaluate, lean, models, nll, passkey
from ..errors import UsageError
from ..rotary import BatchedRotaryEmbedding
from ..scaling import LongRoPEScaling
from .engine import Fitness, SearchConfig, SearchResult, Serial, run
from .space import SearchSpace

FITNESSES = ("ppl", "needle", "short")  # the terms a model fitness combines (`parse_fitness`)
DIST_TIMEOUT_MINUTES = 180  # a collective waits this long (a worker waits while rank 0 tokenises)

Prepared = TypeVar("Prepared")


# --------------------------------------------------------------------------------------------
# one process


def parse_fitness(text: str) -> dict[str, float]:
    """A fitness on the command line: one term ("ppl", "needle", "short") or weighted terms
    ("ppl=1,needle=1,short=0.5"), as {term: weight}. ValueError names what is wrong."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        name, _, weight = part.partition("=")
        if name not in FITNESSES or name in weights:
            raise ValueError(f"{part!r}: terms are {', '.join(FITNESSES)}, each once (e.g. ppl=1,needle=1,short=0.5)")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{part!r}: the weight must be a number") from None
        if not (math.isfinite(weights[name]) and weights[name] > 0):
            raise ValueError(f"{part!r}: the weight must be a positive number")
    return weights


def fitness_name(weights: dict[str, float]) -> str:
    """`parse_fitness`'s input back: "ppl", or "ppl=1,needle=0.5" (identity, summaries)."""
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(weights))
    return ",".join(f"{k}={v:g}" for k, v in weights.items())


NEEDLE_DEPTHS = (0.1, 0.5, 0.9)  # needle depths of the "needle" term, the documents taken in turn


def fitness_windows(kind: str, documents: Sequence[Sequence[int]], tokenizer, length: int, seed: int,
                    original_length: int | None = None) -> list:
    """CPU token windows of one fitness term from tokenised documents: "ppl", the first `length`
    tokens of each (the paper's protocol); "needle" (LongRoPE2's needle-driven perplexity), passkey
    samples at `NEEDLE_DEPTHS` of the documents as (tokens, score_from) pairs that score only the
    answer; "short", the first `original_length` tokens of each (scored with the long factors, see
    `served_long`). ValueError if `length` is too short for the needle."""
    if kind == "needle":
        depths = NEEDLE_DEPTHS if len(documents) <= len(NEEDLE_DEPTHS) else [
            0.1 + 0.8 * i / (len(documents) - 1) for i in range(len(documents))]  # one per document
        return [s.window for s in passkey.needle_samples(tokenizer, list(documents), length, seed, depths=depths)]
    if kind == "short":
        if original_length is None:
            raise ValueError("fitness: the short term needs the original length")
        length = original_length
    elif kind != "ppl":
        raise ValueError(f"fitness: one of {', '.join(FITNESSES)}, got {kind!r}")
    return [torch.as_tensor(tokens[:length], dtype=torch.long) for tokens in documents]


def served_long(scaling: LongRoPEScaling) -> LongRoPEScaling:
    """The scaling as vLLM serves it when its max length exceeds the original context: the long
    factors and temperature for every prompt, short ones included (the "short" term)."""
    return scaling.replace(short_factor=scaling.long_factor, short_attention_factor=None)


class Terms:
    """The evaluator of a weighted fitness: each term's evaluator (a list of scalings -> their
    perplexities on that term's windows) combined as the weighted geometric mean of the
    perplexities, exp(Σ w·ln ppl / Σ w): a single term is its perplexity, and a weight says how
    much a relative change in that term counts. `last` holds the terms of the last call."""

    def __init__(self, evaluators: dict[str, "Callable"], weights: dict[str, float]):
        self.evaluators, self.weights = evaluators, weights
        self.width = min((int(getattr(e, "width", 1) or 1) for e in evaluators.values()), default=1)
        self.last: list[dict[str, float]] = []

    def __call__(self, scalings: Sequence[LongRoPEScaling]) -> list[float]:
        scalings = list(scalings)
        per_term = {}
        for name, evaluator in self.evaluators.items():
            given = [served_long(s) for s in scalings] if name == "short" else scalings
            per_term[name] = [float(v) for v in evaluator(given)]
        self.last = [{name: values[i] for name, values in per_term.items()} for i in range(len(scalings))]
        total = sum(self.weights.values())
        return [math.exp(sum(w * math.log(terms[name]) for name, w in self.weights.items()) / total)
                if all(math.isfinite(v) and v > 0 for v in terms.values()) else math.inf
                for terms in self.last]


def term_evaluator(model, windows: dict[str, list], weights: dict[str, float], chunk_size: int | None = None,
                   candidates: int = 1) -> Terms:
    """`Terms` on a model: each term's windows through `model_fitness` or, with `candidates` > 1,
    `Batched` (several candidates per forward)."""
    def one(term_windows):
        if candidates > 1:
            return Batched(model, term_windows, candidates, chunk_size)
        return Serial(model_fitness(model, term_windows, chunk_size))
    return Terms({name: one(windows[name]) for name in weights}, weights)


def term_fitness(model, windows: dict[str, list], weights: dict[str, float], chunk_size: int | None = None) -> Fitness:
    """`term_evaluator` as a one-scaling fitness (what the ranks of a torchrun search serve)."""
    evaluator = term_evaluator(model, windows, weights, chunk_size)
    return lambda scaling: evaluator([scaling])[0]


def _device_of(model) -> torch.device:
    return model.get_output_embeddings().weight.device


def _on_device(windows: Sequence, device: torch.device) -> list:
    """Windows (token tensors or (tokens, score_from) pairs) moved to `device`."""
    return [(torch.as_tensor(w[0]).to(device), w[1]) if isinstance(w, tuple) else torch.as_tensor(w).to(device)
            for w in windows]


def model_fitness(model, windows, chunk_size: int | None = None) -> Fitness:
    """Perplexity of `model` with the candidate scaling attached, on `windows` (token tensors of
    the target length, or (tokens, score_from) pairs), moved once to the model's device."""
    windows = _on_device(windows, _device_of(model))
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}

    def fitness(scaling: LongRoPEScaling) -> float:
        models.attach(model, scaling)
        return float(evaluate.perplexity(model, windows, **kwargs))

    return fitness


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
    chunk = nll.DEFAULT_CHUNK if chunk_size is None else max(1, int(chunk_size))  # the loss's
    info = models.rope_info(model.config)
    device = _device_of(model)
    pairs = [(w if isinstance(w, tuple) else (w, 1)) for w in windows]
    result = [[(0.0, 0)] * len(pairs) for _ in scalings]
    by_length: dict[int, list[int]] = {}
    for j, (ids, score_from) in enumerate(pairs):
        n = int(torch.as_tensor(ids).numel())
        if n > max(1, int(score_from)):
            by_length.setdefault(n, []).append(j)
    with models.rotary_swap(model) as put, torch.inference_mode():
        for n, js in by_length.items():
            samples = [(i, j) for i in range(len(scalings)) for j in js]
            step = len(samples) if max_batch is None else max(1, int(max_batch))
            for b0 in range(0, len(samples), step):
                batch = samples[b0:b0 + step]
                put(BatchedRotaryEmbedding.from_scalings([scalings[i] for i, _ in batch], info.dim, info.base, n))
                ids = torch.stack([torch.as_tensor(pairs[j][0]).reshape(-1).long() for _, j in batch]).to(device)
                hidden = lean.final_hidden_states_batch(model, ids, chunk_size)
                for row, (i, j) in enumerate(batch):
                    result[i][j] = nll.sequence_nll(model, hidden[row], ids[row], max(1, int(pairs[j][1])), chunk)
                del hidden
    return result


# --------------------------------------------------------------------------------------------
# several processes (torchrun): rank 0 drives the evolution, every rank evaluates a share


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int  # the rank on this host: which GPU


def init_distributed(timeout_minutes: float = DIST_TIMEOUT_MINUTES) -> Rank | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), or None for
    a single process. The group uses gloo whatever the devices: only candidates (small Python
    objects) and fitness values travel, so the same code runs on CPUs and GPUs."""
    if distributed.world_size() <= 1:
        return None
    distributed.join("gloo", timeout_minutes=timeout_minutes)
    return Rank(dist.get_rank(), dist.get_world_size(), distributed.local_rank())


def rank_device(device: str | None, rank: Rank | None) -> str | None:
    """The device this process evaluates on: `device` for one process; under torchrun each rank
    takes cuda:LOCAL_RANK (the default where there is a GPU), or stays on the CPU."""
    if rank is None:
        return device
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{rank.local}" if want.startswith("cuda") else want


def _distributed() -> tuple[int, int] | None:
    """(rank, world) of an initialised process group of more than one process, else None."""
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
        where = _distributed()
        if where is None or where[0] != 0:
            raise RuntimeError("DistributedEvaluator: only on rank 0 of a process group of several ranks")
        self.fitness = fitness
        self.world = self.width = where[1]
        self.closed = False

    def __call__(self, scalings: Sequence[LongRoPEScaling]) -> list[float]:
        scalings = list(scalings)
        dist.broadcast_object_list([("evaluate", scalings)], src=0)
        parts: list = [None] * self.world
        dist.gather_object(_share(self.fitness, scalings, 0, self.world), parts, dst=0)
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
            dist.broadcast_object_list([("stop", None)], src=0)

    def __enter__(self) -> "DistributedEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(fitness: Fitness) -> int:
    """The other ranks: evaluate this rank's share of each call of rank 0's `DistributedEvaluator`
    until it closes. Returns how many candidates this rank evaluated."""
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


def _agree(error: str | None, payload: Any = None) -> tuple[str | None, Any]:
    """Every rank after its setup: (first error of any rank or None, rank 0's payload)."""
    first = distributed.first_error(error)
    if first:
        return first, None
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return None, box[0]


def search_on_ranks(rank: Rank | None, setup: Callable[[], Prepared], search: Callable[[Prepared], int],
                    windows_of: Callable[[Prepared], dict], load_replica: Callable[[], Any],
                    chunk_size: int | None = None) -> int:
    """A model search in one process (`rank` None) or on every rank of a torchrun world; returns
    the process's exit code. Rank 0 (or the one process) runs `setup` (check the options, load
    its model, choose the windows: the slow part), then `search(prepared)`, which runs the search
    with `run_distributed`. Each other rank meanwhile loads its model with `load_replica()`,
    receives rank 0's CPU windows and weights (`windows_of(prepared)`: {"windows": {term: windows},
    "weights": {term: weight}}) and evaluates its share of each generation on them (`term_fitness`,
    `serve`) until rank 0's search ends. A failure in any
    rank's setup reaches every rank: rank 0 raises it (a UsageError naming the rank), the others
    return 2 without a word, so that it is reported once."""
    if rank is not None and rank.rank != 0:
        error = model = None
        try:
            model = load_replica()
        except Exception as exc:  # reported once, by rank 0
            error = f"rank {rank.rank}: {exc}"
        failed, payload = _agree(error)
        if failed:
            return 2
        serve(term_fitness(model, payload["windows"], payload["weights"], chunk_size))
        return 0
    try:
        prepared = setup()
    except Exception as exc:
        if rank is not None:
            _agree(f"{exc}")  # releases the other ranks
        raise
    if rank is not None:
        failed, _ = _agree(None, windows_of(prepared))
        if failed:
            raise UsageError(failed)
    return search(prepared)
