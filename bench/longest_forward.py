"""(a) The longest perplexity forward that fits on one GPU: ours (evaluate.nll_sum, the lean
forward) vs stock transformers `model(ids, labels=ids)`, Llama-3-8B- or Llama-3.2-1B-shaped,
random bf16 weights, lengths doubling from 64k until out of memory.

Neither forward keeps anything across layers except, for stock, its KV cache (use_cache is on by
default), so our peak memory does not depend on how many layers run. Where running all layers
would take longer than --budget-s, ours runs the first layer only, with all weights resident
(reported as layers_run=1, seconds then covers one layer); stock always runs every layer.
At the longest full-layer length ours is measured both ways, to show the peaks agree.

    python bench/longest_forward.py --shape 8b --out longest-8b.json
"""

from __future__ import annotations

import argparse

import torch

from _common import (environment, fmt_len, gpu_memory_gib, measured, random_llama, ratio, require_cuda, swap_rotary,
                     write_json)
from longrope import evaluate, lean


def run(model, impl: str, ids: torch.Tensor, layers: int, rotary: dict) -> dict:
    model.model.rotary_emb = rotary[impl]
    model.config.num_hidden_layers = layers  # transformers and our loop both run layers[:this]
    result = {"impl": impl, "n": ids.numel(), "layers_run": layers}
    with torch.inference_mode(), measured(result):
        if impl == "ours":
            nll, count = evaluate.nll_sum(model, ids)
        else:
            out = model(input_ids=ids[None], labels=ids[None])
            nll, count = out.loss.double().item() * (ids.numel() - 1), ids.numel() - 1
            del out
        result["nll_per_token"] = nll / count
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["8b", "1b"], default="8b")
    p.add_argument("--start", type=int, default=65536)
    p.add_argument("--max-length", type=int, default=1 << 24)
    p.add_argument("--budget-s", type=float, default=150.0, help="skip a run predicted to take longer")
    p.add_argument("--out", default=None)
    p.add_argument("--sdpa-backends", default=None,
                   help="SDPA kernel preference for our forward, e.g. cudnn,flash (default: torch's choice)")
    args = p.parse_args()
    lean.set_sdpa_backends(args.sdpa_backends)  # ours only: stock never goes through the lean forward
    device = require_cuda("longest_forward")
    model = random_llama(args.shape)
    total_layers = model.config.num_hidden_layers
    ours, stock = swap_rotary(model)
    rotary = {"ours": ours, "stock": stock}
    warm = torch.randint(0, model.config.vocab_size, (4096,), device=device)
    for impl in rotary:  # kernels compiled, cuBLAS initialised
        run(model, impl, warm, total_layers, rotary)
    rows, last = [], {}  # last: impl -> (seconds per layer, n) of its latest successful run
    done = {"ours": None, "stock": None}  # why each impl stopped
    n = args.start
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"GPU {gpu_memory_gib():.0f} GiB")
    print(f"{'impl':6} {'length':>7} {'layers':>6} {'seconds':>8} {'peak GiB':>9}  nll/token")
    while n <= args.max_length and not all(done.values()):
        ids = torch.randint(0, model.config.vocab_size, (n,), device=device)
        for impl in ("ours", "stock"):
            if done[impl]:
                continue
            per_layer = last[impl][0] * (n / last[impl][1]) ** 2 if impl in last else 0.0  # quadratic: an upper bound
            layers = total_layers
            if per_layer * total_layers > args.budget_s:
                if impl == "stock" or per_layer > args.budget_s:
                    done[impl] = f"time budget ({args.budget_s:.0f} s) before {fmt_len(n)}"
                    continue
                layers = 1
                prev = [r for r in rows if r["impl"] == "ours" and not r["oom"]][-1:]
                if prev and prev[0]["layers_run"] == total_layers:
                    prev = prev[0]  # the same length both ways: the peak does not depend on the layers run
                    again = run(model, "ours", torch.randint(0, model.config.vocab_size, (prev["n"],), device=device),
                                1, rotary)
                    rows.append(again)
                    print(f"{'ours':6} {fmt_len(prev['n']):>7} {1:>6} {again.get('seconds', 0):8.2f} "
                          f"{again['peak_gib']:9.2f}  (check: all layers gave {prev['peak_gib']:.2f} GiB)")
            r = run(model, impl, ids, layers, rotary)
            rows.append(r)
            if r["oom"]:
                done[impl] = f"out of memory at {fmt_len(n)}"
                print(f"{impl:6} {fmt_len(n):>7} {layers:>6} {'OOM':>8} {r['peak_gib']:9.2f}")
                continue
            last[impl] = (r["seconds"] / layers, n)
            print(f"{impl:6} {fmt_len(n):>7} {layers:>6} {r['seconds']:8.2f} {r['peak_gib']:9.2f}  {r['nll_per_token']:.4f}")
        del ids
        n *= 2
    model.config.num_hidden_layers = total_layers
    longest = {impl: max((r["n"] for r in rows if r["impl"] == impl and not r["oom"]), default=0) for impl in done}
    fit = [r for r in rows if r["impl"] == "ours" and not r["oom"]][-2:]
    capacity = None
    if len(fit) == 2 and fit[1]["n"] != fit[0]["n"]:  # peak = a + b·n, solved for the GPU's memory
        b = (fit[1]["peak_gib"] - fit[0]["peak_gib"]) / (fit[1]["n"] - fit[0]["n"])
        capacity = int((gpu_memory_gib() - (fit[1]["peak_gib"] - b * fit[1]["n"])) / b) if b > 0 else None
    both = {r["n"]: r for r in rows if r["impl"] == "stock" and not r["oom"]}
    for r in rows:
        if r["impl"] == "ours" and not r["oom"] and r["n"] in both and r["layers_run"] == total_layers:
            s = both[r["n"]]
            print(f"{fmt_len(r['n'])}: ours/stock peak {ratio(r['peak_gib'], s['peak_gib']):.3f}x, time "
                  f"{ratio(r['seconds'], s['seconds']):.3f}x, nll/token diff {r['nll_per_token'] - s['nll_per_token']:+.2e}")
    print(f"longest that ran: ours {fmt_len(longest['ours'])} ({done['ours'] or 'max length reached'}), "
          f"stock {fmt_len(longest['stock']) if longest['stock'] else 'none'} ({done['stock'] or 'max length reached'})")
    if capacity:
        print(f"ours, linear fit of the peak memory: about {capacity / 2 ** 20:.1f}M tokens fit in {gpu_memory_gib():.0f} GiB")
    if longest["ours"] and longest["stock"]:
        print(f"ratio of longest lengths, ours/stock: {longest['ours'] / longest['stock']:.0f}x")
    write_json(args.out or f"longest_forward_{args.shape}.json",
               {"benchmark": "longest_forward", "shape": args.shape, "total_layers": total_layers,
                "budget_s": args.budget_s, "rows": rows, "longest": longest, "stopped": done,
                "capacity_tokens_linear_fit": capacity, "environment": environment()})


if __name__ == "__main__":
    main()
