"""(c) The rotary step alone at 128k and 1M positions, Llama-3-8B attention shape (q: 32 heads,
k: 8 heads, head_dim 128, bf16), a LongRoPE scaling to 2M: time and peak memory of

- fused: our Triton kernel (ScaledRotaryEmbedding.rotate on CUDA), in place, no cos/sin table;
- reference: our PyTorch path (float64 angles mod 2π -> float32 cos/sin -> apply_rotary);
- transformers: LlamaRotaryEmbedding (rope_type longrope, the same factors) + apply_rotary_pos_emb.

Peak memory is what the step allocates beyond its inputs. Also reported: the largest cos error
at the last position against float64, for our angles and transformers' float32 product.

    python bench/rotary_step.py --out rotary-step.json
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import GiB, SMOKE, environment, fmt_len, ratio, require_cuda, sync, write_json
from longrope import models
from longrope import scaling as sc
from longrope.phase import phase_constants, split_angles
from longrope.rotary import ScaledRotaryEmbedding


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB allocated beyond what was live before) of fn()."""
    fn()  # warm-up (Triton compiles here)
    times = []
    for _ in range(repeats):
        sync()
        if not SMOKE:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = 0 if SMOKE else torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
        del out
    peak = 0.0 if SMOKE else (torch.cuda.max_memory_allocated() - before) / GiB
    return sorted(times)[len(times) // 2], peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="131072,1048576")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="rotary_step.json")
    args = p.parse_args()
    device = require_cuda("rotary_step")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, kv_heads, head_dim, base, original = 32, 8, 128, 500000.0, 8192
    if SMOKE:
        heads, kv_heads, head_dim = 4, 2, 32
    target = 2 * 1024 * 1024
    scaling = sc.LongRoPEScaling.from_target(sc.yarn_factors(head_dim, base, original, target / original).tolist(),
                                             original, target)
    ours = ScaledRotaryEmbedding(scaling, head_dim, base)
    info = models.RopeInfo(dim=head_dim, base=base, original_length=original)
    rope_parameters, max_positions = models.hf_rope_parameters(scaling, info)
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=max_positions, rope_parameters=rope_parameters)
    hf = LlamaRotaryEmbedding(config).to(device)
    rows = []
    print(f"{'length':>7} {'impl':12} {'ms':>9} {'extra GiB':>10}")
    for n in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(n, heads, head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(n, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        positions = torch.arange(n, device=device)

        def transformers_step():  # its own layout: (1, heads, n, d) views of the projections
            cos, sin = hf(q, positions[None])
            return apply_rotary_pos_emb(q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin)

        steps = {
            "fused": lambda: ours.rotate(q, k, positions, n, fused=not SMOKE),  # in place: rotates q, k again each time
            "reference": lambda: ours.rotate(q, k, positions, n, fused=False),
            "transformers": transformers_step,
        }
        result = {}
        for name, fn in steps.items():
            seconds, peak = timed(fn, args.repeats)
            result[name] = {"seconds": seconds, "extra_peak_gib": peak}
            rows.append({"n": n, "impl": name, "seconds": seconds, "extra_peak_gib": peak})
            print(f"{fmt_len(n):>7} {name:12} {seconds * 1e3:9.3f} {peak:10.3f}")
        print(f"{fmt_len(n):>7} fused vs transformers: time {ratio(result['fused']['seconds'], result['transformers']['seconds']):.3f}x, "
              f"extra memory {ratio(result['fused']['extra_peak_gib'], result['transformers']['extra_peak_gib']):.3f}x")
        del q, k
    # precision at the last position of the longest length
    last = max(int(x) for x in args.lengths.split(",")) - 1
    inv = scaling.inv_freq(head_dim, base, last + 1)
    exact = torch.cos(torch.tensor(float(last), dtype=torch.float64) * inv)
    ours_cos = split_angles(torch.tensor([last]), phase_constants(inv))[0].double().cos()
    hf_cos = hf(torch.zeros(1, device=device), torch.tensor([[last]], device=device))[0][0, 0, :head_dim // 2]
    precision = {"position": last, "ours_cos_err": (ours_cos - exact).abs().max().item(),
                 "transformers_cos_err": (hf_cos.double().cpu() / scaling.attention_factor() - exact).abs().max().item()}
    print(f"cos error at position {last}: fused {precision['ours_cos_err']:.2e}, "
          f"transformers {precision['transformers_cos_err']:.2e} (float64 reference)")
    write_json(args.out, {"benchmark": "rotary_step", "shape": {"heads": heads, "kv_heads": kv_heads,
                                                                 "head_dim": head_dim}, "scaling": scaling.to_dict(),
                          "rows": rows, "precision": precision, "environment": environment()})


if __name__ == "__main__":
    main()
