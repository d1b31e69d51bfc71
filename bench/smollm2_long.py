"""(d) SmolLM2-135M perplexity at 256k, 512k, 1M and 2M tokens with a searched LongRoPE scaling:
time and peak memory of our lean forward vs transformers' own modules with only the final
projection chunked (evaluate's "modules" path), side by side in one process, same scaling.

The text: the documents of --data (e.g. austen_moby.jsonl.gz) tokenised and concatenated in
file order (each with its BOS/EOS), repeated from the start if shorter than the length asked
for (the JSON records how many tokens were distinct); the first L tokens are scored.

    python bench/smollm2_long.py SmolLM2-135M-Instruct.Q4_1.gguf --data austen_moby.jsonl.gz \
        --lengths 256k,512k,1m --out smollm2-long.json
    python bench/smollm2_long.py SmolLM2-135M-Instruct.Q4_1.gguf --data austen_moby.jsonl.gz \
        --lengths 2m --out smollm2-long-2m.json      # ~2 × 5 minutes on one H200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import environment, fmt_len, measured, ratio, require_cuda, sync, write_json
from longrope import cli, data, evaluate, lean, models


def attention_seconds(config, n: int, device) -> float:
    """Seconds of one layer's causal attention at n tokens: one SDPA call over all heads (GQA),
    bf16, as transformers' sdpa path makes it (a warm-up call first, then the median of 3)."""
    import torch.nn.functional as F

    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, n, d, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, kv, n, d, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, kv, n, d, device=device, dtype=torch.bfloat16, generator=g)
    times = []
    for i in range(4):
        sync()
        t = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)
        sync()
        if i:
            times.append(time.perf_counter() - t)
    return sorted(times)[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="SmolLM2-135M GGUF path (or smollm2-135m)")
    p.add_argument("--data", required=True, help="documents to read (any `longrope eval --data` source)")
    p.add_argument("--scaling", default="smollm2-135m-128k", help="a preset name or a scaling JSON file")
    p.add_argument("--lengths", default="256k,512k,1m,2m")
    p.add_argument("--impls", default="lean,modules",
                   help="any of lean, lean-sdpa (lean with --sdpa-backends), modules")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="positions per chunk of both forwards' loss and of the lean layers (default: the lean "
                        "forward sizes its chunks to the model, lean.layer_chunk; the loss takes 4096)")
    p.add_argument("--attention-floor", action="store_true",
                   help="also time the model's causal attention alone (one SDPA call per layer, random q/k/v of "
                        "its shapes, torch's kernel choice): the part of either forward no rewrite of the rest removes")
    p.add_argument("--floor-backends", default="default",
                   help="with --attention-floor: SDPA kernels to time it with, e.g. default,cudnn,flash,efficient "
                        "(default: torch's own choice only)")
    p.add_argument("--out", default="smollm2_long.json")
    p.add_argument("--sdpa-backends", default=None,
                   help="SDPA kernel preference of the lean-sdpa rows, e.g. cudnn,flash")
    args = p.parse_args()
    impls = [x for x in args.impls.split(",") if x.strip()]  # "" with --attention-floor: the floor alone
    if "lean-sdpa" in impls and not args.sdpa_backends:
        p.error("--impls lean-sdpa needs --sdpa-backends")
    floor_backends = [b.strip() for b in args.floor_backends.split(",") if b.strip()] if args.attention_floor else []
    unknown = [b for b in floor_backends if b != "default" and b not in lean.SDPA_BACKENDS]
    if unknown:
        p.error(f"--floor-backends: unknown {unknown}; choose from default, {', '.join(lean.SDPA_BACKENDS)}")
    device = require_cuda("smollm2_long")
    model, tokenizer = models.load(args.model, dtype=torch.bfloat16, device=device)
    info = models.rope_info(model.config)
    scaling = models.resolve_scaling(args.scaling, None, None, info)
    models.attach(model, scaling)
    lengths = [cli.parse_length(x) for x in args.lengths.split(",")]
    docs = data.load_tokenized(args.data, tokenizer)
    stream = np.concatenate([d.tokens for d in docs])
    distinct = len(stream)
    if distinct < max(lengths):
        stream = np.tile(stream, -(-max(lengths) // distinct))
        print(f"note: {args.data} has {distinct:,} tokens; the text repeats from its start beyond that")
    evaluate.nll_sum(model, torch.as_tensor(stream[:8192]), args.chunk_size)  # warm-up (Triton compiles here)
    rows = []
    print(f"{'length':>7} {'forward':8} {'ppl':>10} {'seconds':>8} {'peak GiB':>9}")
    for n in lengths:
        ids = torch.as_tensor(stream[:n]).to(device)
        result = {}
        for impl in impls:
            r = {"n": n, "forward": impl, "sdpa_backends": args.sdpa_backends if impl == "lean-sdpa" else None}
            # the modules path never goes through the lean forward, so the setting only affects lean rows
            lean.set_sdpa_backends(r["sdpa_backends"])
            try:
                with measured(r):
                    nll, count = evaluate.nll_sum(model, ids, args.chunk_size, forward=impl.split("-")[0])
                    r.update(nll_sum=nll, n_tokens=count, ppl=evaluate.perplexity_from(nll, count))
            except RuntimeError as e:  # e.g. a kernel that refuses this length: recorded, the others still run
                r.update(oom=False, error=str(e).splitlines()[0][:300])
            rows.append(r)
            result[impl] = r
            if r.get("error"):
                print(f"{fmt_len(n):>7} {impl:8} error: {r['error']}")
            elif r["oom"]:
                print(f"{fmt_len(n):>7} {impl:8} {'OOM':>10} {'':>8} {r['peak_gib']:9.2f}")
            else:
                print(f"{fmt_len(n):>7} {impl:8} {r['ppl']:10.3f} {r['seconds']:8.2f} {r['peak_gib']:9.2f}")
        for backend in floor_backends:
            name = "attention alone" + ("" if backend == "default" else f" ({backend})")
            r = {"n": n, "forward": name, "sdpa_backends": None if backend == "default" else backend}
            lean.set_sdpa_backends(r["sdpa_backends"])
            try:
                with measured(r), lean.sdpa_preference(r["sdpa_backends"], device):
                    r["seconds_per_layer"] = attention_seconds(model.config, n, device)
            except RuntimeError as e:  # a kernel that refuses these shapes (e.g. GQA) is recorded, not fatal
                r.update(error=str(e).splitlines()[0][:300])
                print(f"{fmt_len(n):>7} {name}: error: {r['error']}")
            else:
                r["seconds"] = r["seconds_per_layer"] * model.config.num_hidden_layers
                print(f"{fmt_len(n):>7} {name} {'':>10} {r['seconds']:8.2f} "
                      f"({model.config.num_hidden_layers} layers × {r['seconds_per_layer']:.3f} s)")
            rows.append(r)
            result[name] = r
        lean.set_sdpa_backends(None)
        b = result.get("modules")
        for name, a in result.items():
            if name.startswith("attention alone") and b and "seconds" in a and "seconds" in b:
                print(f"{fmt_len(n):>7} {name}/modules: time {ratio(a['seconds'], b['seconds']):.3f}x")
            elif name != "modules" and b and "seconds" in a and "seconds" in b:
                print(f"{fmt_len(n):>7} {name}/modules: time {ratio(a['seconds'], b['seconds']):.3f}x, peak memory "
                      f"{ratio(a['peak_gib'], b['peak_gib']):.3f}x, ppl {ratio(a['ppl'], b['ppl']):.5f}x")
        del ids
        # after every length, so that a call cut short keeps what it measured
        write_json(args.out, {"benchmark": "smollm2_long", "model": args.model, "data": args.data,
                              "distinct_tokens": distinct, "scaling": scaling.to_dict(),
                              "chunk_size": args.chunk_size, "rows": rows, "environment": environment()})


if __name__ == "__main__":
    main()
