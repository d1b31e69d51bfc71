"""`longrope finetune`: fine-tune a scaled model at a long sequence length (resumable).

Fine-tune --model with a scaling attached (--scaling FILE or preset, or --method with
--target-length) on --data packed into --seq-len-token sequences (BOS/EOS between documents).
AdamW with a short warm-up and cosine decay to a tenth, lr 5e-5 below 1B parameters and 2e-5
(LongRoPE's) from there unless --lr is given, float32 master
weights with bfloat16 autocast on a GPU, gradient checkpointing, SDPA attention, and a loss
computed a chunk of positions at a time (never the whole (tokens × vocab) logits).

Writes into --out: the fine-tuned Hugging Face checkpoint carrying the scaling (plain transformers
loads it), train_log.jsonl and finetune.json (configuration, versions, losses; written last).
checkpoint.pt is replaced every --checkpoint-every steps: continue a killed run with --resume.
Keeping short-context skills and retrieval: --short-share P trains a seeded share P of the
micro-batches at the model's original length (the short factors), --distill-weight W adds
W·KL(base model ‖ model) on them, --doc-mask keeps attention inside each packed document,
--retrieval-share P makes a share P of them retrieval exercises (4 "access code" facts at random
depths, questions on them at the end, the answers weighted by --answer-weight), and
--needle-every N logs the mean NLL of passkey answers in --needle-data ("needle_loss", and each
needle's by its depth: "needle_loss_by_depth"); --passkey-every N the greedy passkey accuracy at
--seq-len ("passkey": 2 keys at 5 depths; "passkey_by_depth"). All of them also run under torchrun.
Several --data sources are mixed: each micro-batch comes from one, drawn by --data-weights.
A note says when some frequency pairs of the scaling would meet angles pretraining never showed
within --seq-len (`scaling.seen_distance`); --keep-angles-seen raises their factors.
Several GPUs: `torchrun --nproc-per-node N -m longrope finetune ...` shards the weights (FSDP2)
and splits each sequence over the N processes (context parallelism; --seq-len a multiple of 2N).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .. import data, distributed, models, passkey, report, runs, train
from ..cli import (add_command, add_config_options, add_model_args, add_progress_args, add_scaling_args,
                   config_values, device_and_dtype_names, documents, parse_length, training_interrupted)
from ..errors import UsageError
from ..progress import Progress, step_callback


def register(sub) -> None:
    p = add_command(sub, "finetune", __doc__, run)
    add_model_args(p)
    add_scaling_args(p)
    add_progress_args(p)
    p.add_argument("--data", required=True, nargs="+",
                   help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or 'bundled'; several sources are mixed "
                        "by --data-weights")
    p.add_argument("--data-weights", type=parse_weights, metavar="W1,W2,...",
                   help="with several --data: the share of the micro-batches drawn from each (default: equal)")
    p.add_argument("--seq-len", type=parse_length,
                   help="tokens per training sequence, e.g. 64k (default: the scaling's target length)")
    add_config_options(p, train.FinetuneConfig, ("keep_angles_seen", "seen_margin"))
    add_config_options(p, train.FinetuneConfig, ("steps",))
    p.add_argument("--out", required=True, help="output folder (also the checkpoint to --resume from)")
    add_config_options(p.add_argument_group("optimisation"), train.FinetuneConfig, (
        "lr", "schedule", "warmup", "min_lr_ratio", "batch_size", "grad_accum", "weight_decay", "grad_clip", "seed"))
    k = p.add_argument_group("keeping short-context skills and retrieval")
    add_config_options(k, train.FinetuneConfig, ("short_share", "distill_weight", "doc_mask", "retrieval_share",
                                                 "answer_weight", "needle_every", "passkey_every"))
    k.add_argument("--needle-data", help="documents held apart for --needle-every: passkey needles at depths "
                   + ",".join(f"{d:g}" for d in train.retention.NEEDLE_DEPTHS) + " in --seq-len-token windows")
    r = p.add_argument_group("run")
    r.add_argument("--save-dtype", choices=train.SAVE_DTYPES,
                   help="dtype of the saved weights (default: bfloat16 on GPU, float32 on CPU)")
    add_config_options(r, train.FinetuneConfig, ("loss_chunk", "gradient_checkpointing", "compile_layers", "fused_loss",
                                                 "checkpoint_every", "log_every"))
    r.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    r.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    r.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after a finished run")


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r} (e.g. 0.7,0.3)") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"weights must be numbers >= 0, not all 0: {text!r}")
    return weights


def run(args) -> int:
    if args.needle_every and not args.needle_data:
        raise UsageError("--needle-every: needs --needle-data (documents held apart from --data)")
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        raise UsageError(f"--data-weights: {len(args.data_weights)} weights for {len(args.data)} --data sources; "
                         "give one per source")
    info = models.rope_info(models.load_config(args.model))
    scaling = models.resolve_scaling(args.scaling, args.method, args.target_length, info)  # before loading weights
    seq_len = args.seq_len or scaling.target_length
    if seq_len is None:
        raise UsageError("--seq-len: required with a scaling that has no target length")
    device, dtype = device_and_dtype_names(args)
    cfg = train.FinetuneConfig(**config_values(  # validate() refuses --dtype float16: bf16 autocast or float32
        args, train.FinetuneConfig, seq_len=seq_len, device=device, dtype=dtype,
        save_dtype=args.save_dtype or ("bfloat16" if dtype == "bfloat16" else "float32"))).validate()
    trained_scaling = cfg.scaling_to_train(scaling, info.dim, info.base)  # refused here, before loading weights
    quiet = distributed.launched_rank() != 0  # under torchrun only rank 0 reports
    model, tokenizer = models.load(args.model, dtype=torch.float32, device="cpu")
    sources = []  # one packed array per --data source, each in its own documents' order
    for spec in args.data:
        docs = documents(spec, tokenizer, quiet=args.quiet or quiet)
        try:
            sources.append(train.pack_documents([d.tokens for d in docs], seq_len, tokenizer.bos_token_id,
                                                tokenizer.eos_token_id))
        except UsageError as exc:
            raise UsageError(f"--data {spec}: {exc}") from None
    needles = needle_samples(args.needle_data, tokenizer, seq_len, cfg.seed, args.quiet or quiet) \
        if cfg.needle_every else None
    world = distributed.world_size()
    where = f"{world} processes (context parallel + FSDP2)" if world > 1 else device
    if not quiet:
        if scaling.target_length is not None and seq_len > scaling.target_length:
            print(f"note: --seq-len {seq_len} is beyond the scaling's target length {scaling.target_length}",
                  file=sys.stderr)
        # docs/BENCHMARKS.md (issue 16): where the fine-tuned SmolLM2 stopped retrieving
        original = getattr(scaling, "original_max_position_embeddings", None) or info.original_length
        for line in report.unseen_angles_note(trained_scaling, info.dim, info.base, original, seq_len):
            print(line, file=sys.stderr)
        print(f"finetune: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{' + '.join(str(len(s)) for s in sources)} sequences of {seq_len} tokens from {len(sources)} "
              f"source(s); {cfg.steps} steps × {cfg.sequences_per_step} sequences on {where} ({dtype})",
              file=sys.stderr)
    digests = [data.source_digest(spec) for spec in args.data]
    identity = {"model": runs.input_identity(args.model), "data": digests[0] if len(digests) == 1 else digests}
    if needles:
        identity["needle_data"] = data.source_digest(args.needle_data)
    try:
        with Progress(cfg.steps, "finetune", "steps", quiet=args.quiet or quiet) as bar:
            result = train.finetune(model, tokenizer, scaling, sources, cfg, args.out, resume=args.resume,
                                    force=args.force, keep_checkpoint=args.keep_checkpoint,
                                    callback=step_callback(bar), identity=identity, needles=needles,
                                    source_weights=args.data_weights)
    except KeyboardInterrupt:
        return training_interrupted(cfg.checkpoint_every, args.out)
    if rec := result.record:  # rank 0 (or the one process) exported
        plotted = report.plot_training_log(result.out)  # loss, needle loss, passkey against steps
        print(f"wrote {result.out}: loss {rec['first_loss']:.4f} -> {rec['final_loss']:.4f}, "
              f"{rec['tokens_seen'] / 1e6:.2f}M tokens in {rec['wall_time_s']:.0f} s"
              f"{'; curves in training.png' if plotted else ''}")
    return 0


def needle_samples(spec, tokenizer, seq_len: int, seed: int, quiet: bool) -> list:
    """Passkey needles at `retention.NEEDLE_DEPTHS` in `seq_len`-token windows of the --needle-data
    documents long enough to hold one."""
    docs = [d.tokens for d in documents(spec, tokenizer, quiet=quiet) if len(d.tokens) >= seq_len]
    if not docs:
        raise UsageError(f"--needle-data {spec}: no document holds --seq-len {seq_len} tokens")
    try:
        return passkey.needle_samples(tokenizer, docs, seq_len, seed, depths=train.retention.NEEDLE_DEPTHS)
    except ValueError as exc:  # --seq-len too short for the needle, question and answer
        raise UsageError(f"--needle-data: {exc}") from None
