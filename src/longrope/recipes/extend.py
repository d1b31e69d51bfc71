"""`longrope extend`: progressive extension: search / fine-tune stages, readjust, export, report.

Extend --model's context to --target-length following a plan of stages (LongRoPE §3.3), e.g.

    --stages search:64k,finetune:64k,search:256k,search:2048k

search:L searches LongRoPE factors for L tokens on the current model (seeded with PI, NTK, YaRN
and the previous stage's factors, carried to the new scale; search:L:EVALS caps its evaluations);
finetune:L[:STEPS] fine-tunes the current model at L tokens with the current scaling, and later
stages use the fine-tuned model. carry:L carries the current factors to L with no search
(λ^(ln s'/ln s), the temperature for the new scale), e.g. finetune:64k,carry:128k.
Then short_factor is readjusted at the model's original context (factors in [1, --readjust-cap],
long_factor kept; never worse than all-ones there on the search documents), the checkpoint is
exported to OUT/model and OUT/report.md gives perplexity and passkey accuracy at a few lengths.

Each stage writes OUT/stage-NN-KIND-LENGTH/ and its stage.json last; re-run with --resume to skip
finished stages and continue an interrupted one. Default plan: search:TARGET.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

from .. import distributed, models, pipeline, report, train
from ..cli import (add_command, add_config_options, add_model_args, add_progress_args, config_values,
                   device_and_dtype_names, documents, interrupted, parse_length, parse_lengths)
from ..progress import Progress, step_callback
from ..search import SearchConfig

# every finetune:L stage's settings but its length and steps (LongRoPE's, checkpoints more often)
FINETUNE = train.FinetuneConfig(seq_len=2, steps=400, checkpoint_every=50, log_every=1)


def register(sub) -> None:
    p = add_command(sub, "extend", __doc__, run)
    add_model_args(p)
    add_progress_args(p)
    p.add_argument("--data", default="bundled", help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or 'bundled'")
    p.add_argument("--eval-data", default=None, help="documents for the final report, kept apart from --data "
                                                     "(default: --data, which the report then says)")
    p.add_argument("--target-length", type=parse_length, required=True, help="context to extend to, e.g. 2048k")
    p.add_argument("--stages", help="the plan, e.g. search:64k,finetune:64k,search:256k,search:2048k or "
                                    "finetune:64k,carry:128k (default: search:TARGET)")
    p.add_argument("--out", required=True, help="output folder (also what --resume continues)")
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    p.add_argument("--max-stages", type=int, default=None,
                   help="run at most N stages now and stop cleanly (for time-limited jobs); --resume continues")
    p.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    add_config_options(p, pipeline.PipelineConfig, ("seed",))
    g = p.add_argument_group("search stages (defaults: the paper's)")
    add_config_options(g, pipeline.PipelineConfig, ("samples", "chunk_size"))
    add_config_options(g, SearchConfig, ("population", "mutations", "crossovers", "parents", "generations",
                                         "max_evals"))
    f = p.add_argument_group("fine-tuning stages")
    f.add_argument("--finetune-steps", dest="steps", type=int, metavar="N",
                   help=f"steps of a finetune:L stage without its own (default {FINETUNE.steps})")
    add_config_options(f, FINETUNE, ("lr", "schedule", "warmup", "min_lr_ratio", "batch_size", "grad_accum",
                                     "checkpoint_every", "short_share", "distill_weight", "doc_mask",
                                     "retrieval_share", "answer_weight", "seen_margin", "compile_layers",
                                     "fused_loss"))
    p.add_argument("--keep-angles-seen", action="store_true", default=None,
                   help="every stage keeps the frequency pairs that never turned fully in pretraining at factors >= s "
                        "(no angle pretraining never showed within a stage's length): searches search them in "
                        "[s, 1.25·s], fine-tunes raise them")
    r = p.add_argument_group("readjustment and report")
    add_config_options(r, pipeline.PipelineConfig, ("readjust", "readjust_cap", "readjust_attention", "report_docs",
                                                    "passkey_trials"))
    r.add_argument("--readjust-evals", type=int, default=None, help="evaluations of the readjustment search at most")
    r.add_argument("--report-lengths", type=parse_lengths,
                   help="lengths of the final report, e.g. 4k,16k,64k (default: the original context doubling to "
                        "the target, at most 6)")


def run(args) -> int:
    quiet = distributed.launched_rank() != 0  # under torchrun only rank 0 reports
    show = not (quiet or args.quiet)  # progress
    stages = pipeline.parse_stages(args.stages) if args.stages else (pipeline.Stage("search", args.target_length),)
    info = models.rope_info(models.load_config(args.model))
    pipeline.check_plan(stages, info.original_length, args.target_length)  # before the slow part
    device, dtype = device_and_dtype_names(args)
    search = SearchConfig(**config_values(args, SearchConfig)).validate()
    on_gpu = device.startswith("cuda")
    finetune = dataclasses.replace(FINETUNE, **config_values(  # training autocasts: bfloat16 or float32
        args, FINETUNE, device=device, dtype="bfloat16" if on_gpu else "float32",
        save_dtype="bfloat16" if on_gpu else "float32"))
    config = pipeline.PipelineConfig(**config_values(
        args, pipeline.PipelineConfig, stages=stages, search=search, finetune=finetune, device=device, dtype=dtype,
        readjust_search=dataclasses.replace(search, max_evals=args.readjust_evals) if args.readjust_evals else None,
        report_lengths=tuple(args.report_lengths) if args.report_lengths else None)).validate()
    tokenizer = models.load_tokenizer(args.model)  # the stages load the weights they need
    docs = documents(args.data, tokenizer, quiet=not show)
    pipeline.validate_inputs(config, info, docs, tokenizer)  # every stage's needs, before anything is written
    if not quiet:
        print(f"extend: {args.model} (context {info.original_length}) -> {args.target_length}; plan "
              f"{', '.join(s.label for s in stages)}{', readjust' if config.readjust else ''}", file=sys.stderr)
    hooks = pipeline.ProgressHooks(new_bar=functools.partial(Progress, quiet=not show, leave=False),
                                   training_callback=step_callback)
    try:
        eval_docs = documents(args.eval_data, tokenizer, quiet=not show) if args.eval_data else None
        result = pipeline.extend(args.model, tokenizer, docs, config, args.out, resume=args.resume, force=args.force,
                                 eval_documents=eval_docs, max_stages=args.max_stages, progress=hooks,
                                 render_report=report.write_extend_report)
    except KeyboardInterrupt:
        return interrupted("finished stages are kept: continue with the same command and --resume")
    if quiet:
        return 0
    if result.paused:
        print(f"paused after --max-stages {args.max_stages}; continue with the same command and --resume")
        return 0
    print(report.extend_summary(result.report))
    print(f"wrote {result.out} (checkpoint: {result.model_dir}, report: {result.out / report.EXTEND_MD})")
    return 0
