"""`longrope demo`: the longest real path that exists end to end, on SmolLM2-135M.

Load the model, attach a YaRN-initialised LongRoPE scaling for 4× its context, export it as a
Hugging Face checkpoint, reload that with plain transformers (no code of ours) and check that
both give the same logits and the same generated text.
"""

from __future__ import annotations

import time


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .. import models
    from .. import scaling as sc

    t0 = time.time()
    print(f"[1/4] loading {args.model}")
    model, tokenizer = models.load(args.model)
    info = models.rope_info(model.config)
    scaling = sc.make("longrope", info.original_length, 4 * info.original_length, dim=info.dim, base=info.base)
    print(f"[2/4] attaching LongRoPE {info.original_length} -> {scaling.target_length} tokens "
          f"(YaRN-initialised factors {scaling.long_factor[0]:.2f}..{scaling.long_factor[-1]:.2f}, "
          f"attention factor {scaling.attention_factor():.4f})")
    models.attach(model, scaling)
    print(f"[3/4] exporting to {args.out}")
    out = models.export(model, tokenizer, scaling, args.out, force=args.force)
    print("[4/4] reloading the export with plain transformers.AutoModelForCausalLM")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        diff = (plain(ids).logits - model(ids).logits).abs().max().item()
        ours = model.generate(ids, max_new_tokens=16, do_sample=False)
        theirs = plain.generate(ids, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"  max |logit difference| ours vs plain transformers: {diff:.2e}")
    print(f"  same generated tokens: {torch.equal(ours, theirs)}")
    models.attach(model, sc.NoScaling())
    with torch.no_grad():
        base_reply = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    print(f"  reply with the 4x scaling:  {reply.strip()!r}")
    print(f"  reply of the unscaled model: {tokenizer.decode(base_reply, skip_special_tokens=True).strip()!r}")
    print("  (transformers' longrope format applies the attention factor to short inputs too, which this untuned\n"
          "   model notices; short-context readjustment of the factors is the remedy)")
    print(f"done in {time.time() - t0:.0f} s; the exported checkpoint is in {out}")
    return 0 if torch.equal(ours, theirs) else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="the end-to-end demo that `make demo` runs")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)
