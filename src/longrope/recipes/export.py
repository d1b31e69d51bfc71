"""`longrope export`: write a Hugging Face checkpoint carrying a scaling, or a GGUF file for llama.cpp.

--format gguf writes OUT/model.gguf for llama.cpp: Llama, Mistral and Qwen2 as its `llama`
architecture (the long factors as the `rope_freqs` tensor, applied to every prompt), Phi-3 as
`phi3` (its long and short factor tensors, chosen by the context llama.cpp allocates); the
temperature as `rope.scaling.attn_factor`, the context length set to the target. n̂ > 0 cannot be
expressed (refused unless --drop-n-hat).

--carry-to LENGTH exports LongRoPE factors (--scaling's, or the model's own: a model fine-tuned by
`longrope finetune`) carried to LENGTH with no search, as progressive extension carries them:
λ^(ln s'/ln s) and the temperature for the new scale s'. SmolLM2 fine-tuned at 64k retrieves at
128k this way (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from .. import gguf_export, models
from .. import scaling as sc
from ..cli import add_command, add_mismatch_arg, add_model_args, add_scaling_args, load_model, parse_length
from ..errors import UsageError


def register(sub) -> None:
    p = add_command(sub, "export", __doc__, run)
    add_model_args(p)
    add_scaling_args(p)
    add_mismatch_arg(p)
    p.add_argument("--carry-to", type=parse_length, metavar="LENGTH",
                   help="carry the LongRoPE factors (--scaling's, else the model's own) to LENGTH, no search")
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
    if args.carry_to is None:
        scaling = models.resolve_scaling(args.scaling, args.method, args.target_length, info,
                                         args.allow_context_mismatch)
    else:
        scaling = carried_scaling(args, info)
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


def carried_scaling(args, info: models.RopeInfo) -> sc.LongRoPEScaling:
    """--carry-to: --scaling's LongRoPE factors, or the model's own, carried to the length given."""
    if args.method or args.target_length:
        raise UsageError("--carry-to carries --scaling's LongRoPE factors or the model's own; drop --method and "
                         "--target-length")
    source = sc.load(sc.preset_path(args.scaling), info.dim) if args.scaling else models.configured_scaling(args.model)
    if not isinstance(source, sc.LongRoPEScaling):
        what = f"--scaling {args.scaling}" if args.scaling else f"the model {args.model}"
        raise UsageError(f"--carry-to: {what} has no LongRoPE factors ({source.rope_type}); give --scaling with a "
                         f"LongRoPE file or preset")
    try:
        carried = sc.carry(source, args.carry_to)
    except sc.ScalingError as exc:
        raise UsageError(f"--carry-to {args.carry_to}: {str(exc).removeprefix('carry: ')}") from None
    models.check_fits(carried, info, args.allow_context_mismatch)
    return carried
