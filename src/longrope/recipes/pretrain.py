"""`longrope pretrain`: train the small byte-level Llama base model from scratch at a short context."""

from __future__ import annotations

import shlex
import sys

from ..cli import add_progress_args, interrupted
from ..errors import UsageError
from ..progress import Progress, step_callback


def _ids(text: str | None) -> list[str] | None:
    if text is None:
        return None
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise UsageError("--data-ids/--exclude-ids: give a comma-separated list of document ids")
    return ids


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a small byte-level Llama from scratch at a short context",
                       description=__doc__)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, nargs="+",
                   help="training text: .txt/.md file, folder of them, .jsonl(.gz) with 'text' (and 'id'), .parquet, "
                        "or 'bundled'; several allowed")
    g.add_argument("--data-ids", help="comma-separated document ids to train on (jsonl 'id'; a text file's name)")
    g.add_argument("--exclude-ids", help="comma-separated document ids to leave out (e.g. held out for evaluation)")
    g.add_argument("--exclude-data", nargs="+", default=[],
                   help="leave out every document whose id appears in these sources (e.g. 'bundled', kept for evaluation)")
    g.add_argument("--val-ids", help="comma-separated ids (from --data or --exclude-data) held out for a validation loss; never trained on")
    g.add_argument("--out", required=True, help="output folder: the HF model, train_log.jsonl, pretrain.json")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if there is one")
    g.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt (model+optimizer, float32) after a finished run")
    m = p.add_argument_group("model")
    m.add_argument("--context", type=int, default=256, help="training context in tokens (= bytes + BOS)")
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA); default 2")
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default 8/3·d_model → ×256)")
    m.add_argument("--rope-theta", type=float, default=10000.0)
    m.add_argument("--tie-embeddings", action="store_true")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1500)
    o.add_argument("--batch-size", type=int, default=512, help="windows per step (512 × 256 tokens fits any GPU)")
    o.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of --lr")
    o.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
    o.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 turns clipping off")
    o.add_argument("--passkey-share", type=float, default=0.1, help="share of synthetic passkey samples")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="autocast dtype (default: bfloat16 on GPU, float32 on CPU); weights stay float32")
    r.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="dtype of the saved safetensors (default float16)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--checkpoint-every", type=int, default=500)
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--eval-every", type=int, default=0,
                   help="validation loss every N steps (with --val-ids; 0: only at the end)")
    r.add_argument("--eval-windows", type=int, default=64, help="validation windows of --context tokens")
    add_progress_args(r)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    import torch

    from .. import train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = train.PretrainConfig(
        context=args.context, d_model=args.d_model, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=args.intermediate_size, rope_theta=args.rope_theta,
        tie_embeddings=args.tie_embeddings, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, passkey_share=args.passkey_share,
        seed=args.seed, device=device, dtype=dtype, compile=args.compile,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, eval_every=args.eval_every,
        eval_windows=args.eval_windows, save_dtype=args.save_dtype,
    ).validate()
    if args.resume and args.force:
        raise UsageError("--resume and --force contradict each other: --force starts over")
    data_ids, exclude_ids, val_ids = _ids(args.data_ids), _ids(args.exclude_ids), _ids(args.val_ids)
    everything = train.load_documents(args.data)
    held_out = [d for source in args.exclude_data for d in train.load_documents(source)]
    if val_ids and data_ids and set(val_ids) & set(data_ids):
        raise UsageError(f"--val-ids and --data-ids share {', '.join(sorted(set(val_ids) & set(data_ids)))}")
    pool = list({d.id: d for d in [*held_out, *everything]}.values())  # --val-ids may name either
    validation = train.select_documents(pool, val_ids, what="--val-ids") if val_ids else None
    excluded = [*(exclude_ids or []), *(val_ids or []), *(d.id for d in held_out)]
    documents = train.select_documents(everything, data_ids, excluded if excluded else None)
    n_params = train.parameter_count(cfg)
    bytes_per = {"float16": 2, "bfloat16": 2, "float32": 4}[cfg.save_dtype]
    print(f"pretrain: {n_params / 1e6:.2f}M parameters (~{n_params * bytes_per / 2**20:.1f} MiB as {cfg.save_dtype}), "
          f"{len(documents)} documents, {sum(len(d.text.encode()) for d in documents) / 1e6:.1f}M tokens, "
          f"{cfg.steps} steps × {cfg.batch_size} × {cfg.context} = {cfg.steps * cfg.batch_size * cfg.context / 1e6:.1f}M "
          f"tokens on {device} ({dtype})", file=sys.stderr)

    bar = Progress(cfg.steps, "pretrain", "steps", quiet=args.quiet)
    command = shlex.join(["longrope", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith(("longrope", "__main__.py")) \
        else shlex.join(sys.argv)
    data_info = {"paths": [str(p) for p in args.data], "ids": data_ids, "exclude_ids": exclude_ids,
                 "exclude_data": [str(p) for p in args.exclude_data], "val_ids": val_ids,
                 "documents_ids": [d.id for d in documents]}
    try:
        with bar:
            result = train.pretrain(cfg, documents, args.out, resume=args.resume, force=args.force,
                                    keep_checkpoint=args.keep_checkpoint, callback=step_callback(bar),
                                    command=command, data_info=data_info, validation=validation)
    except KeyboardInterrupt:
        return interrupted(cfg.checkpoint_every, args.out)
    rec = result.record
    acc = rec["passkey_accuracy_at_context"]
    print(f"wrote {result.out}: final loss {rec['final_loss']:.4f} ({rec['final_loss'] / 0.6931:.3f} bits/byte), "
          f"{rec['tokens_seen'] / 1e6:.1f}M tokens in {rec['wall_time_s']:.0f} s, "
          + (f"validation loss {rec['validation_loss']:.4f}, " if rec["validation_loss"] is not None else "")
          + f"passkey@{cfg.context} {'n/a' if acc is None else f'{acc:.0%}'}, "
          f"model {rec['model_bytes'] / 2**20:.2f} MiB")
    return 0
