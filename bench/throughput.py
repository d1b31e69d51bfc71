"""(b) Seconds and achieved TFLOP/s of one perplexity forward at 32k and 64k tokens: ours
(evaluate.nll_sum, the lean forward) vs stock transformers `model(ids, labels=ids)`, on a
Llama-3-8B- (or 3.2-1B-) shaped bf16 model with random weights, against a measured bf16
matmul peak (8192³). FLOPs: 2·params·n (every Linear, lm_head included) + causal attention
2·2·n²·d·layers/2 (d = heads × head_dim); the same count for both.

    python bench/throughput.py --shape 8b --out throughput-8b.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import (environment, fmt_len, forward_flops, matmul_peak_tflops, measured, random_llama, ratio,
                     require_cuda, swap_rotary, write_json)
from longrope import evaluate, lean


def forward(model, impl, ids, rotary, sdpa=None):
    model.model.rotary_emb = rotary["stock" if impl == "stock" else "ours"]
    lean.set_sdpa_backends(sdpa if impl == "ours-sdpa" else None)
    with torch.inference_mode():
        if impl.startswith("ours"):
            return evaluate.nll_sum(model, ids)[0] / (ids.numel() - 1)
        return model(input_ids=ids[None], labels=ids[None]).loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["8b", "1b", "smollm2"], default="8b")
    p.add_argument("--lengths", default="32768,65536")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sdpa-backends", default=None,
                   help="also run ours with this SDPA kernel preference, e.g. cudnn,flash (row 'ours-sdpa')")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = require_cuda("throughput")
    peak = matmul_peak_tflops()
    print(f"measured bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s")
    model = random_llama(args.shape)
    ours, stock = swap_rotary(model)
    rotary = {"ours": ours, "stock": stock}
    rows = []
    print(f"{'length':>7} {'impl':9} {'seconds':>8} {'TFLOP/s':>8} {'% peak':>7} {'peak GiB':>9} nll/token")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (n,), device=device)
        flops = forward_flops(model, n)
        impls = ("ours", "ours-sdpa", "stock") if args.sdpa_backends else ("ours", "stock")
        for impl in impls:
            forward(model, impl, ids[:4096], rotary, args.sdpa_backends)  # warm-up: kernels compiled
            times, row = [], {"impl": impl, "n": n, "flops": flops}
            for _ in range(args.repeats):
                r = {}
                with measured(r):
                    row["nll_per_token"] = forward(model, impl, ids, rotary, args.sdpa_backends)
                if r["oom"]:
                    row.update(oom=True, peak_gib=r["peak_gib"])
                    break
                times.append(r["seconds"])
                row.update(oom=False, peak_gib=r["peak_gib"])
            if times:
                row.update(seconds=statistics.median(times), all_seconds=times)
                row["tflops"] = flops / row["seconds"] / 1e12
                row["percent_of_peak"] = 100 * row["tflops"] / peak
                print(f"{fmt_len(n):>7} {impl:9} {row['seconds']:8.3f} {row['tflops']:8.1f} "
                      f"{row['percent_of_peak']:6.1f}% {row['peak_gib']:9.2f} {row['nll_per_token']:.4f}")
            else:
                print(f"{fmt_len(n):>7} {impl:9} {'OOM':>8}")
            rows.append(row)
        here = {r["impl"]: r for r in rows[-len(impls):]}
        for impl in impls[:-1]:
            a, b = here[impl], here["stock"]
            if not a["oom"] and not b["oom"]:
                print(f"{fmt_len(n):>7} {impl}/stock: time {ratio(a['seconds'], b['seconds']):.3f}x, "
                      f"peak memory {ratio(a['peak_gib'], b['peak_gib']):.3f}x")
        del ids
    write_json(args.out or f"throughput_{args.shape}.json",
               {"benchmark": "throughput", "shape": args.shape, "matmul_peak_tflops": peak, "rows": rows,
                "flop_count": "2*matmul_params*n + 2*n^2*heads*head_dim*layers (causal)",
                "environment": environment()})


if __name__ == "__main__":
    main()
