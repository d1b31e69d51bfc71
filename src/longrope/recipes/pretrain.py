"""`longrope pretrain`: pretrain a small byte-level Llama from scratch at a short context."""

from __future__ import annotations

import argparse
import sys

from .. import data, train
from ..cli import (add_command, add_config_options, add_device_args, add_progress_args, config_values,
                   device_and_dtype_names, training_interrupted)
from ..progress import Progress, step_callback


def id_list(text: str) -> list[str]:  # argparse type: 'a, b' -> ['a', 'b']
    if not (ids := [t.strip() for t in text.split(",") if t.strip()]):
        raise argparse.ArgumentTypeError(f"not a list of document ids: {text!r} (use e.g. doc1,doc2)")
    return ids


def register(sub) -> None:
    p = add_command(sub, "pretrain", __doc__, run)
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
    add_config_options(p.add_argument_group("model"), train.PretrainConfig, (
        "context", "d_model", "layers", "heads", "head_dim", "kv_heads", "intermediate_size", "rope_theta",
        "tie_embeddings"))
    add_config_options(p.add_argument_group("optimisation"), train.PretrainConfig, (
        "steps", "batch_size", "lr", "min_lr_ratio", "warmup", "schedule", "weight_decay", "grad_clip",
        "passkey_share", "seed"))
    r = p.add_argument_group("run")
    add_device_args(r, ("float32", "bfloat16"),
                    "autocast dtype (default: bfloat16 on GPU, float32 on CPU); weights stay float32")
    add_config_options(r, train.PretrainConfig, (
        "save_dtype", "compile", "checkpoint_every", "log_every", "eval_every", "eval_windows"))
    add_progress_args(r)


def run(args) -> int:
    device, dtype = device_and_dtype_names(args)
    cfg = train.PretrainConfig(**config_values(args, train.PretrainConfig, device=device, dtype=dtype)).validate()
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
        return training_interrupted(cfg.checkpoint_every, args.out)
    rec, acc = result.record, result.record["passkey_accuracy_at_context"]
    val = "" if rec["validation_loss"] is None else f"validation loss {rec['validation_loss']:.4f}, "
    print(f"wrote {result.out}: final loss {rec['final_loss']:.4f} ({rec['final_loss'] / 0.6931:.3f} bits/byte), "
          f"{rec['tokens_seen'] / 1e6:.1f}M tokens in {rec['wall_time_s']:.0f} s, {val}passkey@{cfg.context} "
          f"{'n/a' if acc is None else f'{acc:.0%}'}, model {rec['model_bytes'] / 2**20:.2f} MiB")
    return 0
