"""`longrope search`: evolutionary search of LongRoPE rescale factors for a model and a target length.

A thin recipe over longrope.search: load the model, pick the documents, make the perplexity
fitness, show progress, plot. All state and outputs are the engine's (see longrope/search.py).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, fields

from .. import models
from .. import search as S
from ..cli import add_model_args, device_and_dtype, parse_length
from ..errors import UsageError

DESCRIPTION = """\
Search per-frequency rescale factors (and n̂) that minimise the perplexity of the model on
--samples documents cut to --target-length tokens (the first L' tokens of each, as the paper).

Writes into --out: scaling.json (use with --scaling, `longrope eval`, `longrope export`),
history.jsonl (every evaluated candidate), summary.json (evals, time, overhead, baselines),
search.png, and search_state.json (checkpoint, rewritten after every generation).
A killed search continues with --resume and ends exactly as an uninterrupted one would;
--resume with a larger --generations / --max-evals extends a finished search.
"""

# command-line option -> SearchConfig field (None: keep the default, or the resumed search's value)
CONFIG_OPTIONS = {f.name: f.name.replace("_", "-") for f in fields(S.SearchConfig)}


def register(sub) -> None:
    p = sub.add_parser("search", help="search LongRoPE rescale factors (evolutionary, resumable)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", default="bundled", help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or "
                                                     "'bundled' (default)")
    p.add_argument("--target-length", type=parse_length, required=True, help="context to extend to, e.g. 64k")
    p.add_argument("--out", required=True, help="output folder (also the checkpoint to --resume from)")
    p.add_argument("--samples", type=int, default=5, help="documents evaluated per candidate (default 5)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per forward chunk (default: evaluate's)")
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
    p.add_argument("--resume", action="store_true", help="continue the search in --out (start it if none)")
    p.add_argument("--force", action="store_true", help="replace a search in --out")
    p.set_defaults(func=cmd_search)


def search_config(args, saved: dict | None) -> S.SearchConfig:
    """The resumed search's config (or the defaults), with the options given on the command line."""
    base = dict(saved["config"]) if saved else {}
    base.update({name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name, None) is not None})
    known = {f.name for f in fields(S.SearchConfig)}
    return S.SearchConfig(**{k: v for k, v in base.items() if k in known}).validate()


def cmd_search(args) -> int:
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: must be at least 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size}: must be at least 1")
    S.check_out(args.out, args.resume, args.force)  # before the slow part
    import torch

    from .. import data, evaluate, report

    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    info = models.rope_info(model.config)
    space = S.SearchSpace(info.dim, info.base, info.original_length, args.target_length)
    saved = S.read_state(args.out) if args.resume and not args.force else None
    config = search_config(args, saved)
    # where the fitness comes from: a resumed search must measure the same thing
    identity = {"model": _where(args.model), "data": _where(args.data), "samples": args.samples}
    S.check_out(args.out, args.resume, args.force, space, config, identity)

    docs = data.load_tokenized(args.data, tokenizer, progress=True)
    try:
        chosen = data.select(docs, args.target_length, args.samples, seed=config.seed)
    except UsageError as exc:  # no document long enough
        raise UsageError(f"--data {args.data}: {exc}") from None
    if len(chosen) < args.samples:
        print(f"note: only {len(chosen)} of the documents have {args.target_length} tokens; searching on those")
    # the paper's protocol: the first L' tokens of each document
    windows = [torch.as_tensor(d.tokens[:args.target_length], dtype=torch.long).to(device) for d in chosen]
    fitness = S.model_fitness(model, windows, args.chunk_size or evaluate.DEFAULT_CHUNK)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.generations + 1, desc="search", unit="gen", disable=None, dynamic_ncols=True)

    def progress(stats: dict) -> None:
        bar.n = stats["generation"] + 1
        bar.set_postfix(best=f"{stats['best']:.4g}" if stats["best"] is not None else "inf", evals=stats["evals"])
        bar.refresh()

    extra = {"model": {"spec": args.model, **asdict(info)},
             "data": {"source": args.data, "documents": [d.id for d in chosen], "tokens": args.target_length},
             "environment": report.environment(device)}
    try:
        result = S.run(space, fitness, config, args.out, identity=identity, resume=args.resume, force=args.force,
                       on_generation=progress, extra_summary=extra)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted; every evaluation so far is kept: continue with the same command and --resume")
        return 130
    finally:
        bar.close()
    plot(os.path.join(args.out, S.PLOT), result, space)
    s = result.summary
    base = ", ".join(f"{k} {v:.4g}" for k, v in s["baselines"].items() if v is not None)
    print(f"best perplexity {result.fitness:.4g} (n_hat={space.n_hats[result.best.n_hat]}; {base}); "
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
