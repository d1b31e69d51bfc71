"""`longrope export`: write a Hugging Face checkpoint carrying a scaling."""

from __future__ import annotations

from .. import models
from ..cli import add_command, add_mismatch_arg, add_model_args, add_scaling_args, load_model


def register(sub) -> None:
    p = add_command(sub, "export", __doc__, run)
    add_model_args(p)
    add_scaling_args(p)
    add_mismatch_arg(p)
    p.add_argument("--out", required=True, help="output folder: the checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args) -> int:
    info = models.rope_info(models.load_config(args.model))
    # fail before loading weights
    scaling = models.resolve_scaling(args.scaling, args.method, args.target_length, info, args.allow_context_mismatch)
    model, tokenizer, _ = load_model(args)
    models.attach(model, scaling, args.allow_context_mismatch)
    if missing := models.needs_sidecar(scaling):
        print(f"note: {missing}: transformers' config cannot express this; it is stored in "
              f"{models.SIDECAR} and restored by longrope.load(), plain transformers ignores it")
    out = models.export(model, tokenizer, scaling, args.out, force=args.force,
                        allow_context_mismatch=args.allow_context_mismatch)
    _, max_positions = models.hf_rope_parameters(scaling, info)
    print(f"wrote {out} ({scaling.rope_type}, max_position_embeddings={max_positions})")
    return 0
