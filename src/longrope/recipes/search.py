"""`longrope search`: evolutionary search of LongRoPE rescale factors for a model and a target length.

A thin recipe over longrope.search: options, the model and documents, progress, the plot and the
closing lines. State, outputs and the several-process handshake are the search package's.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from .. import data, models, report, runs
from .. import scaling as sc
from .. import search as S
from ..cli import add_model_args, add_progress_args, device_and_dtype, parse_length
from ..errors import UsageError
from ..progress import Counter, Progress

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

# SearchConfig field -> (type, help with "{}" for the default); an option left out keeps the
# default, or the resumed search's value
CONFIG_OPTIONS = {
    "population": (int, "initial population (default {})"),
    "mutations": (int, "mutated children per generation (default {})"),
    "crossovers": (int, "crossed-over children per generation (default {})"),
    "parents": (int, "survivors of truncation selection (default {})"),
    "p": (float, "per-factor mutation probability (default {})"),
    "local": (float, "share of small-step mutations, 0 = paper (default {})"),
    "generations": (int, "generations after the initial one (default {})"),
    "max_evals": (int, "stop after this many evaluations"),
    "max_minutes": (float, "stop after this many minutes (not reproducible)"),
    "seed": (int, "search and document choice (default {})"),
    "max_tries": (int, argparse.SUPPRESS),
}


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
    defaults = S.SearchConfig()
    g = p.add_argument_group("search (defaults: the paper's)")
    for name, (kind, text) in CONFIG_OPTIONS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text.format(getattr(defaults, name)))
    v = p.add_argument_group("LongRoPE2 (default: the original LongRoPE search; --resume keeps the search's choice)")
    v.add_argument("--fitness", choices=S.FITNESSES, default=None,
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


def init_seeds(spec: str, info, target_length: int) -> tuple:
    """--init: each searched scaling's (factors, n̂) as they are and carried to the target."""
    seeds = []
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        try:
            seeds.extend(S.seeds_from(sc.load(sc.preset_path(entry), info.dim), target_length, info.original_length))
        except UsageError as exc:
            raise UsageError(f"--init {entry}: {str(exc).removeprefix(f'--scaling {entry}: ')}") from None
    return tuple(seeds)


def cmd_search(args) -> int:
    rank = S.init_distributed()  # None: one process; `cli.main` leaves the process group at the end
    args.device = S.rank_device(args.device, rank)

    def load_replica():
        device, dtype = device_and_dtype(args)
        return models.load(args.model, dtype=dtype, device=device)[0]

    return S.search_on_ranks(rank, lambda: _setup(args, rank), lambda setup: _search(args, setup),
                             lambda setup: setup["windows"], load_replica, args.chunk_size)


def _setup(args, rank: S.Rank | None) -> dict:
    """Rank 0 (or the one process): check the options, load the model, choose the samples."""
    for option, value in (("--samples", args.samples), ("--chunk-size", args.chunk_size),
                          ("--batch-candidates", args.batch_candidates)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value}: must be at least 1")
    if args.batch_candidates > 1 and rank is not None:
        raise UsageError("--batch-candidates: not supported under torchrun yet (use one process, or 1)")
    S.check_out(args.out, args.resume, args.force)  # before the slow part
    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    info = models.rope_info(model.config)
    saved = S.read_state(args.out) if args.resume and not args.force else None
    # the options given, else the resumed search's, else the defaults
    ident = (saved or {}).get("identity", {})
    kind = args.fitness or ident.get("fitness", "ppl")
    space = S.resumed_space(info.dim, info.base, info.original_length, args.target_length, ident, args.algorithm,
                            args.search_attention, init_seeds(args.init, info, args.target_length) if args.init else None)
    config = S.SearchConfig.resumed(saved, **{name: getattr(args, name) for name in CONFIG_OPTIONS})
    # where the fitness comes from: a resumed search must measure the same thing
    identity = {"model": _where(args.model), "data": _where(args.data), "samples": args.samples}
    if kind != "ppl":
        identity["fitness"] = kind
    S.check_out(args.out, args.resume, args.force, space, config, identity)

    docs = data.load_tokenized(args.data, tokenizer, progress=Counter("tokenising", "docs", quiet=args.quiet))
    try:
        chosen = data.select(docs, args.target_length, args.samples, seed=config.seed)
    except UsageError as exc:  # no document long enough
        raise UsageError(f"--data {args.data}: {exc}") from None
    if len(chosen) < args.samples:
        print(f"note: only {len(chosen)} of the documents have {args.target_length} tokens; searching on those")
    try:
        windows = S.fitness_windows(kind, [d.tokens for d in chosen], tokenizer, args.target_length, config.seed)
    except ValueError as exc:  # a target length too short for the needle
        raise UsageError(f"--fitness needle: {exc}") from None
    return dict(model=model, device=device, info=info, space=space, config=config, identity=identity,
                kind=kind, chosen=chosen, windows=windows, world=rank.world if rank else 1)


def _search(args, setup: dict) -> int:
    model, space, config, kind, world = (setup[k] for k in ("model", "space", "config", "kind", "world"))
    if isinstance(space, S.CriticalDimSpace):
        print(f"critical dimension: theoretical d_tcd = {space.critical_dim} of {space.dim} "
              f"({space.critical_dim // 2} frequency pairs follow NTK in its seed)")
    if world > 1:
        print(f"evaluating on {world} ranks")
    extra = {"model": {"spec": args.model, **asdict(setup["info"])},
             "data": {"source": args.data, "documents": [d.id for d in setup["chosen"]],
                      "tokens": args.target_length, "fitness": kind},
             "environment": {**runs.environment(setup["device"]), "ranks": world}}
    if args.batch_candidates > 1:
        extra["environment"]["batch_candidates"] = args.batch_candidates
    # progress in evaluations (initial population included), to the end --max-evals sets
    bar = Progress(S.planned_evals(config), "search", "evals", quiet=args.quiet)
    kwargs = dict(identity=setup["identity"], resume=args.resume, force=args.force, extra_summary=extra,
                  **S.progress_hooks(bar, config))
    try:
        with bar:
            if args.batch_candidates > 1:  # one process (checked in _setup)
                evaluator = S.Batched(model, setup["windows"], args.batch_candidates, args.chunk_size)
                result = S.run(space, None, config, args.out, evaluator=evaluator, **kwargs)
            else:
                fitness = S.model_fitness(model, setup["windows"], args.chunk_size)
                result = S.run_distributed(space, fitness, config, args.out, **kwargs)
    except KeyboardInterrupt:
        print("interrupted; every evaluation so far is kept: continue with the same command and --resume")
        return 130
    if not report.plot_search(os.path.join(args.out, S.PLOT), result, space):
        print("note: matplotlib is not installed, no search.png (pip install matplotlib)")
    s, best = result.summary, result.summary["best"]
    genes = f"n_hat={best['n_hat']}"
    if "critical_dim" in best:
        genes += f", critical dim {best['critical_dim']} (theoretical {space.critical_dim})"
    if "attention_factor" in best:
        genes += f", attention factor {best['attention_factor']:.2f}"
    baselines = ", ".join(f"{k} {v:.4g}" for k, v in s["baselines"].items() if v is not None)
    what = "answer perplexity (needle)" if kind == "needle" else "perplexity"
    print(f"best {what} {result.fitness:.4g} ({genes}; {baselines}); "
          f"{s['evals']} evaluations in {s['seconds']:.0f}s, {s['overhead_share']:.1%} outside the model")
    print(f"wrote {args.out}")
    return 0


def _where(spec: str) -> str:
    return os.path.abspath(spec) if os.path.exists(spec) else spec
