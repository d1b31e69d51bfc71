"""`longrope export`: write a Hugging Face checkpoint carrying a scaling, or a GGUF file for llama.cpp.

--format gguf writes OUT/model.gguf for llama.cpp: Llama, Mistral and Qwen2 as its `llama`
architecture (the long factors as the `rope_freqs` tensor, applied to every prompt), Phi-3 as
`phi3` (its long and short factor tensors, chosen by the context llama.cpp allocates); the
temperature as `rope.scaling.attn_factor`, the context length set to the target. n̂ > 0 cannot be
expressed (refused unless --drop-n-hat).
"""

from __future__ import annotations

from .. import gguf_export, models
from ..cli import add_command, add_mismatch_arg, add_model_args, add_scaling_args, load_model


def register(sub) -> None:
    p = add_command(sub, "export", __doc__, run)
    add_model_args(p)
    add_scaling_args(p)
    add_mismatch_arg(p)
    p.add_argument("--out", required=True, help="output folder: the checkpoint (or model.gguf)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a Hugging Face checkpoint (default); "
                                                                          "gguf: a GGUF file for llama.cpp")
    p.add_argument("--gguf-type", choices=gguf_export.GGUF_TYPES, default="f16",
                   help="--format gguf: the weight matrices' type (default f16; norms and factors stay f32)")
    p.add_argument("--drop-n-hat", action="store_true",
                   help="--format gguf: export a scaling with n_hat > 0 without it (GGUF has no key for it)")


def run(args) -> int:
    config = models.load_config(args.model)
    info = models.rope_info(config)
    # fail before loading weights
    scaling = models.resolve_scaling(args.scaling, args.method, args.target_length, info, args.allow_context_mismatch)
    if args.format == "gguf":
        gguf_export.check_exportable((getattr(config, "architectures", None) or ["?"])[0], args.gguf_type)
        rope = gguf_export.rope_in_gguf(scaling, info, args.drop_n_hat)
        model, tokenizer, _ = load_model(args)
        path = gguf_export.export_gguf(model, tokenizer, scaling, args.out, args.gguf_type, args.drop_n_hat,
                                       force=args.force)
        print(f"wrote {path} (llama, {args.gguf_type}, context {rope.context_length}, attention factor "
              f"{rope.attn_factor:.4f}; llama.cpp applies the long factors to every prompt)")
        return 0
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
