"""Issue 16's speed target: one fine-tuning step of ours beside a stock transformers training step,
side by side in one run, on a SmolLM2-135M-shaped Llama with random weights (one GPU).

- stock: the model in bf16, SDPA, transformers' activation checkpointing, `model(ids, labels=ids).loss`,
  backward, AdamW (fused);
- ours: what `longrope finetune` runs per step (float32 master weights, bf16 autocast, the
  chunked loss of `train.chunked_lm_loss` that never builds (tokens × vocab) logits,
  `loop.make_optimizer`, and from 32k on selective checkpointing that keeps the attention output,
  below it whole layers recomputed), with a LongRoPE scaling attached;
- ours, whole layers / ours, attention kept: the same with every layer recomputed whole
  (attention too), or selectively at every length;
- ours, compiled: the same as ours with `--compile-layers` (each decoder layer compiled by inductor; the
  warm-up step compiles);
- ours, compiled, fused loss: that with `--fused-loss` too (Liger's fused linear cross-entropy; only
  where liger-kernel is installed);
- ours, cuDNN first: the same as ours with SDPA preferring cuDNN's attention kernel (--sdpa-backends);
- attention alone: only the model's 30 causal SDPA calls (bf16, GQA) forward and backward, once
  each, nothing else: the floor of any step that runs these kernels at this length, whatever
  else it saves. Its ratio to stock says what time ratio is reachable at all.

Per length: the median seconds of --steps steps after one warm-up step, and the peak memory
allocated during them; the ratios of each of ours to stock. The target: ≤ 0.7× the time, ≤ 0.5× the memory at 64k.

    python bench/finetune_step.py --lengths 16k,32k,64k --out finetune_step.json
    python bench/finetune_step.py --lengths 64k --profile   # and where our step's time goes, kernel by kernel
    LONGROPE_BENCH_SMOKE=1 python bench/finetune_step.py --lengths 256 --steps 1   # a CPU check of the script
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import (DEVICE, SHAPES, SMOKE, TINY, environment, fmt_len, measured, random_llama, ratio, require_cuda,
                     sync, write_json)
from longrope import lean, models, nll, train
from longrope import scaling as sc
from longrope.cli import parse_lengths
from longrope.train.finetune import checkpointing_keeps_attention


def stock_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def our_step(model, optimizer, ids, cfg) -> None:
    with train.loop.autocast(ids.device, cfg.dtype):
        summed, targets = train.chunked_lm_loss(model, ids, cfg.loss_chunk, fused=cfg.fused_loss)
    (summed / targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_steps(step, steps: int) -> dict:
    """One warm-up step, then `steps` timed ones inside `measured` (peak memory of them all)."""
    step()
    result, seconds = {}, []
    with measured(result):
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - t)
    if not result.get("oom"):
        result["seconds_per_step"] = statistics.median(seconds)
    return result


def stock(length: int, steps: int) -> dict:
    model = random_llama("smollm2", torch.bfloat16).train()
    model.config.use_cache = False
    models.enable_checkpointing(model)  # transformers' own, under its current name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=not SMOKE)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE())
    try:
        return timed_steps(lambda: stock_step(model, optimizer, ids), steps)
    finally:
        del model, optimizer


def build_ours(length: int, steps: int, keep_attention: bool | None = None, compiled: bool = False,
               fused: bool = False):
    """(model, optimizer, step, config) of our fine-tuning step; keep_attention None: as `longrope
    finetune` chooses for `length`; compiled: with --compile-layers; fused: with --fused-loss."""
    if keep_attention is None:
        keep_attention = checkpointing_keeps_attention(length)
    model = random_llama("smollm2", torch.float32)
    info = models.rope_info(model.config)
    cfg = train.FinetuneConfig(seq_len=length, steps=steps, device=str(DEVICE()),
                               dtype="float32" if SMOKE else "bfloat16", fused_loss=fused).validate()
    cfg = cfg.for_model(sum(p.numel() for p in model.parameters()))  # the default lr, as `finetune` resolves it
    if length > info.original_length:
        models.attach(model, sc.make("longrope", info.original_length, length, dim=info.dim, base=info.base))
    model.config.use_cache = False
    models.enable_checkpointing(model, keep_attention=keep_attention)
    if compiled:
        models.compile_layers(model)
    model.train()
    train.loop.allow_tf32(DEVICE())
    optimizer = train.loop.make_optimizer(model, cfg, DEVICE())
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE())
    return model, optimizer, (lambda: our_step(model, optimizer, ids, cfg)), cfg


def ours(length: int, steps: int, keep_attention: bool | None = None, backends: str | None = None,
         compiled: bool = False, fused: bool = False) -> dict:
    """One of our steps; keep_attention None: as `longrope finetune` chooses for `length`. The
    warm-up step of a compiled one compiles."""
    model, optimizer, step, cfg = build_ours(length, steps, keep_attention, compiled, fused)
    try:
        with lean.sdpa_preference(backends, DEVICE()):
            return {**timed_steps(step, steps), "loss_chunk": cfg.loss_chunk}
    finally:
        del model, optimizer, step


# what a kernel (CUDA) or op (CPU) is, by its name: cuDNN's, flash's and the CPU's attention kernels; cuBLAS's
# nvjet/gemm kernels and aten's mm; everything else (elementwise, norms, casts, softmax, optimizer) is "other"
KINDS = {"attention": ("sdpa", "flash", "fmha", "attention"), "matmul": ("nvjet", "gemm", "cutlass", "aten::mm",
                                                                         "aten::addmm", "aten::bmm")}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KINDS.items() if any(m in low for m in marks)), "other")


def profile_ours(length: int, top: int = 40, compiled: bool = False, fused: bool = False) -> dict:
    """Where one of our steps spends its time: torch.profiler over one step after a warm-up. On CUDA
    the kernels (each op's own device time would count them twice), on the CPU the ops, by their
    own time: the largest `top`, and the sums by kind (attention, matmul, other)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, step, _ = build_ours(length, 1, compiled=compiled, fused=fused)
    cuda = DEVICE().type == "cuda"
    try:
        step()
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            sync()
    finally:
        del model, optimizer, step
    if cuda:
        events = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e[2], reverse=True)
    by_kind = {kind: 0.0 for kind in (*KINDS, "other")}
    for name, _, us in events:
        by_kind[kind_of(name)] += us / 1e3
    return {"length": length, "timer": "device (kernels)" if cuda else "cpu (ops)",
            "total_ms": sum(by_kind.values()), "ms_by_kind": by_kind,
            "top": [{"name": name, "kind": kind_of(name), "calls": count, "self_ms": us / 1e3}
                    for name, count, us in events[:top]]}


def attention_alone(length: int, steps: int) -> dict:
    """The attention kernels of one step of the SmolLM2 shape: per layer one causal SDPA forward
    (query heads sharing key/value heads, as the model's) and its backward."""
    shape = {**SHAPES["smollm2"], **(TINY if SMOKE else {})}
    heads, kv_heads, dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    dtype = torch.float32 if SMOKE else torch.bfloat16
    q, k, v = (torch.randn(1, h, length, dim, device=DEVICE(), dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))

    def step():
        for _ in range(shape["num_hidden_layers"]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out.backward(torch.ones_like(out))

    try:
        return timed_steps(step, steps)
    finally:
        del q, k, v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("16k,32k,64k"))
    p.add_argument("--steps", type=int, default=3, help="timed steps per length and implementation (default 3)")
    p.add_argument("--out", default="finetune_step.json")
    p.add_argument("--profile", action="store_true",
                   help="also profile one of our steps at the longest length: its kernels by their own time")
    p.add_argument("--sdpa-backends", default="cudnn,flash,efficient",
                   help="the SDPA preference of the 'ours, cuDNN first' row ('' to skip it)")
    args = p.parse_args()
    require_cuda("finetune_step")
    variants = {"ours": {}, "ours, whole layers": {"keep_attention": False},
                "ours, attention kept": {"keep_attention": True}, "ours, compiled": {"compiled": True}}
    why_not_fused = nll.fused_nll_available()  # None: Liger installed, on CUDA
    fused = why_not_fused is None
    if fused:
        variants["ours, compiled, fused loss"] = {"compiled": True, "fused": True}
    else:
        print(f"no 'ours, compiled, fused loss' row: --fused-loss {why_not_fused}")
    if args.sdpa_backends:
        variants["ours, cuDNN first"] = {"backends": args.sdpa_backends}
    rows = []
    for n in args.lengths:
        row = {"length": n, "stock": stock(n, args.steps)}
        s = row["stock"]
        line = [f"{fmt_len(n)}: stock {s.get('seconds_per_step', float('nan')):.3f} s {s['peak_gib']:.1f} GiB"
                f"{' (oom)' if s.get('oom') else ''}"]
        for name, kwargs in variants.items():
            o = row[name] = ours(n, args.steps, **kwargs)
            if not (s.get("oom") or o.get("oom")):
                o["time_ratio"] = ratio(o["seconds_per_step"], s["seconds_per_step"])
                o["memory_ratio"] = ratio(o["peak_gib"], s["peak_gib"])
            line.append(f"{name} {o.get('seconds_per_step', float('nan')):.3f} s {o['peak_gib']:.1f} GiB"
                        f"{' (oom)' if o.get('oom') else ''} (time {o.get('time_ratio', float('nan')):.2f}x, "
                        f"memory {o.get('memory_ratio', float('nan')):.2f}x)")
        a = row["attention alone"] = attention_alone(n, args.steps)
        if not (s.get("oom") or a.get("oom")):
            a["time_ratio"] = ratio(a["seconds_per_step"], s["seconds_per_step"])
        line.append(f"attention alone {a.get('seconds_per_step', float('nan')):.3f} s "
                    f"({a.get('time_ratio', float('nan')):.2f}x stock)")
        rows.append(row)
        print("; ".join(line), flush=True)
    payload = {"environment": environment(), "steps": args.steps, "rows": rows}
    if args.profile:
        profiles = [("profile", False, False), ("profile, compiled", True, False)]
        profiles += [("profile, compiled, fused loss", True, True)] if fused else []
        for name, compiled, fused_loss in profiles:
            prof = payload[name] = profile_ours(max(args.lengths), compiled=compiled, fused=fused_loss)
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in prof["ms_by_kind"].items())
            print(f"{name} of ours at {fmt_len(prof['length'])}: {prof['total_ms']:.1f} ms of {prof['timer']} time "
                  f"({kinds})")
            for r in prof["top"][:20]:
                print(f"  {r['self_ms']:9.2f} ms  {r['calls']:5d}x  {r['name'][:110]}")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
