"""`longrope eval ppl`, `longrope eval passkey` and `longrope eval ruler`: thin recipes over data,
evaluate and report."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .. import data, evaluate, models, report, runs
from .. import scaling as sc
from ..cli import (add_mismatch_arg, add_model_args, add_progress_args, device_and_dtype, device_and_dtype_names,
                   parse_length, parse_lengths)
from ..errors import UsageError
from ..progress import Counter, Progress

METHOD_HELP = """\
Methods, all on the same documents / prompts: --method M (none, linear, ntk, dynamic, yarn, llama3,
longrope, or model: the scaling the model carries, the default when it has one), --scaling S.json
(a file or preset, used as is) or --compare A,B,... (several of either). With --target-length N
every method is configured for N tokens; without it, for the length it is evaluated at."""


def parse_depths(text: str) -> list[float]:
    try:
        values = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of depths: {text!r} (use e.g. 0,0.25,0.5,0.75,1)") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return sorted(dict.fromkeys(values))


def parse_tasks(text: str) -> list[str]:
    """'niah_single,vt' -> RULER task names, in RULER's order (a run's identity does not depend on
    how they were listed)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [t for t in names if t not in evaluate.RULER_TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown RULER task {(unknown or [text])[0]!r}; the tasks are "
                                         f"{','.join(evaluate.RULER_TASKS)}")
    return [t for t in evaluate.RULER_TASKS if t in names]


def _add_common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_progress_args(p)
    p.add_argument("--lengths", type=parse_lengths, required=True, help="comma-separated, e.g. 8k,16k,32k")
    p.add_argument("--method", help="one scaling method (none, linear, ntk, dynamic, yarn, llama3, longrope) "
                                    "or model (its own; the default when it has one)")
    p.add_argument("--scaling", help="scaling JSON file or preset name, used as is")
    p.add_argument("--compare", help="comma-separated methods and/or scaling files, e.g. none,linear,ntk,yarn,S.json")
    p.add_argument("--target-length", type=parse_length,
                   help="configure every method for this context (default: the length evaluated, see above)")
    add_mismatch_arg(p)
    p.add_argument("--seed", type=int, default=0, help="document selection / passkey keys (default 0)")
    p.add_argument("--out", help="folder for results.json, results.csv, table.md and plots (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _setup(args, within_reach: bool = False):
    """The model and the methods at every length, checked before any evaluation (the output
    folder was checked by the CLI before this); `within_reach`: every length must be one the
    method's scaling reaches (`models.reach`), unless --allow-context-mismatch."""
    if getattr(args, "chunk_size", None) is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size}: must be at least 1")
    default = "model" if models.is_extended(args.model) else "none"  # a model is evaluated as it is configured
    entries = evaluate.method_entries(args.compare, args.scaling, args.method, args.target_length, default)
    device, dtype = device_and_dtype(args)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    info = models.rope_info(model.config)
    specs = evaluate.method_specs(entries, args.model, info, args.allow_context_mismatch)
    for spec in specs:
        for length in args.lengths:
            models.check_fits(evaluate.scaling_at(spec, length, info, args.target_length), info,
                              args.allow_context_mismatch, length if within_reach else None)
    return model, tokenizer, info, specs, device


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _finish(args, command: str, model, info, device, records: list[dict], in_place: bool = False,
            **extra) -> int:
    """Detach the scalings, print the table, write --out (`in_place`: into the folder the command
    has written as it went): the end of every eval command."""
    models.attach(model, sc.NoScaling())
    results = {"command": command, "config": _config(args), "model": asdict(info) | {"spec": args.model},
               "environment": report.environment(device), **extra, "records": records}
    print(report.table(results))
    if args.out:
        out = report.write_results(args.out, results, force=args.force, in_place=in_place)
        print(f"wrote {out}")
    return 0


def cmd_ppl(args) -> int:
    if args.docs < 1:
        raise UsageError(f"--docs {args.docs}: must be at least 1")
    if args.mode == "sliding" and args.stride is not None and args.stride > min(args.lengths):
        raise UsageError(f"--stride {args.stride}: must not exceed the shortest length {min(args.lengths)}")
    model, tokenizer, info, specs, device = _setup(args)
    docs = data.load_tokenized(args.data, tokenizer, progress=Counter("tokenising", "docs", quiet=args.quiet))
    chosen = {n: data.select(docs, n, args.docs, args.seed) for n in args.lengths}  # errors before work
    cells = sum(len(c) for c in chosen.values()) * len(specs) * (2 if args.stock else 1)  # document × method
    with Progress(cells, "perplexity", "cells", quiet=args.quiet) as bar:
        records = evaluate.perplexity_records(
            model, info, chosen, specs, target_length=args.target_length, mode=args.mode, stride=args.stride,
            max_tokens=args.max_tokens, chunk_size=args.chunk_size, stock=args.stock,
            allow_context_mismatch=args.allow_context_mismatch, device=device, tick=bar.update)
    return _finish(args, "ppl", model, info, device, records)


def cmd_passkey(args) -> int:
    if args.trials < 1:
        raise UsageError(f"--trials {args.trials}: must be at least 1")
    if args.haystack == "data" and not args.data:
        raise UsageError("--haystack data needs --data (a file, folder or 'bundled')")
    texts = data.read_documents(args.data) if args.haystack == "data" else None
    model, tokenizer, info, specs, device = _setup(args)
    # prompts first (they do not depend on the method): every method sees the same ones
    cells = len(args.lengths) * len(args.depths) * args.trials
    with Progress(cells, "passkey prompts", "prompts", quiet=args.quiet) as bar:
        prompts = evaluate.passkey_prompts(tokenizer, args.lengths, args.depths, args.trials, args.seed, texts,
                                           tick=bar.update)
    with Progress(cells * len(specs), "passkey", "trials", quiet=args.quiet) as bar:
        records = evaluate.passkey_records(
            model, tokenizer, info, prompts, specs, haystack=args.haystack, target_length=args.target_length,
            max_new_tokens=args.max_new_tokens, allow_context_mismatch=args.allow_context_mismatch,
            device=device, tick=bar.update)
    return _finish(args, "passkey", model, info, device, records)


def cmd_ruler(args) -> int:
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.wording == "passkey" and args.tasks != ["niah_single"]:
        raise UsageError("--wording passkey has one needle and no key to ask for: it is for --tasks niah_single")
    if args.haystack == "essay" and not args.data:
        raise UsageError("--haystack essay needs --data (real text: a file, folder or 'bundled')")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    if args.out:  # the CLI let an existing folder through for --resume; refuse it now if that was not asked
        runs.check_out(args.out, force=args.force, resume=args.resume, resumable=True)
    essay = "\n\n".join(d.text for d in data.read_documents(args.data)) if args.haystack == "essay" else None
    model, tokenizer, info, specs, device = _setup(args, within_reach=True)
    if args.chat and not evaluate.has_chat_template(tokenizer):
        raise UsageError("--chat: the tokenizer has no chat template")
    prompts = evaluate.Prompts(tokenizer, args.seed, args.haystack, essay, args.wording, args.chat)
    cells = evaluate.ruler_cells(args.tasks, args.lengths, args.depths, args.samples)
    with Progress(len(args.tasks) * len(args.lengths), "ruler prompts", "prompts", quiet=args.quiet) as bar:
        made = evaluate.first_samples(prompts, cells, tick=bar.update)  # refuses what cannot be made
    scalings = [{"method": spec.label, "length": length,
                 "scaling": evaluate.scaling_at(spec, length, info, args.target_length).to_dict()}
                for spec in specs for length in args.lengths]
    done = {}
    if args.out:
        # what makes the run this run: --resume continues only the same one
        identity = {"model": runs.input_identity(args.model), "dtype": device_and_dtype_names(args)[1],
                    "tasks": args.tasks, "lengths": args.lengths, "depths": args.depths, "samples": args.samples,
                    "seed": args.seed, "methods": scalings, "chat": args.chat, "haystack": args.haystack,
                    "wording": args.wording, "max_new_tokens": args.max_new_tokens,
                    "data": data.source_digest(args.data) if essay is not None else None}
        done = evaluate.open_run(args.out, identity, resume=args.resume, force=args.force)
    finished = sum(evaluate.cell_key(spec.label, cell) in done for cell in cells for spec in specs)
    with Progress(len(cells) * len(specs), "ruler", "cells", quiet=args.quiet) as bar, \
            evaluate.CellLog(args.out) as log:
        bar.skip(finished)
        records = evaluate.ruler_records(
            model, tokenizer, info, specs, cells, prompts, made=made, done=done, target_length=args.target_length,
            max_new_tokens=args.max_new_tokens, allow_context_mismatch=args.allow_context_mismatch, device=device,
            on_record=log, tick=bar.update)
    return _finish(args, "ruler", model, info, device, records, in_place=True, scalings=scalings)


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure long-context quality: perplexity, passkey retrieval, RULER tasks")
    evals = p.add_subparsers(dest="eval_command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    ppl = evals.add_parser("ppl", help="perplexity of long documents at several lengths", formatter_class=fmt,
                           description="Token-weighted perplexity over --docs documents at each length.\n\n"
                                       "Modes: truncate scores the first L tokens of each document (one window, "
                                       "LongRoPE's search protocol);\nsliding moves a window of L tokens by "
                                       "--stride over the document, scoring only new tokens.\n\n" + METHOD_HELP)
    _add_common(ppl)
    ppl.add_argument("--data", required=True, help="a .txt/.md file, a folder of them, .jsonl(.gz), .parquet or 'bundled'")
    ppl.add_argument("--docs", type=int, default=10, help="documents per length (default 10)")
    ppl.add_argument("--mode", choices=["truncate", "sliding"], default="truncate")
    ppl.add_argument("--stride", type=parse_length, help="sliding mode: new tokens scored per window (default and at most: length-1)")
    ppl.add_argument("--max-tokens", type=parse_length, help="sliding mode: score at most this many tokens per document")
    ppl.add_argument("--chunk-size", type=int, default=None,
                     help="positions per chunk of the lean forward and of lm_head + loss (default: the lean "
                          "forward sizes its chunks to the model, at least 4096; lm_head + loss take 4096)")
    ppl.add_argument("--stock", action="store_true",
                     help="also evaluate the plain transformers way (model(ids, labels=ids)) for comparison")
    ppl.set_defaults(func=cmd_ppl)

    pk = evals.add_parser("passkey", help="passkey retrieval accuracy at several lengths and depths",
                          formatter_class=fmt,
                          description="Hide 'The pass key is K. Remember it. K is the pass key.' at each depth of a "
                                      "haystack\n(the standard filler or real text from --data), ask for it, decode "
                                      "greedily, score the 5 digits.\n\n" + METHOD_HELP)
    _add_common(pk)
    pk.add_argument("--depths", type=parse_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=int, default=5, help="random keys per (length, depth) (default 5)")
    pk.add_argument("--haystack", choices=["filler", "data"], default="filler")
    pk.add_argument("--data", help="text for --haystack data")
    pk.add_argument("--max-new-tokens", type=int, default=10, help="tokens decoded after the question (default 10)")
    pk.set_defaults(func=cmd_passkey)

    ru = evals.add_parser("ruler", help="RULER-style tasks (needles, variable tracking, word counts) by length",
                          formatter_class=fmt,
                          description="RULER's synthetic tasks (Hsieh et al. 2024), generated offline: needle in a "
                                      "haystack (single,\nmultikey, multivalue, multiquery), variable tracking (vt), "
                                      "common and frequent words\nextraction (cwe, fwe). Each prompt is decoded "
                                      "greedily and scored as RULER scores it: the share\nof the expected strings "
                                      "in the output. Per-task and average scores by method and length;\na depth × "
                                      "length heatmap of the NIAH tasks.\n\nWith --out every finished cell is "
                                      "logged there as it finishes: a killed run continues with\nthe same command "
                                      "and --resume. A method must reach each length (none: the model's context),\n"
                                      "unless --allow-context-mismatch.\n\n" + METHOD_HELP)
    _add_common(ru)
    ru.add_argument("--tasks", type=parse_tasks, default=list(evaluate.RULER_TASKS),
                    help=f"comma-separated RULER tasks (default all: {','.join(evaluate.RULER_TASKS)})")
    ru.add_argument("--depths", type=parse_depths, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="depths in [0, 1] of the (first) needle, for niah_* and vt; cwe and fwe have none "
                         "(default 0.1,0.3,0.5,0.7,0.9)")
    ru.add_argument("--samples", type=int, default=5, help="samples per (task, length, depth) (default 5)")
    ru.add_argument("--haystack", choices=evaluate.NIAH_HAYSTACKS, default="filler",
                    help="the niah tasks' haystack: filler sentences, an essay (real text from --data, never "
                         "repeated) or word-like noise (default filler)")
    ru.add_argument("--data", help="text for --haystack essay")
    ru.add_argument("--wording", choices=evaluate.NIAH_WORDINGS, default="ruler",
                    help="niah_single's wording: RULER's, or passkey (longrope.passkey's, a 5-digit number; "
                         "compact enough for a model of 256 tokens such as the bundled one) (default ruler)")
    ru.add_argument("--chat", action="store_true",
                    help="put each prompt in the tokenizer's chat template as the user's message, the answer "
                         "prefix opening the reply (default: plain text)")
    ru.add_argument("--max-new-tokens", type=int,
                    help="tokens decoded per prompt (default RULER's per task: niah 128, vt 30, cwe 120, fwe 50)")
    ru.add_argument("--resume", action="store_true", help="continue the run logged in --out")
    ru.set_defaults(func=cmd_ruler)
