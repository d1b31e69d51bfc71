"""`longrope extend`: progressive context extension (search, fine-tune, search ...), short-context
readjustment, export and report, resumable stage by stage."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

from transformers import AutoTokenizer

from .. import data, distributed, models, pipeline, report, train
from ..cli import add_model_args, add_progress_args, device_and_dtype, parse_length
from ..errors import UsageError
from ..progress import Counter, Progress, step_callback
from ..search import SHORT_CAP, SearchConfig

DESCRIPTION = """\
Extend --model's context to --target-length following a plan of stages (LongRoPE §3.3), e.g.

    --stages search:64k,finetune:64k,search:256k,search:2048k

search:L searches LongRoPE factors for L tokens on the current model (seeded with PI, NTK, YaRN
and the previous stage's factors, carried to the new scale; search:L:EVALS caps its evaluations);
finetune:L[:STEPS] fine-tunes the current model at L tokens with the current scaling, and later
stages use the fine-tuned model.
Then short_factor is readjusted at the model's original context (factors in [1, --readjust-cap],
long_factor kept; never worse than all-ones there on the search documents), the checkpoint is
exported to OUT/model and OUT/report.md gives perplexity and passkey accuracy at a few lengths.

Each stage writes OUT/stage-NN-KIND-LENGTH/ and its stage.json last; re-run with --resume to skip
finished stages and continue an interrupted one. Default plan: search:TARGET.
"""


def _lengths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(parse_length(t) for t in text.split(",") if t.strip())
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--report-lengths: {exc}") from None
    if not values:
        raise UsageError("--report-lengths: give a comma-separated list, e.g. 4k,16k,64k")
    return values


def register(sub) -> None:
    p = sub.add_parser("extend", help="progressive extension: search / fine-tune stages, readjust, export, report",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_progress_args(p)
    p.add_argument("--data", default="bundled", help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or 'bundled'")
    p.add_argument("--eval-data", default=None, help="documents for the final report, kept apart from --data "
                                                     "(default: --data, which the report then says)")
    p.add_argument("--target-length", type=parse_length, required=True, help="context to extend to, e.g. 2048k")
    p.add_argument("--stages", default=None, help="the plan, e.g. search:64k,finetune:64k,search:256k,search:2048k "
                                                   "(default: search:TARGET)")
    p.add_argument("--out", required=True, help="output folder (also what --resume continues)")
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    p.add_argument("--max-stages", type=int, default=None,
                   help="run at most N stages now and stop cleanly (for time-limited jobs); --resume continues")
    p.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    p.add_argument("--seed", type=int, default=0, help="searches, document choice, training order")
    d = SearchConfig()
    g = p.add_argument_group("search stages (defaults: the paper's)")
    g.add_argument("--samples", type=int, default=5, help="documents per search (default 5)")
    g.add_argument("--population", type=int, default=d.population)
    g.add_argument("--mutations", type=int, default=d.mutations)
    g.add_argument("--crossovers", type=int, default=d.crossovers)
    g.add_argument("--parents", type=int, default=d.parents)
    g.add_argument("--generations", type=int, default=d.generations)
    g.add_argument("--max-evals", type=int, default=None, help="evaluations per search at most")
    g.add_argument("--chunk-size", type=int, default=None, help="tokens per forward chunk in evaluation")
    f = p.add_argument_group("fine-tuning stages")
    f.add_argument("--finetune-steps", type=int, default=400, help="steps of a finetune:L stage (default 400)")
    f.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    f.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 20, at most 10%% of the steps)")
    f.add_argument("--batch-size", type=int, default=1)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--checkpoint-every", type=int, default=50)
    r = p.add_argument_group("readjustment and report")
    r.add_argument("--no-readjust", action="store_true", help="skip the short-context readjustment")
    r.add_argument("--readjust-cap", type=float, default=SHORT_CAP,
                   help=f"largest searched short factor (default {SHORT_CAP})")
    r.add_argument("--readjust-evals", type=int, default=None, help="evaluations of the readjustment search at most")
    r.add_argument("--readjust-attention", choices=("one", "keep"), default="one",
                   help="short-regime attention factor: one (default: the model's own inside its window; "
                        "exported as short_mscale, which vLLM and longrope.load apply and plain transformers "
                        "ignores for Llama/Phi-3) or keep (the long factor at every length)")
    r.add_argument("--report-lengths", default=None,
                   help="lengths of the final report, e.g. 4k,16k,64k (default: the original context doubling to "
                        "the target, at most 6)")
    r.add_argument("--report-docs", type=int, default=3, help="documents per length in the report")
    r.add_argument("--passkey-trials", type=int, default=1, help="keys per length and depth (depths 0, 0.5, 1)")
    p.set_defaults(func=cmd_extend)


def cmd_extend(args) -> int:
    quiet = distributed.launched_rank() != 0  # under torchrun only rank 0 reports
    show = not (quiet or args.quiet)  # progress
    stages = pipeline.parse_stages(args.stages) if args.stages else (pipeline.Stage("search", args.target_length),)
    if args.resume and args.force:
        raise UsageError("--resume and --force contradict each other: --force starts over")
    info = models.rope_info(models.load_config(args.model))
    pipeline.check_plan(stages, info.original_length, args.target_length)  # before the slow part
    device, dtype = device_and_dtype(args)
    search = SearchConfig(population=args.population, mutations=args.mutations, crossovers=args.crossovers,
                          parents=args.parents, generations=args.generations, max_evals=args.max_evals,
                          seed=args.seed).validate()
    readjust_search = dataclasses.replace(search, max_evals=args.readjust_evals) if args.readjust_evals else None
    on_gpu = str(device).startswith("cuda")
    finetune = train.FinetuneConfig(seq_len=2, steps=args.finetune_steps, lr=args.lr, warmup=args.warmup,
                                    batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                                    device=str(device), dtype="bfloat16" if on_gpu else "float32",
                                    checkpoint_every=args.checkpoint_every, log_every=1,
                                    save_dtype="bfloat16" if on_gpu else "float32")
    config = pipeline.PipelineConfig(
        target_length=args.target_length, stages=stages, samples=args.samples, search=search, finetune=finetune,
        readjust=not args.no_readjust, readjust_cap=args.readjust_cap, readjust_search=readjust_search,
        readjust_attention=args.readjust_attention,
        report_lengths=_lengths(args.report_lengths), report_docs=args.report_docs,
        passkey_trials=args.passkey_trials, seed=args.seed, device=str(device), dtype=str(dtype).removeprefix("torch."),
        chunk_size=args.chunk_size).validate()
    tokenizer = _tokenizer(args.model)
    docs = data.load_tokenized(args.data, tokenizer, progress=Counter("tokenising", "docs", quiet=not show))
    pipeline.validate_inputs(config, info, docs)  # every stage's needs, before anything is written
    if not quiet:
        print(f"extend: {args.model} (context {info.original_length}) -> {args.target_length}; plan "
              f"{', '.join(s.label for s in stages)}{'' if args.no_readjust else ', readjust'}", file=sys.stderr)
    hooks = pipeline.ProgressHooks(new_bar=functools.partial(Progress, quiet=not show, leave=False),
                                   training_callback=step_callback)
    try:
        eval_docs = (data.load_tokenized(args.eval_data, tokenizer,
                                         progress=Counter("tokenising", "docs", quiet=not show))
                     if args.eval_data else None)
        result = pipeline.extend(args.model, tokenizer, docs, config, args.out, resume=args.resume, force=args.force,
                                 eval_documents=eval_docs, max_stages=args.max_stages, progress=hooks,
                                 render_report=report.write_extend_report)
    except KeyboardInterrupt:
        print("\ninterrupted; finished stages are kept: continue with the same command and --resume", file=sys.stderr)
        return 130
    if quiet:
        return 0
    if result.paused:
        print(f"paused after --max-stages {args.max_stages}; continue with the same command and --resume")
        return 0
    for row in result.report["results"]:
        ppl = "n/a" if row["ppl"] is None else f"{row['ppl']:.3f}"
        passkey = "n/a" if row["passkey"] is None else f"{row['passkey']:.0%}"
        print(f"  {pipeline.format_length(row['length']):>8}: perplexity {ppl}, passkey {passkey}")
    print(f"wrote {result.out} (checkpoint: {result.model_dir}, report: {result.out / report.EXTEND_MD})")
    return 0


def _tokenizer(spec: str):
    """The model's tokenizer alone (the weights are loaded by the stages that need them)."""
    folder, gguf = models.resolve(spec)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
