"""`longrope demo` (what `make demo` runs): LongRoPE end to end on a laptop CPU in minutes.

The bundled tiny model (a 3.3M-parameter Llama trained at 256 tokens) is extended to 2×, 4×, 8×
and 16× its context with no fine-tuning: LongRoPE factors are searched on a few bundled documents,
then none, PI, NTK, YaRN and the searched LongRoPE are evaluated side by side on *other*
documents (perplexity and passkey), each method configured for the scale it is evaluated at.
Writes a report with plots and the exported 8× checkpoint to --out.

Search and evaluation data are kept apart: the psalms of the bundled sample are split by a seeded
shuffle into a search pool and an evaluation pool; the two Austen novels are evaluation-only.
Re-running with the same --out resumes: finished searches are reused.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "bundled" / "tiny-llama-256"
SCALES = (2, 4, 8, 16)
METHODS = ("none", "linear", "ntk", "yarn", "longrope")
LABELS = {"none": "none", "linear": "PI", "ntk": "NTK", "yarn": "YaRN", "longrope": "LongRoPE (searched)"}
SEARCH_DOCS = 5  # the paper's default
SEARCH_POOL = 12  # psalms set aside for the search; the rest are for evaluation
EVAL_DOCS = 10
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_TRIALS = 2  # per (length, depth)
# evaluations per scale: cheap short scales get more; sized for ~5 minutes on 2 CPU cores
BUDGET = {2: 120, 4: 120, 8: 96, 16: 60}


def split_documents(docs, seed: int = 0):
    """(search pool, evaluation pool): a seeded shuffle of the psalms; Austen is evaluation-only."""
    psalms = sorted((d for d in docs if d.id.startswith("tdavid/")), key=lambda d: d.id)
    random.Random(seed).shuffle(psalms)
    search = psalms[:SEARCH_POOL]
    held = set(d.id for d in search)
    return search, [d for d in docs if d.id not in held]


def search_scale(model, info, docs, scale: int, out: Path, device, seed: int, quiet: bool = False):
    import torch

    from .. import data
    from .. import search as S
    from ..progress import Progress

    target = scale * info.original_length
    chosen = data.select(docs, target, SEARCH_DOCS, seed=seed)
    windows = [torch.as_tensor(d.tokens[:target], dtype=torch.long, device=device) for d in chosen]
    space = S.SearchSpace(info.dim, info.base, info.original_length, target)
    config = S.SearchConfig(population=24, mutations=8, crossovers=8, parents=12, generations=40,
                            max_evals=BUDGET[scale], seed=seed)
    fitness = S.model_fitness(model, windows)
    identity = {"model": "bundled:tiny-llama-256", "data": "bundled:search-pool", "samples": SEARCH_DOCS}
    t0 = time.time()
    with Progress(S.planned_evals(config), f"search {scale}×", "evals", quiet=quiet, leave=False) as bar:
        result = S.run(space, fitness, config, out, identity=identity, resume=True,
                       extra_summary={"documents": [d.id for d in chosen]}, **S.progress_hooks(bar, config))
    from .search import plot

    plot(str(out / "search.png"), result, space)
    s = result.summary
    print(f"  {scale:>2}× ({target} tokens): best search perplexity {result.fitness:.3f} "
          f"(PI {s['baselines']['pi']:.3f}, NTK {s['baselines']['ntk']:.3f}, YaRN {s['baselines']['yarn']:.3f}); "
          f"{s['evals']} evaluations, {time.time() - t0:.0f} s")
    return result.scaling


def evaluate_all(model, tokenizer, info, docs, searched: dict, device, seed: int, quiet: bool = False):
    """Perplexity and passkey records for every (method, length), each method set for that length."""
    import torch

    from .. import data, evaluate, models
    from .. import scaling as sc
    from ..progress import Progress

    ppl, passkey = [], []
    rng = random.Random(seed)
    for scale in (1,) + SCALES:
        # one bar per length: a cell at 16× costs some 30 of those at 1×, so one bar would misjudge the
        # time left; a cell is one method's perplexity, or its passkey trials at one depth
        bar = Progress(len(METHODS) * (1 + len(DEPTHS)), f"evaluate {scale}×", "cells", quiet=quiet, leave=False)
        length = scale * info.original_length
        chosen = data.select(docs, length, EVAL_DOCS, seed=seed)
        windows = [torch.as_tensor(d.tokens[:length], dtype=torch.long, device=device) for d in chosen]
        keys = {depth: [evaluate.random_key(rng) for _ in range(PASSKEY_TRIALS)] for depth in DEPTHS}
        for method in METHODS:
            if scale == 1:
                scaling = sc.NoScaling()
            elif method == "longrope":
                scaling = searched[scale]
            else:
                scaling = sc.make(method, info.original_length, length, dim=info.dim, base=info.base)
            models.attach(model, scaling)
            value = evaluate.perplexity(model, windows)
            ppl.append({"method": LABELS[method], "length": length, "ppl": value,
                        "documents": [d.id for d in chosen], "scaling": scaling.to_dict()})
            bar.update()
            for depth in DEPTHS:
                trials = [evaluate.passkey_trial(model, tokenizer,
                                                 evaluate.passkey_prompt(tokenizer, length, depth, key))
                          for key in keys[depth]]
                passkey.append({"method": LABELS[method], "length": length, "depth": depth,
                                "n_correct": sum(t.correct for t in trials), "n_trials": len(trials),
                                "accuracy": evaluate.passkey_accuracy(trials),
                                "answers": [t.answer for t in trials]})
                bar.update()
        bar.close()
    return ppl, passkey


def write_report(out: Path, ppl, passkey, searched, info, seconds: float) -> str:
    from .. import report

    ppl_md, passkey_md = report.ppl_table(ppl), report.passkey_table(passkey)
    report.plot_ppl(ppl, out / "ppl.png")
    report.plot_passkey(passkey, out / "passkey.png")
    lines = [
        "# longrope demo report", "",
        f"Bundled tiny Llama (context {info.original_length}, rotary dim {info.dim}, base {info.base:g}) "
        f"extended without fine-tuning. Each method is configured for the scale it is evaluated at. "
        f"Perplexity: first L tokens of {EVAL_DOCS} evaluation documents the search never saw. "
        f"Passkey: {len(DEPTHS)} depths × {PASSKEY_TRIALS} keys per length. Total time {seconds:.0f} s.", "",
        "## Perplexity", "", ppl_md, "", "![perplexity](ppl.png)", "",
        "## Passkey accuracy", "", passkey_md, "", "![passkey](passkey.png)", "",
        "## Searched factors", "",
    ]
    for scale, scaling in searched.items():
        lines += [f"- {scale}×: n̂ = {scaling.n_hat}, λ from {scaling.long_factor[0]:.2f} to "
                  f"{scaling.long_factor[-1]:.2f}; search log and plot in `search-{scale}x/`"]
    lines += ["", "The 8× model is exported as a Hugging Face checkpoint in `tiny-llama-8x/`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"ppl": ppl, "passkey": passkey,
                                                  "environment": report.environment("cpu")}, indent=1))
    return ppl_md + "\n\n" + passkey_md


def run(args) -> int:
    import torch

    from .. import data, models, runs

    out = Path(args.out)
    # searches resume from here after a crash or Ctrl-C; it takes the place of --out at the end
    work = runs.open_dir(out.with_name(out.name + ".partial"), resume=True, command="demo")
    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = models.load(args.model)
    info = models.rope_info(model.config)
    docs = data.load_tokenized(args.data, tokenizer, progress=not args.quiet)
    search_pool, eval_pool = split_documents(docs, args.seed)
    print(f"model: {args.model} (context {info.original_length}); data: {len(search_pool)} search documents, "
          f"{len(eval_pool)} evaluation documents")
    print("searching LongRoPE factors:")
    searched = {scale: search_scale(model, info, search_pool, scale, work / f"search-{scale}x", "cpu", args.seed,
                                    quiet=args.quiet)
                for scale in SCALES}
    print("evaluating none, PI, NTK, YaRN and LongRoPE at 1×, 2×, 4×, 8×, 16× ...")
    ppl, passkey = evaluate_all(model, tokenizer, info, eval_pool, searched, "cpu", args.seed, quiet=args.quiet)
    models.attach(model, searched[8])
    models.export(model, tokenizer, searched[8], work / "tiny-llama-8x", force=True)
    tables = write_report(work, ppl, passkey, searched, info, time.time() - t0)
    runs.replace_dir(work, out)
    print(tables)
    print(f"done in {time.time() - t0:.0f} s; report: {out / 'report.md'}")
    return 0


def register(sub) -> None:
    from ..cli import add_progress_args

    p = sub.add_parser("demo", help="search and compare scalings on the bundled tiny model (make demo)")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="default: the bundled tiny model")
    p.add_argument("--data", default="bundled")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_progress_args(p)
    p.set_defaults(func=run)
