"""(a') Our perplexity forward at one length, all layers, resumable across processes: for a full
Llama-3-8B-shaped forward at 1M tokens, which takes about as long as one device call may last.

After each decoder layer, if --budget-s has been spent, the residual stream (n × hidden bf16:
8 GiB at 1M for the 8B shape) is saved with the layer index, the seconds and the peak memory so
far, and the script exits with code 3; the same command continues from there. Time excludes
saving and loading; peak memory is the largest of the runs. The weights are random but seeded,
so every run builds the same model (the smoke run below checks that a split forward gives the
unsplit one's loss).

    python bench/resumable_forward.py --shape 8b --length 1048576 --state ~/lf8b --out lf8b-1m.json
    # exit code 3: run the same command again (within the machine's lifetime) to finish
    LONGROPE_BENCH_SMOKE=1 python bench/resumable_forward.py --length 512 --state /tmp/s --budget-s 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from _common import (SMOKE, environment, fmt_len, peak_gib, random_llama, require_cuda, swap_rotary, sync,
                     write_json)
from longrope import evaluate, lean


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["8b", "1b"], default="8b")
    p.add_argument("--length", type=int, default=1 << 20)
    p.add_argument("--state", required=True, help="folder for the saved residual stream (local disk)")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop after the layer that passes this")
    p.add_argument("--sdpa-backends", default=None, help="e.g. cudnn,flash (default: torch's choice)")
    p.add_argument("--out", default="resumable_forward.json")
    args = p.parse_args()
    device = require_cuda("resumable_forward")
    lean.set_sdpa_backends(args.sdpa_backends)
    torch.manual_seed(0)  # the same random weights in every run
    model = random_llama(args.shape)
    swap_rotary(model)  # our rotary (the fused kernel on CUDA)
    layers = model.config.num_hidden_layers
    n = args.length
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    state_path = os.path.join(args.state, f"{args.shape}-{n}.pt")
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location=device, weights_only=True)
        hidden, first = state["hidden"], state["layer"]
        seconds, peak, runs = state["seconds"], state["peak_gib"], state["runs"] + 1
        print(f"resuming at layer {first}/{layers} ({seconds:.1f} s so far)")
    else:
        hidden, first, seconds, peak, runs = None, 0, 0.0, 0.0, 1
    if not SMOKE:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        if hidden is None:
            hidden = model.model.embed_tokens(ids)
        for layer in range(first, layers):
            lean.run_layers(model, hidden, range(layer, layer + 1))
            sync()
            spent = time.perf_counter() - t
            print(f"layer {layer + 1}/{layers}: {seconds + spent:.1f} s", flush=True)
            if spent > args.budget_s and layer + 1 < layers:
                os.makedirs(args.state, exist_ok=True)
                tmp = state_path + ".tmp"
                torch.save({"hidden": hidden, "layer": layer + 1, "seconds": seconds + spent,
                            "peak_gib": max(peak, peak_gib()), "runs": runs}, tmp)
                os.replace(tmp, state_path)
                print(f"budget spent after layer {layer + 1}: state saved to {state_path}; run the same command again")
                sys.exit(3)
        lean.final_norm_(model, hidden)
        nll = evaluate.nll_of_hidden(model, hidden[0], ids)
    sync()
    seconds += time.perf_counter() - t
    peak = max(peak, peak_gib())
    print(f"{args.shape} {fmt_len(n)}: all {layers} layers in {seconds:.1f} s over {runs} run(s), peak {peak:.2f} GiB, "
          f"nll/token {nll / (n - 1):.4f}")
    write_json(args.out, {"benchmark": "resumable_forward", "shape": args.shape, "n": n, "layers": layers,
                          "seconds": seconds, "runs": runs, "peak_gib": peak, "nll_per_token": nll / (n - 1),
                          "sdpa_backends": args.sdpa_backends, "environment": environment()})
    if os.path.exists(state_path):
        os.remove(state_path)


if __name__ == "__main__":
    main()
