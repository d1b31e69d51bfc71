"""`longrope finetune`: fine-tune a model with a scaling attached at a long sequence length."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import data, distributed, models, train
from ..cli import add_model_args, add_progress_args, add_scaling_args, interrupted, parse_length, resolve_scaling
from ..errors import UsageError
from ..progress import Counter, Progress, step_callback

DESCRIPTION = """\
Fine-tune --model with a scaling attached (--scaling FILE or preset, or --method with
--target-length) on --data packed into --seq-len-token sequences (BOS/EOS between documents).
AdamW, lr 2e-5 with a short warm-up and linear decay (LongRoPE's settings), float32 master
weights with bfloat16 autocast on a GPU, gradient checkpointing, SDPA attention, and a loss
computed a chunk of positions at a time (never the whole (tokens × vocab) logits).

Writes into --out: the fine-tuned Hugging Face checkpoint carrying the scaling (plain transformers
loads it), train_log.jsonl and finetune.json (configuration, versions, losses; written last).
checkpoint.pt is replaced every --checkpoint-every steps: continue a killed run with --resume.
Several GPUs: `torchrun --nproc-per-node N -m longrope finetune ...` shards the weights (FSDP2)
and splits each sequence over the N processes (context parallelism; --seq-len a multiple of 2N).
"""


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a scaled model at a long sequence length (resumable)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_scaling_args(p)
    add_progress_args(p)
    p.add_argument("--data", required=True, help="documents: .txt/.md, folder, .jsonl(.gz), .parquet or 'bundled'")
    p.add_argument("--seq-len", type=parse_length, default=None,
                   help="tokens per training sequence, e.g. 64k (default: the scaling's target length)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="output folder (also the checkpoint to --resume from)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5, the paper's)")
    o.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 20, at most 10%% of --steps)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a share of --lr (default 0)")
    o.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 turns clipping off")
    o.add_argument("--seed", type=int, default=0, help="order of the training sequences")
    r = p.add_argument_group("run")
    r.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of the saved weights (default: bfloat16 on GPU, float32 on CPU)")
    r.add_argument("--loss-chunk", type=int, default=4096, help="positions projected to logits at a time")
    r.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every activation (faster, more memory)")
    r.add_argument("--checkpoint-every", type=int, default=100)
    r.add_argument("--log-every", type=int, default=1)
    r.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    r.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    r.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after a finished run")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    info = models.rope_info(models.load_config(args.model))
    scaling = resolve_scaling(args.scaling, args.method, args.target_length, info)  # before loading weights
    seq_len = args.seq_len or scaling.target_length
    if seq_len is None:
        raise UsageError("--seq-len: required with a scaling that has no target length")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = train.FinetuneConfig.from_options(  # validate() refuses --dtype float16: bf16 autocast or float32
        vars(args), seq_len=seq_len, device=device, dtype=dtype, gradient_checkpointing=not args.no_gradient_checkpointing,
        save_dtype=args.save_dtype or ("bfloat16" if dtype == "bfloat16" else "float32")).validate()
    quiet = distributed.launched_rank() != 0  # under torchrun only rank 0 reports
    model, tokenizer = models.load(args.model, dtype=torch.float32, device="cpu")
    docs = data.load_tokenized(args.data, tokenizer, progress=Counter("tokenising", "docs", quiet=args.quiet or quiet))
    packed = train.pack_documents([d.tokens for d in docs], seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    world = distributed.world_size()
    where = f"{world} processes (context parallel + FSDP2)" if world > 1 else device
    if not quiet:
        if scaling.target_length is not None and seq_len > scaling.target_length:
            print(f"note: --seq-len {seq_len} is beyond the scaling's target length {scaling.target_length}",
                  file=sys.stderr)
        print(f"finetune: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(docs)} documents "
              f"packed into {len(packed)} sequences of {seq_len} tokens; {cfg.steps} steps × {cfg.sequences_per_step} "
              f"sequences on {where} ({dtype})", file=sys.stderr)
    identity = {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
                "data": data.source_digest(args.data)}
    try:
        with Progress(cfg.steps, "finetune", "steps", quiet=args.quiet or quiet) as bar:
            result = train.finetune(model, tokenizer, scaling, packed, cfg, args.out, resume=args.resume,
                                    force=args.force, keep_checkpoint=args.keep_checkpoint,
                                    callback=step_callback(bar), identity=identity)
    except KeyboardInterrupt:
        return interrupted(cfg.checkpoint_every, args.out)
    if rec := result.record:  # rank 0 (or the one process) exported
        print(f"wrote {result.out}: loss {rec['first_loss']:.4f} -> {rec['final_loss']:.4f}, "
              f"{rec['tokens_seen'] / 1e6:.2f}M tokens in {rec['wall_time_s']:.0f} s")
    return 0
