import sys, time, torch
sys.path.insert(0, "src")
from longrope import train
docs = train.load_documents([".gpu_bench/books.jsonl.gz"], exclude_ids=["tdavid/full", "austen/persuasion"])
stream = train.token_stream(docs)
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
for B, comp in [(128, False), (256, False), (512, False), (256, True), (512, True)]:
    cfg = train.PretrainConfig(batch_size=B, steps=1000, device="cuda", dtype="bfloat16", compile=comp)
    model = train.build_model(cfg).to(dev)
    opt = train.make_optimizer(model, cfg, dev)
    fwd = torch.compile(model) if comp else model
    t_batch = 0.0
    def step(i):
        global t_batch
        t0 = time.perf_counter()
        b = train.make_batch(stream, cfg, i)
        t_batch += time.perf_counter() - t0
        b = b.pin_memory().to(dev, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train.lm_loss(fwd, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    t0 = time.perf_counter()
    for i in range(10): step(i)
    torch.cuda.synchronize(); warm = time.perf_counter() - t0
    t_batch = 0.0
    t0 = time.perf_counter()
    n = 40
    for i in range(10, 10 + n): loss = step(i)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    print(f"B={B} compile={comp}: {dt/n*1e3:.1f} ms/step, {n*B*256/dt/1e6:.2f}M tok/s, batch-prep {t_batch/n*1e3:.2f} ms/step, warmup {warm:.1f}s, loss {float(loss):.3f}, mem {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)
