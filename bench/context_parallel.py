"""Issue 7 on two GPUs: one fine-tuning step with context parallelism + FSDP2 (`longrope.train.parallel`)
against one GPU, and the longest step each can run.

1. Equality at --check-length (fits one GPU). Four runs of the same step (float32 master
   weights, gradient checkpointing, chunked loss: what `longrope finetune` does):
   one GPU in float32, one GPU under bf16 autocast (rank 0 alone, an unsharded copy), then
   context parallel in float32 and under bf16 autocast (every rank). Reported: each loss, and per
   parameter the relative error of the gradient against the one-GPU float32 one. Context
   parallel in float32 shows the method is exact (summation order only); the bf16 runs show what
   "bf16 tolerance" is: context parallel under bf16 should be as far from float32 as one GPU
   under bf16 is.
2. Lengths doubling from --first-length, bf16 autocast: rank 0 alone (no collectives, so an
   out-of-memory error there is safe) until it runs out of memory; then every rank with context
   parallelism, stopping before a length whose predicted peak (linear in the length, from the
   last two) exceeds --memory-fraction of the GPU, since an out-of-memory error inside a
   collective would leave the other ranks waiting. Time and peak memory per rank.

Rank 0 writes the JSON after every row. Random weights of a real shape (`_common.SHAPES`: 8b,
1b, smollm2); a LongRoPE scaling to --target attached.

    torchrun --nproc-per-node 2 bench/context_parallel.py --shape 8b --out context_parallel.json
    LONGROPE_BENCH_SMOKE=1 torchrun --nproc-per-node 2 bench/context_parallel.py   # CPU, gloo, tiny
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time

import torch
import torch.distributed as dist

from _common import SHAPES, SMOKE, TINY, environment, fmt_len, random_llama, write_json
from longrope import distributed, models, train
from longrope import scaling as sc
from longrope.train import parallel


def build(shape: str, target: int, device: torch.device):
    torch.manual_seed(0)  # every rank, and rank 0's one-GPU copy, start from the same weights
    model = random_llama(shape, torch.float32, device)  # float32 master weights, as finetune keeps them
    info = models.rope_info(model.config)
    original = 64 if SMOKE else info.original_length
    factors = sc.yarn_factors(info.dim, info.base, original, target / original).tolist()
    # the smoke model is treated as trained at 64 on purpose
    models.attach(model, sc.LongRoPEScaling.from_target(factors, original, target), allow_context_mismatch=SMOKE)
    models.enable_checkpointing(model)
    return model.train()


def sharded(args, group, device):
    """The model every rank holds its FSDP2 shard of, attending with context parallelism."""
    model = build(args.shape, args.target, device)
    parallel.use_context_parallel_attention(model)
    return parallel.shard_model(model, group, args.chunk)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def release(device):
    gc.collect()  # a caught out-of-memory error keeps its frames' tensors in a cycle until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device, bf16: bool):
    # the smoke run on the CPU uses float32 throughout (CPU bf16 autocast is slow and beside the point)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def single_step(model, ids, chunk, device, bf16=True) -> tuple[float, float]:
    """(loss, seconds) of one forward + backward on one device."""
    sync(device)
    t = time.perf_counter()
    with autocast(device, bf16):
        nll, count = train.chunked_lm_loss(model, ids, chunk)
    (nll / count).backward()
    sync(device)
    return nll.item() / count, time.perf_counter() - t


def parallel_step(root, ids, device, bf16=True) -> tuple[float, float]:
    sync(device)
    t = time.perf_counter()
    with autocast(device, bf16):
        nll, count = root(ids)
    (nll * root.loss_scale / count).backward()
    loss = distributed.all_reduce_sum(nll).item() / count
    sync(device)
    return loss, time.perf_counter() - t


def grad_errors(grads, truth: dict | None) -> dict | None:
    """Relative error of each gradient of `grads` ((name, full gradient) pairs) against `truth`
    (None on ranks other than 0, which still iterate: each full gradient is a collective): max,
    median, worst name. Computed on the GPU one parameter at a time; 8B gradients compared on the
    CPU under torchrun's one thread took minutes."""
    errors = {}
    for name, g in grads:
        if truth is not None:
            t = truth[name]
            errors[name] = ((g.float() - t).norm() / t.norm().clamp_min(1e-30)).item()
    if truth is None:
        return None
    worst = max(errors, key=errors.get)
    return {"max": errors[worst], "median": sorted(errors.values())[len(errors) // 2], "worst": worst}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--target", type=int, default=2 * 1024 * 1024, help="the scaling's target length")
    p.add_argument("--check-length", type=int, default=4096)
    p.add_argument("--first-length", type=int, default=16384)
    p.add_argument("--cp-first-length", type=int, default=None,
                   help="first length of the context-parallel sweep (default: --first-length)")
    p.add_argument("--max-length", type=int, default=1 << 22)
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--chunk", type=int, default=4096, help="loss chunk")
    p.add_argument("--out", default="context_parallel.json")
    args = p.parse_args()
    if SMOKE:
        args.target, args.check_length, args.first_length, args.max_length, args.chunk = 512, 128, 256, 512, 32
    if not SMOKE:  # a rank stuck in a collective fails after this instead of waiting forever
        local = int(__import__("os").environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=datetime.timedelta(minutes=15))
    group = distributed.init("cpu" if SMOKE else "cuda")
    device = group.device
    vocab = (TINY if SMOKE else SHAPES[args.shape])["vocab_size"]
    ids_for = lambda n: torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else 24.0
    rows, report = [], {}
    started = time.perf_counter()

    def say(message):  # elapsed seconds on every line: a slow phase shows where the call's time went
        if group.is_main:
            print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    def save():
        if group.is_main:
            longest = {impl: max((r["n"] for r in rows if r["impl"] == impl and "seconds" in r), default=0)
                       for impl in {r["impl"] for r in rows}}
            write_json(args.out, {"benchmark": "context_parallel", "shape": args.shape, "world": group.world,
                                  "check": report, "rows": rows, "longest": longest, "environment": environment()})

    # 1. equality at a length one GPU holds
    ids = ids_for(args.check_length)
    truth = None
    if group.is_main:
        model = build(args.shape, args.target, device)
        say(f"built the one-GPU model; check at {fmt_len(args.check_length)}")
        loss32, _ = single_step(model, ids, args.chunk, device, bf16=False)
        truth = {n: q.grad for n, q in model.named_parameters()}  # float32, kept on the GPU
        model.zero_grad(set_to_none=True)
        loss16, _ = single_step(model, ids, args.chunk, device, bf16=True)
        report.update(length=args.check_length, loss_one_gpu_fp32=loss32, loss_one_gpu_bf16=loss16,
                      grad_one_gpu_bf16=grad_errors(((n, q.grad) for n, q in model.named_parameters()), truth))
        del model
        say("one GPU: float32 and bf16 steps done")
    release(device)
    dist.barrier()
    root = sharded(args, group, device)
    for bf16, name in ((False, "fp32"), (True, "bf16")):
        loss, _ = parallel_step(root, ids, device, bf16=bf16)
        errors = grad_errors(parallel.iter_full_gradients(root), truth)  # every rank gathers
        root.zero_grad(set_to_none=True)
        if group.is_main:
            report[f"loss_context_parallel_{name}"] = loss
            report[f"grad_context_parallel_{name}"] = errors
        say(f"context parallel {name} step done")
    if group.is_main:
        r = report
        say(f"{fmt_len(args.check_length)}: loss one GPU fp32 {r['loss_one_gpu_fp32']:.6f} bf16 {r['loss_one_gpu_bf16']:.6f}; "
              f"context parallel fp32 {r['loss_context_parallel_fp32']:.6f} bf16 {r['loss_context_parallel_bf16']:.6f}")
        for key in ("grad_context_parallel_fp32", "grad_one_gpu_bf16", "grad_context_parallel_bf16"):
            print(f"  gradient vs one GPU fp32, {key[5:]}: max {r[key]['max']:.2e} ({r[key]['worst']}), "
                  f"median {r[key]['median']:.2e}")
    del truth
    save()

    # 2. the longest step: one GPU alone (rank 0; only the unsharded model on it), then context parallel
    del root
    release(device)
    n = args.first_length
    if group.is_main:
        single = build(args.shape, args.target, device)
        while n <= args.max_length:
            release(device)
            try:
                loss, seconds = single_step(single, ids_for(n), args.chunk, device)
                row = {"impl": "one GPU", "n": n, "loss": loss, "seconds": seconds, "peak_gib": peak_gib(device)}
            except Exception as exc:  # noqa: BLE001 - out of memory is the expected end
                if not is_oom(exc):
                    raise
                row = {"impl": "one GPU", "n": n, "oom": True, "peak_gib": peak_gib(device)}
            single.zero_grad(set_to_none=True)
            rows.append(row)
            say(row)
            save()
            if row.get("oom"):
                break
            n *= 2
        del single
    release(device)
    dist.barrier()
    root = sharded(args, group, device)
    n, fits = args.cp_first_length or args.first_length, []  # fits: (n, largest peak over the ranks) of the runs so far
    while n <= args.max_length:
        if len(fits) >= 2:
            (n0, p0), (n1, p1) = fits[-2:]
            predicted = p1 + (p1 - p0) / (n1 - n0) * (n - n1)
            if predicted > args.memory_fraction * gpu_gib:
                say(f"stopping before {fmt_len(n)}: predicted peak {predicted:.1f} GiB per rank "
                    f"> {args.memory_fraction:.0%} of {gpu_gib:.0f} GiB")
                rows.append({"impl": f"context parallel ×{group.world}", "n": n, "skipped": True,
                             "predicted_peak_gib": predicted})
                break
        release(device)
        loss, seconds = parallel_step(root, ids_for(n), device)
        peaks = [None] * group.world
        dist.all_gather_object(peaks, peak_gib(device))
        root.zero_grad(set_to_none=True)
        rows.append({"impl": f"context parallel ×{group.world}", "n": n, "loss": loss, "seconds": seconds,
                     "peak_gib_per_rank": peaks})
        fits.append((n, max(peaks)))
        say(rows[-1])
        save()
        n *= 2
    if group.is_main:
        one = max((r["n"] for r in rows if r["impl"] == "one GPU" and "seconds" in r), default=0)
        many = max((r["n"] for r in rows if r["impl"].startswith("context") and "seconds" in r), default=0)
        say(f"longest step: one GPU {fmt_len(one)}, context parallel ×{group.world} {fmt_len(many)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
