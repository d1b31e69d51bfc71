"""(issue 5) Search candidates evaluated one at a time vs K at a time in one batched forward
(`longrope search --batch-candidates K`, `search.Batched`): the same candidates (the search's
initial population: PI, NTK, YaRN and mutations of them) on the same windows, in one process.
Prints seconds per candidate, the speed-up over serial and the largest relative difference of
the perplexities from the serial ones; writes a JSON.

    python bench/batched_search.py SmolLM2-135M-Instruct.Q4_1.gguf --data tdavid_segments.jsonl.gz \
        --lengths 16k,64k --samples 3 --candidates 32 --ks 2,4,8 --out batched-search.json

LONGROPE_BENCH_SMOKE=1 python bench/batched_search.py x --data bundled   # CPU, tiny random model
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from _common import SMOKE, environment, fmt_len, measured, ratio, require_cuda, write_json
from longrope import data, models
from longrope import search as S
from longrope.cli import parse_length


def smoke_model_dir() -> str:
    """A tiny random Llama (context 64) with the byte tokenizer, saved to a temporary folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longrope.testing import save_tiny_model

    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="batched-search-smoke-")
    save_tiny_model(LlamaForCausalLM(config).eval(), path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="SmolLM2-135M GGUF path (or any --model spec; ignored in smoke mode)")
    p.add_argument("--data", required=True, help="documents (any `longrope search --data` source)")
    p.add_argument("--lengths", default="16k", help="target lengths, comma-separated (e.g. 16k,64k)")
    p.add_argument("--samples", type=int, default=3, help="windows (documents) per candidate")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--ks", default="2,4,8", help="candidates per batched forward")
    p.add_argument("--max-batch", type=int, default=None, help="sequences per forward (default: K × samples)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="positions per chunk (default: the lean forward's own choice, lean.layer_chunk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="batched_search.json")
    args = p.parse_args()
    device = require_cuda("batched_search")
    spec = smoke_model_dir() if SMOKE else args.model
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    if SMOKE:
        lengths, args.candidates, args.samples, args.chunk_size = [256], min(args.candidates, 6), 2, 64
    ks = [int(k) for k in args.ks.split(",")]
    model, tokenizer = models.load(spec, dtype=torch.float32 if SMOKE else torch.bfloat16, device=device)
    info = models.rope_info(model.config)
    docs = data.load_tokenized(args.data, tokenizer)

    rows = []
    print(f"{'length':>7} {'mode':>9} {'s/cand':>8} {'speed-up':>8} {'max rel diff':>12} {'peak GiB':>8}")
    for length in lengths:
        space = S.SearchSpace(info.dim, info.base, info.original_length, length)
        genomes = S.initial_population(space, np.random.default_rng(args.seed),
                                       S.SearchConfig(population=args.candidates, seed=args.seed))
        scalings = [space.scaling(g) for g in genomes][:args.candidates]
        chosen = data.select(docs, length, args.samples, seed=args.seed)
        windows = [torch.as_tensor(d.tokens[:length], dtype=torch.long).to(device) for d in chosen]
        fitness = S.model_fitness(model, windows, args.chunk_size)
        # warm-up (Triton compiles, allocator): one serial candidate, one batched pair
        fitness(scalings[0])
        S.Batched(model, windows, 2, args.chunk_size, args.max_batch)(scalings[:2])

        serial: dict = {"mode": "serial", "k": 1}
        with measured(serial):
            reference = [fitness(s) for s in scalings]
        serial.update(values=reference)
        results = [serial]
        for k in ks:
            row: dict = {"mode": f"batch {k}", "k": k}
            evaluator = S.Batched(model, windows, k, args.chunk_size, args.max_batch)
            values: list[float] = []
            with measured(row):
                for i in range(0, len(scalings), k):
                    values.extend(evaluator(scalings[i:i + k]))
            if not row["oom"]:
                row.update(values=values, max_rel_diff=max(abs(a - b) / abs(a) for a, b in zip(reference, values)))
            results.append(row)
        for row in results:
            row.update(length=length, windows=len(windows), candidates=len(scalings))
            if row["oom"]:
                print(f"{fmt_len(length):>7} {row['mode']:>9} {'OOM':>8}")
                continue
            row["seconds_per_candidate"] = row["seconds"] / len(scalings)
            row["speedup"] = ratio(serial["seconds"], row["seconds"])
            print(f"{fmt_len(length):>7} {row['mode']:>9} {row['seconds_per_candidate']:8.3f} {row['speedup']:7.2f}x "
                  f"{row.get('max_rel_diff', 0.0):12.2e} {row['peak_gib']:8.2f}")
        rows.extend(results)
    write_json(args.out, {"benchmark": "batched_search", "model": args.model if not SMOKE else "tiny (smoke)",
                          "data": args.data, "samples": args.samples, "chunk_size": args.chunk_size,
                          "max_batch": args.max_batch, "seed": args.seed, "environment": environment(),
                          "rows": rows})


if __name__ == "__main__":
    main()
