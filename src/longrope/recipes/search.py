"""`longrope search`: evolutionary search of LongRoPE rescale factors for a model and a target length.

A thin recipe over longrope.search: load the model, pick the documents, make the perplexity
fitness, show progress, plot. All state and outputs are the engine's (see longrope/search.py).

Under `torchrun --nproc-per-node N -m longrope search ...` every rank loads a model replica
(cuda:LOCAL_RANK, or the CPU when there is no GPU), rank 0 picks the documents and sends the
samples to the others, drives the search and alone writes files and shows progress; each
generation's candidates are shared out over the ranks. The result is the one process's.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, fields

from .. import models
from .. import scaling as sc
from .. import search as S
from ..cli import add_model_args, add_progress_args, device_and_dtype, parse_length, preset_path
from ..errors import UsageError
from ..progress import Progress

DESCRIPTION = """\
Search per-frequency rescale factors (and n̂) that minimise the perplexity of the model on
--samples documents cut to --target-length tokens (the first L' tokens of each, as the paper).

Writes into --out: scaling.json (use with --scaling, `longrope eval`, `longrope export`),
history.jsonl (every evaluated candidate), summary.json (evals, time, overhead, baselines),
search.png, and search_state.json (checkpoint, rewritten after every generation).
A killed search continues with --resume and ends exactly as an uninterrupted one would;
--resume with a larger --generations / --max-evals extends a finished search.

LongRoPE2's options: --fitness needle (perplexity of the answer to a passkey question whose
needle is near the start of each window), --algorithm critical-dim (NTK below a searched critical
dimension, factors in [s, 2s] above it), --search-attention (the attention factor as a gene).
On several GPUs: torchrun --nproc-per-node N -m longrope search ... (same result as one process).
--init S.json (or a preset) starts from earlier searched factors, as the paper extends 128k -> 256k
without fine-tuning: they join PI, NTK and YaRN in the initial population as they are and
carried to the new scale.
"""

# command-line option -> SearchConfig field (None: keep the default, or the resumed search's value)
CONFIG_OPTIONS = {f.name: f.name.replace("_", "-") for f in fields(S.SearchConfig)}
FITNESSES = ("ppl", "needle")


def register(sub) -> None:
    p = sub.add_parser("search", help="search LongRoPE rescale factors (evolutionary, resumable)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_progress_args(p)
    p.add_argument("--data", default="bundled", help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or "
                                                     "'bundled' (default)")
    p.add_argument("--target-length", type=parse_length, required=True, help="context to extend to, e.g. 64k")
    p.add_argument("--out", required=True, help="output folder (also the checkpoint to --resume from)")
    p.add_argument("--samples", type=int, default=5, help="documents evaluated per candidate (default 5)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per forward chunk (default: evaluate's)")
    p.add_argument("--batch-candidates", type=int, default=1, metavar="K",
                   help="evaluate K candidates in one batched forward (K × --samples sequences, each with its "
                        "own scaling): faster for small models, memory permitting; same result (default 1)")
    d = S.SearchConfig()
    g = p.add_argument_group("search (defaults: the paper's)")
    g.add_argument("--population", type=int, help=f"initial population (default {d.population})")
    g.add_argument("--mutations", type=int, help=f"mutated children per generation (default {d.mutations})")
    g.add_argument("--crossovers", type=int, help=f"crossed-over children per generation (default {d.crossovers})")
    g.add_argument("--parents", type=int, help=f"survivors of truncation selection (default {d.parents})")
    g.add_argument("--p", type=float, help=f"per-factor mutation probability (default {d.p})")
    g.add_argument("--local", type=float, help=f"share of small-step mutations, 0 = paper (default {d.local})")
    g.add_argument("--generations", type=int, help=f"generations after the initial one (default {d.generations})")
    g.add_argument("--max-evals", type=int, help="stop after this many evaluations")
    g.add_argument("--max-minutes", type=float, help="stop after this many minutes (not reproducible)")
    g.add_argument("--seed", type=int, help=f"search and document choice (default {d.seed})")
    g.add_argument("--max-tries", type=int, help=argparse.SUPPRESS)
    v = p.add_argument_group("LongRoPE2 (default: the original LongRoPE search; --resume keeps the search's choice)")
    v.add_argument("--fitness", choices=FITNESSES, default=None,
                   help="ppl: perplexity of the windows (default); needle: perplexity of the answer tokens of a "
                        "passkey question, the needle near the start of each window")
    v.add_argument("--algorithm", choices=S.ALGORITHMS, default=None,
                   help="evolution: every factor searched in [1, 1.25·s] (default); critical-dim: NTK below a "
                        "searched critical dimension, factors in [s, 2s] from it")
    v.add_argument("--search-attention", action="store_true", default=None,
                   help="search the attention factor (1.00..1.50) instead of using 'su'")
    p.add_argument("--init", default=None, metavar="S.json,...",
                   help="searched LongRoPE scalings (files or presets) to start from: their factors, as they are and "
                        "carried to --target-length, join the initial population (--resume keeps the search's)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out (start it if none)")
    p.add_argument("--force", action="store_true", help="replace a search in --out")
    p.set_defaults(func=cmd_search)


def search_config(args, saved: dict | None) -> S.SearchConfig:
    """The resumed search's config (or the defaults), with the options given on the command line."""
    base = dict(saved["config"]) if saved else {}
    base.update({name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name, None) is not None})
    known = {f.name for f in fields(S.SearchConfig)}
    return S.SearchConfig(**{k: v for k, v in base.items() if k in known}).validate()


def search_variant(args, saved: dict | None) -> tuple[str, str, bool]:
    """(fitness, algorithm, search_attention): the options given, else the resumed search's, else
    the defaults (identity holds them only where they differ from the defaults)."""
    ident = (saved or {}).get("identity", {})
    fitness = args.fitness or ident.get("fitness", "ppl")
    algorithm = args.algorithm or ident.get("algorithm", "evolution")
    attention = args.search_attention if args.search_attention is not None else ident.get("search_attention", False)
    return fitness, algorithm, bool(attention)


def make_space(info, target_length: int, algorithm: str, search_attention: bool, seeds=()) -> S.SearchSpace:
    cls = S.CriticalDimSpace if algorithm == "critical-dim" else S.SearchSpace
    return cls(info.dim, info.base, info.original_length, target_length, search_attention=search_attention,
               seeds=tuple(seeds))


def init_seeds(spec: str | None, info, target_length: int, saved: dict | None) -> tuple:
    """--init: each searched scaling's (factors, n̂) as they are and carried to the target; without
    it, a resumed search's own seeds."""
    if not spec:
        kept = (saved or {}).get("identity", {}).get("seeds") or ()
        return tuple((tuple(lambdas), int(n_hat)) for lambdas, n_hat in kept)
    seeds = []
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        try:
            scaling = sc.load(preset_path(entry), info.dim)
        except UsageError as exc:
            raise UsageError(f"--init {entry}: {str(exc).removeprefix(f'--scaling {entry}: ')}") from None
        if not isinstance(scaling, sc.LongRoPEScaling):
            raise UsageError(f"--init {entry}: a {scaling.rope_type} scaling; --init takes searched LongRoPE "
                             "scalings (PI, NTK and YaRN are always in the initial population)")
        if scaling.original_max_position_embeddings != info.original_length:
            raise UsageError(f"--init {entry}: made for a context of {scaling.original_max_position_embeddings}, "
                             f"the model's is {info.original_length}")
        choices = S.n_hat_choices(info.original_length)
        if scaling.n_hat not in choices:
            raise UsageError(f"--init {entry}: n_hat {scaling.n_hat} is not one the search uses "
                             f"({', '.join(map(str, choices))})")
        seeds.extend(S.seeds_from(scaling, target_length))
    return tuple(seeds)


def make_windows(kind: str, chosen, tokenizer, length: int, seed: int) -> list:
    """CPU token windows: the first L tokens of each document (the paper's protocol), or needle
    samples as (tokens, score_from) pairs that score only the answer."""
    import torch

    from .. import evaluate

    if kind == "needle":
        return [s.window for s in evaluate.needle_samples(tokenizer, [d.tokens for d in chosen], length, seed)]
    return [torch.as_tensor(d.tokens[:length], dtype=torch.long) for d in chosen]


def _on_device(windows: list, device) -> list:
    return [(w[0].to(device), w[1]) if isinstance(w, tuple) else w.to(device) for w in windows]


def _device(args, rank: S.Rank | None) -> str | None:
    """Under torchrun each rank takes cuda:LOCAL_RANK (or stays on the CPU)."""
    if rank is None:
        return args.device
    import torch

    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{rank.local}" if want.startswith("cuda") else want


def _agree(error: str | None, payload=None):
    """Every rank after its setup: (first error of any rank or None, rank 0's payload)."""
    import torch.distributed as dist

    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        return first, None
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return None, box[0]


def _worker(args, rank: S.Rank) -> int:
    """Ranks other than 0: a model replica that evaluates its share of each generation."""
    error = None
    try:
        args.device = _device(args, rank)
        device, dtype = device_and_dtype(args)
        model, _ = models.load(args.model, dtype=dtype, device=device)
    except Exception as exc:  # reported once, by rank 0
        error = f"rank {rank.rank}: {exc}"
    failed, windows = _agree(error)
    if failed:
        return 2
    S.serve(S.model_fitness(model, _on_device(windows, device), args.chunk_size))
    return 0


def cmd_search(args) -> int:
    rank = S.init_distributed()  # None: one process; `cli.main` leaves the process group at the end
    if rank is not None and rank.rank != 0:
        return _worker(args, rank)
    try:
        setup = _setup(args, rank)
    except Exception as exc:
        if rank is not None:
            _agree(f"{exc}")  # releases the other ranks
        raise
    if rank is not None:
        failed, _ = _agree(None, setup["windows"])
        if failed:
            raise UsageError(failed)
    return _search(args, setup)


def _setup(args, rank: S.Rank | None) -> dict:
    """Rank 0 (or the one process): check the options, load the model, choose the samples."""
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: must be at least 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size}: must be at least 1")
    batch = getattr(args, "batch_candidates", 1)
    if batch < 1:
        raise UsageError(f"--batch-candidates {batch}: must be at least 1")
    if batch > 1 and rank is not None:
        raise UsageError("--batch-candidates: not supported under torchrun yet (use one process, or 1)")
    S.check_out(args.out, args.resume, args.force)  # before the slow part
    from .. import data

    args.device = _device(args, rank)
    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    info = models.rope_info(model.config)
    saved = S.read_state(args.out) if args.resume and not args.force else None
    kind, algorithm, attention = search_variant(args, saved)
    seeds = init_seeds(getattr(args, "init", None), info, args.target_length, saved)
    space = make_space(info, args.target_length, algorithm, attention, seeds)
    config = search_config(args, saved)
    # where the fitness comes from: a resumed search must measure the same thing
    identity = {"model": _where(args.model), "data": _where(args.data), "samples": args.samples}
    if kind != "ppl":
        identity["fitness"] = kind
    S.check_out(args.out, args.resume, args.force, space, config, identity)

    docs = data.load_tokenized(args.data, tokenizer, progress=not args.quiet)
    try:
        chosen = data.select(docs, args.target_length, args.samples, seed=config.seed)
    except UsageError as exc:  # no document long enough
        raise UsageError(f"--data {args.data}: {exc}") from None
    if len(chosen) < args.samples:
        print(f"note: only {len(chosen)} of the documents have {args.target_length} tokens; searching on those")
    try:
        windows = make_windows(kind, chosen, tokenizer, args.target_length, config.seed)
    except ValueError as exc:  # a target length too short for the needle
        raise UsageError(f"--fitness needle: {exc}") from None
    return dict(model=model, device=device, info=info, space=space, config=config, identity=identity,
                kind=kind, chosen=chosen, windows=windows, world=rank.world if rank else 1)


def _search(args, setup: dict) -> int:
    from .. import report

    model, device, info, space, config = (setup[k] for k in ("model", "device", "info", "space", "config"))
    kind, chosen = setup["kind"], setup["chosen"]
    windows = _on_device(setup["windows"], device)
    fitness = S.model_fitness(model, windows, args.chunk_size)
    batch = getattr(args, "batch_candidates", 1)
    if isinstance(space, S.CriticalDimSpace):
        print(f"critical dimension: theoretical d_tcd = {space.critical_dim} of {space.dim} "
              f"({space.critical_dim // 2} frequency pairs follow NTK in its seed)")
    if setup["world"] > 1:
        print(f"evaluating on {setup['world']} ranks")

    # progress in evaluations (initial population included), to the end --max-evals sets
    bar = Progress(S.planned_evals(config), "search", "evals", quiet=args.quiet)
    hooks = S.progress_hooks(bar, config)

    extra = {"model": {"spec": args.model, **asdict(info)},
             "data": {"source": args.data, "documents": [d.id for d in chosen], "tokens": args.target_length,
                      "fitness": kind},
             "environment": {**report.environment(device), "ranks": setup["world"]}}
    if batch > 1:
        extra["environment"]["batch_candidates"] = batch
    try:
        with bar:
            if batch > 1:  # one process (checked in _setup)
                evaluator = S.Batched(model, windows, batch, args.chunk_size)
                result = S.run(space, None, config, args.out, evaluator=evaluator, identity=setup["identity"],
                               resume=args.resume, force=args.force, extra_summary=extra, **hooks)
            else:
                result = S.run_distributed(space, fitness, config, args.out, identity=setup["identity"],
                                           resume=args.resume, force=args.force, extra_summary=extra, **hooks)
    except KeyboardInterrupt:
        print("interrupted; every evaluation so far is kept: continue with the same command and --resume")
        return 130
    plot(os.path.join(args.out, S.PLOT), result, space)
    s = result.summary
    base = ", ".join(f"{k} {v:.4g}" for k, v in s["baselines"].items() if v is not None)
    what = "answer perplexity (needle)" if kind == "needle" else "perplexity"
    best = s["best"]
    genes = f"n_hat={best['n_hat']}"
    if "critical_dim" in best:
        genes += f", critical dim {best['critical_dim']} (theoretical {space.critical_dim})"
    if "attention_factor" in best:
        genes += f", attention factor {best['attention_factor']:.2f}"
    print(f"best {what} {result.fitness:.4g} ({genes}; {base}); "
          f"{s['evals']} evaluations in {s['seconds']:.0f}s, {s['overhead_share']:.1%} outside the model")
    print(f"wrote {args.out}")
    return 0


def _where(spec: str) -> str:
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def plot(path: str, result: S.SearchResult, space: S.SearchSpace) -> bool:
    """Best and median fitness per generation; the final λ beside PI, NTK and YaRN. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("note: matplotlib is not installed, no search.png (pip install matplotlib)")
        return False
    from .. import scaling as sc

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    gens = [r["generation"] for r in result.stats]
    for key in ("best", "median"):
        ax1.plot(gens, [float("nan") if r[key] is None else r[key] for r in result.stats], marker=".", label=key)
    ax1.set(xlabel="generation", ylabel="perplexity (population)", title="search")
    ax1.legend()
    d, b, s, n = space.dim, space.base, space.scale, space.original_length
    i = range(space.size)
    for label, factors in (("PI", sc.pi_factors(d, b, s)), ("NTK", sc.ntk_factors(d, b, s)),
                           ("YaRN", sc.yarn_factors(d, b, n, s))):
        ax2.plot(i, factors.tolist(), linestyle="--", label=label)
    ax2.plot(i, space.lambdas(result.best), color="black", label=f"searched (n̂={space.n_hats[result.best.n_hat]})")
    if result.best.critical is not None:
        ax2.axvline(result.best.critical - 0.5, color="black", linewidth=0.8, label="searched critical pair")
        ax2.axvline(space.critical_dim / 2 - 0.5, color="grey", linestyle=":", label="theoretical (d_tcd/2)")
    ax2.set(xlabel="frequency pair i", ylabel="rescale factor λ_i", yscale="log",
            title=f"{n} → {space.target_length} tokens (s = {s:g})")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 4, not 4×10⁰
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True
