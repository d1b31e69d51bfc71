"""`longrope pretrain`: train the small byte-level Llama base model from scratch at a short context."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import data, train
from ..cli import add_progress_args, interrupted
from ..progress import Progress, step_callback


def id_list(text: str) -> list[str]:  # argparse type: 'a, b' -> ['a', 'b']
    if not (ids := [t.strip() for t in text.split(",") if t.strip()]):
        raise argparse.ArgumentTypeError(f"not a list of document ids: {text!r} (use e.g. doc1,doc2)")
    return ids


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a small byte-level Llama from scratch at a short context",
                       description=__doc__)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, nargs="+",
                   help="training text: .txt/.md file, folder of them, .jsonl(.gz) with 'text' (and 'id'), .parquet, "
                        "or 'bundled'; several allowed")
    g.add_argument("--data-ids", type=id_list, help="comma-separated ids to train on (jsonl 'id'; a text file's name)")
    g.add_argument("--exclude-ids", type=id_list, help="comma-separated ids to leave out (e.g. held out for evaluation)")
    g.add_argument("--exclude-data", nargs="+", default=[],
                   help="leave out every document whose id is in these sources (e.g. 'bundled', kept for evaluation)")
    g.add_argument("--val-ids", type=id_list,
                   help="comma-separated ids (from --data or --exclude-data) held out for a validation loss")
    g.add_argument("--out", required=True, help="output folder: the HF model, train_log.jsonl, pretrain.json")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if there is one")
    g.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt (model+optimizer, float32) after a finished run")
    m = p.add_argument_group("model")
    m.add_argument("--context", type=int, default=256, help="training context in tokens (= bytes + BOS)")
    for flag, default in (("--d-model", 256), ("--layers", 4), ("--heads", 4), ("--head-dim", 64)):
        m.add_argument(flag, type=int, default=default)
    m.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA); default 2")
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = train.PretrainConfig.from_options(vars(args), device=device, dtype=dtype).validate()
    documents, validation = data.training_documents(args.data, args.data_ids, args.exclude_ids, args.exclude_data,
                                                    args.val_ids)
    n_params, n_bytes = train.parameter_count(cfg), 4 if cfg.save_dtype == "float32" else 2
    print(f"pretrain: {n_params / 1e6:.2f}M parameters (~{n_params * n_bytes / 2**20:.1f} MiB as {cfg.save_dtype}), "
          f"{len(documents)} documents, {sum(len(d.text.encode()) for d in documents) / 1e6:.1f}M tokens, "
          f"{cfg.steps} steps × {cfg.batch_size} × {cfg.context} = {cfg.steps * cfg.batch_size * cfg.context / 1e6:.1f}M "
          f"tokens on {device} ({dtype})", file=sys.stderr)
    data_info = {"paths": [str(p) for p in args.data], "ids": args.data_ids, "exclude_ids": args.exclude_ids,
                 "exclude_data": [str(p) for p in args.exclude_data], "val_ids": args.val_ids}
    try:
        with Progress(cfg.steps, "pretrain", "steps", quiet=args.quiet) as bar:
            result = train.pretrain(cfg, documents, args.out, resume=args.resume, force=args.force,
                                    keep_checkpoint=args.keep_checkpoint, callback=step_callback(bar),
                                    data_info=data_info, validation=validation)
    except KeyboardInterrupt:
        return interrupted(cfg.checkpoint_every, args.out)
    rec, acc = result.record, result.record["passkey_accuracy_at_context"]
    val = "" if rec["validation_loss"] is None else f"validation loss {rec['validation_loss']:.4f}, "
    print(f"wrote {result.out}: final loss {rec['final_loss']:.4f} ({rec['final_loss'] / 0.6931:.3f} bits/byte), "
          f"{rec['tokens_seen'] / 1e6:.1f}M tokens in {rec['wall_time_s']:.0f} s, {val}passkey@{cfg.context} "
          f"{'n/a' if acc is None else f'{acc:.0%}'}, model {rec['model_bytes'] / 2**20:.2f} MiB")
    return 0
