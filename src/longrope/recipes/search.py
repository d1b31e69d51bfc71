"""`longrope search`: search LongRoPE rescale factors (evolutionary, resumable).

Search per-frequency rescale factors (and n̂) that minimise the perplexity of the model on
--samples documents cut to --target-length tokens (the first L' tokens of each, as the paper), or
a weighted --fitness of that, LongRoPE2's needle-driven perplexity and the short-context term.

What is returned is judged on --validation-samples other documents (seeded, disjoint from the
fitness ones): each generation's fittest, the seeds and the --validate-top fittest are scored there
and the best is returned; PI, NTK, YaRN and YaRN-shaped LongRoPE under each temperature are scored
too, and returned if nothing searched beats them. summary.json states every score and the gain.

Writes into --out: scaling.json (use with --scaling, `longrope eval`, `longrope export`), best_reference.json
(the best of the references: report it beside scaling.json),
history.jsonl (every evaluated candidate), summary.json (evals, time, overhead, baselines),
search.png, and search_state.json (checkpoint, rewritten after every generation).
A killed search continues with --resume and ends exactly as an uninterrupted one would;
--resume with a larger --generations / --max-evals extends a finished search.

LongRoPE2's options (--fitness needle, --algorithm critical-dim, --search-attention) are below;
--init starts from earlier searched factors, as the paper extends 128k -> 256k without fine-tuning.
--readjust S searches only the short factors of the LongRoPE scaling S (file or preset) at the
model's own context (LongRoPE §3.3), its long factors, n̂ and attention factor kept: scaling.json is
S with them, never worse on validation than all-ones or S's own short factors (the references).
On several GPUs: torchrun --nproc-per-node N -m longrope search ... (same result as one process).
"""
# a thin recipe over longrope.search: options, the model and documents, progress, the plot and the
# closing lines; state, outputs and the several-process handshake are the search package's

from __future__ import annotations

import os
from dataclasses import asdict

from .. import data, report, runs
from .. import scaling as sc
from .. import search as S
from ..cli import (add_command, add_config_options, add_model_args, add_progress_args, config_values,
                   device_and_dtype_names, documents, interrupted, load_model, parse_length)
from ..errors import UsageError
from ..pipeline import READJUST_ATTENTION
from ..progress import Progress


def register(sub) -> None:
    p = add_command(sub, "search", __doc__, run)
    add_model_args(p)
    add_progress_args(p)
    p.add_argument("--data", default="bundled", help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or "
                                                     "'bundled' (default)")
    p.add_argument("--target-length", type=parse_length, default=None,
                   help="context to extend to, e.g. 64k (required, but with --readjust)")
    p.add_argument("--out", required=True, help="output folder (also the checkpoint to --resume from)")
    p.add_argument("--samples", type=int, default=5, help="documents evaluated per candidate (default 5)")
    p.add_argument("--validation-samples", type=int, default=None, metavar="V",
                   help="other documents that judge what is returned (default: as many as --samples; 0: none, "
                        "the fittest is returned)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per forward chunk (default: evaluate's)")
    p.add_argument("--batch-candidates", type=int, default=1, metavar="K",
                   help="evaluate K candidates in one batched forward (K × --samples sequences, each with its "
                        "own scaling): faster for small models, memory permitting; same result (default 1)")
    # an option left out keeps the default, or the resumed search's value
    add_config_options(p.add_argument_group("search (defaults: the paper's)"), S.SearchConfig)
    v = p.add_argument_group("LongRoPE2 (default: the original LongRoPE search; --resume keeps the search's choice)")
    v.add_argument("--fitness", default=None, metavar="TERMS",
                   help="ppl: perplexity of the windows (default); needle: perplexity of the answer tokens of "
                        "passkey needles at depths 0.1..0.9 of the documents (LongRoPE2); short: perplexity at the "
                        "model's original length with the long factors (what vLLM serves short prompts); or "
                        "weighted, e.g. ppl=1,needle=1,short=0.5: the weighted geometric mean of the perplexities")
    v.add_argument("--algorithm", choices=S.ALGORITHMS, default=None,
                   help="evolution: every factor searched in [1, 1.25·s] (default); critical-dim: NTK below a "
                        "searched critical dimension, factors in [s, 2s] from it")
    v.add_argument("--search-attention", action="store_true", default=None,
                   help="search the attention factor (1.00..1.50) instead of using 'su'")
    v.add_argument("--keep-angles-seen", action="store_true", default=None,
                   help="with --algorithm evolution: the frequency pairs that never turned fully in pretraining "
                        "(past the critical dimension) are searched in [s, 1.25·s] only, so none meets an angle "
                        "pretraining never showed within the target length (`finetune --keep-angles-seen`)")
    p.add_argument("--init", default=None, metavar="S.json,...",
                   help="searched LongRoPE scalings (files or presets) to start from: their factors, as they are and "
                        "carried to --target-length, join PI, NTK and YaRN in the initial population (--resume keeps "
                        "the search's)")
    r = p.add_argument_group("short-context readjustment (LongRoPE §3.3; --resume keeps the search's choices)")
    r.add_argument("--readjust", default=None, metavar="S",
                   help="a LongRoPE scaling (file or preset): search only its short factors, at the model's own "
                        "context (so no --target-length), its long factors, n̂ and attention factor kept; "
                        "scaling.json is S with the searched short factors")
    r.add_argument("--readjust-attention", choices=READJUST_ATTENTION, default=None,
                   help="attention factor of short inputs: keep (default): S's, the one factor that plain "
                        "transformers, vLLM and llama.cpp apply to short inputs too; one: the model's own "
                        "temperature 1 (short_attention_factor), which only longrope's own runtime applies")
    r.add_argument("--readjust-cap", type=float, default=None, metavar="CAP",
                   help=f"largest searched short factor (default {S.SHORT_CAP})")
    p.add_argument("--resume", action="store_true", help="continue the search in --out (start it if none)")
    p.add_argument("--force", action="store_true", help="replace a search in --out")


def run(args) -> int:
    rank = S.init_distributed()  # None: one process; `cli.main` leaves the process group at the end
    args.device = S.rank_device(args.device, rank)
    return S.search_on_ranks(rank, lambda: _setup(args, rank), lambda setup: _search(args, setup),
                             lambda setup: {"windows": setup["windows"], "weights": setup["weights"]},
                             lambda: load_model(args)[0], args.chunk_size)


def _setup(args, rank: S.Rank | None) -> dict:
    """Rank 0 (or the one process): check the options, load the model, choose the samples."""
    for option in ("samples", "chunk_size", "batch_candidates"):
        if (value := getattr(args, option)) is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} {value}: must be at least 1")
    if args.validation_samples is not None and args.validation_samples < 0:
        raise UsageError(f"--validation-samples {args.validation_samples}: must be 0 or more")
    try:
        weights = S.parse_fitness(args.fitness) if args.fitness else None
    except ValueError as exc:
        raise UsageError(f"--fitness {exc}") from None
    if args.batch_candidates > 1 and rank is not None:
        raise UsageError("--batch-candidates: not supported under torchrun yet (use one process, or 1)")
    saved = S.check_out(args.out, args.resume, args.force)  # before the slow part; the state to resume
    # the options given, else the resumed search's, else the defaults
    ident = (saved or {}).get("identity", {})
    readjusting = args.readjust is not None or ident.get("algorithm") == S.ShortFactorSpace.algorithm
    _check_options(args, readjusting, weights)
    model, tokenizer, info = load_model(args)
    length, readjusted = args.target_length, None  # the fitness windows' length; --readjust's scaling
    if readjusting:
        if args.target_length not in (None, info.original_length):
            raise UsageError(f"--target-length {args.target_length}: a readjustment searches the short factors at "
                             f"the model's own context, {info.original_length} tokens; drop --target-length")
        length = info.original_length
        attention = args.readjust_attention or ident.get("readjust_attention", "keep")  # keep: what every runtime does
        readjusted = _readjusted(args.readjust, attention, info) if args.readjust else None
    weights = weights or S.parse_fitness(ident.get("fitness", "ppl"))
    kind = S.fitness_name(weights)
    # None: as many as --samples where the documents allow (`_split`); a resumed search keeps its own
    n_valid = args.validation_samples if args.validation_samples is not None else ident.get(
        "validation_samples", 0 if saved else None)
    seeds = S.init_seeds(args.init, info.dim, info.original_length, length) if args.init else None
    space = S.resumed_space(info.dim, info.base, info.original_length, length, ident, args.algorithm,
                            args.search_attention, seeds, readjusted, args.readjust_cap, args.keep_angles_seen)
    config = S.SearchConfig.resumed(saved, **config_values(args, S.SearchConfig))
    # where the fitness comes from: a resumed search must measure the same thing
    identity = {"model": runs.input_identity(args.model), "data": runs.input_identity(args.data),
                "samples": args.samples}
    if kind != "ppl":
        identity["fitness"] = kind
    if n_valid:
        identity["validation_samples"] = n_valid
    if readjusting:
        identity["readjust_attention"] = attention
    S.check_out(args.out, args.resume, args.force, space, config, identity)  # before tokenising
    docs = documents(args.data, tokenizer, quiet=args.quiet)
    chosen, held = _split(args, docs, length, n_valid, config.seed)
    if held:
        identity["validation_samples"] = len(held)  # what "as many as there are" came to

    def windows_of(docs_):
        try:
            return {term: S.fitness_windows(term, [d.tokens for d in docs_], tokenizer, length,
                                            config.seed, info.original_length) for term in weights}
        except ValueError as exc:  # a target length too short for the needle
            raise UsageError(f"--fitness needle: {exc}") from None

    return dict(model=model, info=info, space=space, config=config, identity=identity, kind=kind, weights=weights,
                length=length, chosen=chosen, held=held, windows=windows_of(chosen),
                validation=windows_of(held) if held else None, world=rank.world if rank else 1)


def _check_options(args, readjusting: bool, weights: dict | None) -> None:
    """What a short-context readjustment excludes, and what only it takes (one line each)."""
    if not readjusting:
        if args.target_length is None:
            raise UsageError("--target-length: required (the context to extend to, e.g. 64k), unless --readjust")
        for option in ("readjust_attention", "readjust_cap"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')}: only with --readjust S")
        return
    given = {"init": args.init is not None, "algorithm": args.algorithm is not None,
             "search-attention": bool(args.search_attention),
             "fitness": weights is not None and set(weights) != {"ppl"}}
    option = next((o for o, there in given.items() if there), None)
    if option:
        raise UsageError(f"--{option}: not with --readjust, which searches only the short factors, by perplexity "
                         "at the model's own context; drop it")


def _readjusted(spec: str, attention: str, info) -> sc.LongRoPEScaling:
    """--readjust S: the LongRoPE scaling whose short factors are searched, for this model, with
    short inputs at the attention factor `attention` says (--readjust-attention)."""
    scaling = S.load_longrope("--readjust", spec, info.dim, info.original_length,
                              "a LongRoPE one (long and short factors)")
    # one: inside the original window the model's own temperature, as `longrope extend` readjusts
    return scaling.replace(short_attention_factor=1.0) if attention == "one" else scaling


def _split(args, docs, length: int, n_valid: int | None, seed: int) -> tuple[list, list]:
    """The fitness documents and, disjoint from them, the validation documents: `n_valid` of them
    (refused if there are not that many), or with None as many as --samples where there are, each
    of at least `length` tokens. Seeded, and taken in turn from the data's sources (the id up to
    its first "/"), so that neither set is all of one kind when the data holds several."""
    want = args.samples if n_valid is None else n_valid
    try:  # each set mixes the data's sources (prose and code) where it holds several
        picked = data.interleave_sources(data.select(docs, length, len(docs), seed=seed))[:args.samples + want]
    except UsageError as exc:  # no document long enough
        raise UsageError(f"--data {args.data}: {exc}") from None
    if n_valid and len(picked) < args.samples + n_valid:
        raise UsageError(f"--data {args.data}: {len(picked)} documents have {length} tokens, not the "
                         f"{args.samples} + {n_valid} that --samples and --validation-samples take (disjoint); "
                         "lower them, or --validation-samples 0")
    chosen, held = picked[:args.samples], picked[args.samples:]
    if len(chosen) < args.samples:
        print(f"note: only {len(chosen)} of the documents have {length} tokens; searching on those")
    if n_valid is None and len(held) < args.samples:
        print(f"note: {len(held) or 'no'} other documents of {length} tokens for validation"
              + ("; the fittest is returned" if not held else ""))
    return chosen, held


def _search(args, setup: dict) -> int:
    model, space, config, kind, world = (setup[k] for k in ("model", "space", "config", "kind", "world"))
    if isinstance(space, S.CriticalDimSpace):
        print(f"critical dimension: theoretical d_tcd = {space.critical_dim} of {space.dim} "
              f"({space.critical_dim // 2} frequency pairs follow NTK in its seed)")
    if isinstance(space, S.ShortFactorSpace):
        print(f"readjusting the short factors (in [1, {space.cap:g}]) at {space.original_length} tokens; long "
              f"factors, n_hat and attention factor kept (short inputs' {space.long.attention_factor(1):.4g})")
    if world > 1:
        print(f"evaluating on {world} ranks")
    weights = setup["weights"]
    extra = {"model": {"spec": args.model, **asdict(setup["info"])},
             "data": {"source": args.data, "documents": [d.id for d in setup["chosen"]],
                      "validation_documents": [d.id for d in setup["held"]],
                      "tokens": setup["length"], "fitness": kind, "weights": weights},
             "environment": {**runs.environment(device_and_dtype_names(args)[0]), "ranks": world}}
    if args.batch_candidates > 1:
        extra["environment"]["batch_candidates"] = args.batch_candidates
    # progress in evaluations (initial population included), to the end --max-evals sets
    bar = Progress(S.planned_evals(config), "search", "evals", quiet=args.quiet)
    # the validation documents are scored by this process alone (a few candidates per generation)
    validation = (S.term_evaluator(model, setup["validation"], weights, args.chunk_size, args.batch_candidates)
                  if setup["validation"] else None)
    kwargs = dict(identity=setup["identity"], resume=args.resume, force=args.force, extra_summary=extra,
                  validation=validation, references=space.reference_scalings(), **S.progress_hooks(bar, config))
    try:
        with bar:
            if args.batch_candidates > 1:  # one process (checked in _setup)
                evaluator = S.term_evaluator(model, setup["windows"], weights, args.chunk_size, args.batch_candidates)
                result = S.run(space, None, config, args.out, evaluator=evaluator, **kwargs)
            else:
                fitness = S.term_fitness(model, setup["windows"], weights, args.chunk_size)
                result = S.run_distributed(space, fitness, config, args.out, **kwargs)
    except KeyboardInterrupt:
        return interrupted("every evaluation so far is kept: continue with the same command and --resume")
    if not report.plot_search(os.path.join(args.out, S.PLOT), result, space):
        print("note: matplotlib is not installed, no search.png (pip install matplotlib)")
    print(report.search_summary(result, space, kind))
    print(f"wrote {args.out}")
    return 0
