"""Issue 7 on two GPUs: one fine-tuning step with context parallelism + FSDP2 (`longrope.parallel`)
against one GPU, and the longest step each can run.

1. At --check-length (fits one GPU): rank 0 runs the step alone on an unsharded copy (float32
   master weights, bf16 autocast, gradient checkpointing, chunked loss: what `longrope finetune`
   does); then both ranks run it with context parallelism. Reported: the loss of each, and per
   parameter the relative error of the gathered gradient (bf16 tolerance).
2. Lengths doubling from --first-length: rank 0 alone until it runs out of memory, then both ranks
   together until they do; time and peak memory per rank.

Random weights of a real shape (`_common.SHAPES`: 8b, 1b, smollm2); a LongRoPE
scaling to --target attached.

    torchrun --nproc-per-node 2 bench/context_parallel.py --shape 1b --out context_parallel.json
    LONGROPE_BENCH_SMOKE=1 torchrun --nproc-per-node 2 bench/context_parallel.py   # CPU, gloo, tiny
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from _common import SHAPES, SMOKE, TINY, environment, fmt_len, random_llama, write_json
from longrope import models, parallel, train
from longrope import scaling as sc


def build(shape: str, target: int, device: torch.device):
    torch.manual_seed(0)  # every rank, and rank 0's one-GPU copy, start from the same weights
    model = random_llama(shape, torch.float32, device)  # float32 master weights, as finetune keeps them
    info = models.rope_info(model.config)
    original = 64 if SMOKE else info.original_length
    factors = sc.yarn_factors(info.dim, info.base, original, target / original).tolist()
    models.attach(model, sc.LongRoPEScaling.from_target(factors, original, target))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def single_step(model, ids, chunk, device) -> tuple[float, float]:
    """(loss, seconds) of one forward + backward on one device."""
    sync(device)
    t = time.perf_counter()
    with autocast(device):
        nll, count = train.chunked_lm_loss(model, ids, chunk)
    (nll / count).backward()
    sync(device)
    return nll.item() / count, time.perf_counter() - t


def parallel_step(root, group, ids, device) -> tuple[float, float]:
    sync(device)
    t = time.perf_counter()
    with autocast(device):
        nll, count = root(ids)
    (nll * group.loss_scale / count).backward()
    loss = parallel.all_reduce_sum(nll).item() / count
    sync(device)
    return loss, time.perf_counter() - t


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--target", type=int, default=2 * 1024 * 1024, help="the scaling's target length")
    p.add_argument("--check-length", type=int, default=32768)
    p.add_argument("--first-length", type=int, default=65536)
    p.add_argument("--max-length", type=int, default=1 << 22)
    p.add_argument("--chunk", type=int, default=4096, help="loss chunk")
    p.add_argument("--out", default="context_parallel.json")
    args = p.parse_args()
    if SMOKE:
        args.target, args.check_length, args.first_length, args.max_length, args.chunk = 512, 128, 256, 512, 32
    group = parallel.init("cpu" if SMOKE else "cuda")
    device = group.device
    vocab = (TINY if SMOKE else SHAPES[args.shape])["vocab_size"]
    ids_for = lambda n: torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    rows, report = [], {}

    # 1. equality at a length one GPU holds
    ids = ids_for(args.check_length)
    reference = None
    if group.is_main:
        model = build(args.shape, args.target, device)
        loss, _ = single_step(model, ids, args.chunk, device)
        reference = (loss, {n: q.grad.float().cpu() for n, q in model.named_parameters()})
        del model
        reset(device)
    dist.barrier()
    model = build(args.shape, args.target, device)
    parallel.use_context_parallel_attention(model)
    root = parallel.shard_model(model, group, args.chunk)
    loss, _ = parallel_step(root, group, ids, device)
    grads = parallel.full_gradients(root)
    if group.is_main:
        errors = {n: ((grads[n].float() - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in reference[1].items()}
        worst = max(errors, key=errors.get)
        report["check"] = {"length": args.check_length, "loss_one_gpu": reference[0], "loss_context_parallel": loss,
                           "loss_rel_diff": abs(loss - reference[0]) / reference[0],
                           "grad_rel_err_max": errors[worst], "grad_rel_err_worst_param": worst,
                           "grad_rel_err_median": sorted(errors.values())[len(errors) // 2]}
        print(f"{fmt_len(args.check_length)}: loss one GPU {reference[0]:.5f}, context parallel {loss:.5f}; "
              f"gradient relative error max {errors[worst]:.2e} ({worst}), median "
              f"{report['check']['grad_rel_err_median']:.2e}")
    root.zero_grad(set_to_none=True)
    del grads, reference

    # 2. the longest step: one GPU (rank 0; the unsharded model), then context parallel
    n, single_ok = args.first_length, True
    single = build(args.shape, args.target, device) if group.is_main else None
    while n <= args.max_length:
        ids = ids_for(n)
        if single_ok:  # every rank agrees on whether rank 0 still fits
            result = [None]
            if group.is_main:
                reset(device)
                try:
                    loss, seconds = single_step(single, ids, args.chunk, device)
                    result[0] = {"impl": "one GPU", "n": n, "loss": loss, "seconds": seconds, "peak_gib": peak_gib(device)}
                except Exception as exc:  # noqa: BLE001 - out of memory is the expected end
                    if not is_oom(exc):
                        raise
                    result[0] = {"impl": "one GPU", "n": n, "oom": True}
                single.zero_grad(set_to_none=True)
                reset(device)
            dist.broadcast_object_list(result, src=0)
            rows.append(result[0])
            single_ok = not result[0].get("oom")
            if group.is_main:
                print(result[0])
        reset(device)
        try:
            loss, seconds = parallel_step(root, group, ids, device)
            row = {"impl": f"context parallel ×{group.world}", "n": n, "loss": loss, "seconds": seconds,
                   "peak_gib_per_rank": [None] * group.world}
            peaks = [None] * group.world
            dist.all_gather_object(peaks, peak_gib(device))
            row["peak_gib_per_rank"] = peaks
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            row = {"impl": f"context parallel ×{group.world}", "n": n, "oom": True}
        root.zero_grad(set_to_none=True)
        rows.append(row)
        if group.is_main:
            print(row)
        if row.get("oom"):
            break
        n *= 2
    if group.is_main:
        longest = {impl: max((r["n"] for r in rows if r["impl"] == impl and not r.get("oom")), default=0)
                   for impl in {r["impl"] for r in rows}}
        print("longest step:", {k: fmt_len(v) for k, v in longest.items()})
        write_json(args.out, {"benchmark": "context_parallel", "shape": args.shape, "world": group.world,
                              "check": report.get("check"), "rows": rows, "longest": longest,
                              "environment": environment()})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
