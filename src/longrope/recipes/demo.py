"""`longrope demo`: search and compare scalings on the bundled tiny model, on a laptop CPU in minutes (make demo).

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

import dataclasses
import functools
import time
from pathlib import Path

import torch

from .. import data, models, pipeline, report, runs
from .. import scaling as sc
from .. import search as S
from ..cli import add_command, add_progress_args, documents
from ..progress import Progress

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "bundled" / "tiny-llama-256"
SCALES = (2, 4, 8, 16)
EXPORT_SCALE = 8  # the scale whose searched model is exported
EXPORT_FOLDER, SEARCH_FOLDER = f"tiny-llama-{EXPORT_SCALE}x", "search-{}x"
METHODS = ("none", "linear", "ntk", "yarn", "longrope")
LABELS = {"none": "none", "linear": "PI", "ntk": "NTK", "yarn": "YaRN", "longrope": "LongRoPE (searched)"}
SEARCH_DOCS = 5  # the paper's default
SEARCH_POOL = 12  # psalms set aside for the search; the rest are for evaluation
EVAL_DOCS = 10
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_TRIALS = 2  # per (length, depth)
SEARCH = S.SearchConfig(population=24, mutations=8, crossovers=8, parents=12, generations=40)
# evaluations per scale: cheap short scales get more; sized for ~5 minutes on 2 CPU cores
BUDGET = {2: 120, 4: 120, 8: 96, 16: 60}


def search_scale(model, info, docs, scale: int, folder: Path, seed: int, new_bar) -> sc.LongRoPEScaling:
    """LongRoPE factors for `scale` × the model's context (the paper's search, BUDGET[scale] evaluations)."""
    target = scale * info.original_length
    space = S.SearchSpace(info.dim, info.base, info.original_length, target)
    config = dataclasses.replace(SEARCH, max_evals=BUDGET[scale], seed=seed)
    result = pipeline.search_on_documents(lambda: model, docs, target, space, config, folder, samples=SEARCH_DOCS,
                                          seed=seed, identity={"model": "bundled:tiny-llama-256",
                                                               "data": "bundled:search-pool"},
                                          what=f"search {scale}×", new_bar=new_bar)
    report.plot_search(folder / S.PLOT, result, space)
    print(f"  {scale:>2}× ({target} tokens): {report.search_summary(result, space)}")
    return result.scaling


def method_scalings(info, searched: dict[int, sc.LongRoPEScaling], length: int) -> dict[str, sc.Scaling]:
    """{label: scaling} at `length`: every method configured for that length (none at 1×)."""
    scale = length // info.original_length
    return {LABELS[m]: sc.NoScaling() if scale == 1 else searched[scale] if m == "longrope"
            else sc.make(m, info.original_length, length, dim=info.dim, base=info.base) for m in METHODS}


def run(args) -> int:
    out = Path(args.out)
    # searches resume from here after a crash or Ctrl-C; it takes the place of --out at the end
    work = runs.open_dir(out.with_name(out.name + ".partial"), resume=True, command="demo")
    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = models.load(args.model)
    info = models.rope_info(model.config)
    search_pool, eval_pool = data.split_bundled(documents(args.data, tokenizer, args.quiet), SEARCH_POOL, args.seed)
    print(f"model: {args.model} (context {info.original_length}); data: {len(search_pool)} search documents, "
          f"{len(eval_pool)} evaluation documents")
    new_bar = functools.partial(Progress, quiet=args.quiet, leave=False)
    print("searching LongRoPE factors:")
    searched = {scale: search_scale(model, info, search_pool, scale, work / SEARCH_FOLDER.format(scale), args.seed,
                                    new_bar) for scale in SCALES}
    print("evaluating none, PI, NTK, YaRN and LongRoPE at 1×, 2×, 4×, 8×, 16× ...")
    lengths = [scale * info.original_length for scale in (1,) + SCALES]
    ppl, passkey = pipeline.evaluate_lengths(model, tokenizer, eval_pool, lengths,
                                             functools.partial(method_scalings, info, searched),
                                             n_docs=EVAL_DOCS, depths=DEPTHS, trials=PASSKEY_TRIALS, seed=args.seed,
                                             new_bar=new_bar)
    models.attach(model, searched[EXPORT_SCALE])
    models.export(model, tokenizer, searched[EXPORT_SCALE], work / EXPORT_FOLDER, force=True)
    tables = report.write_demo_report(work, ppl, passkey, searched, info, seconds=time.time() - t0,
                                      eval_docs=EVAL_DOCS, depths=DEPTHS, trials=PASSKEY_TRIALS,
                                      search_folder=SEARCH_FOLDER.format, export_scale=EXPORT_SCALE,
                                      export_folder=EXPORT_FOLDER)
    runs.replace_dir(work, out)
    print(tables)
    print(f"done in {time.time() - t0:.0f} s; report: {out / 'report.md'}")
    return 0


def register(sub) -> None:
    p = add_command(sub, "demo", __doc__, run)
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="default: the bundled tiny model")
    p.add_argument("--data", default="bundled", help="documents (default: the bundled sample, split as above)")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--seed", type=int, default=0, help="searches, document split and choice (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_progress_args(p)
