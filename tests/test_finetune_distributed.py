"""Fine-tuning over two processes (gloo on the CPU): context parallelism + FSDP2 give the loss,
the gradients and the trained weights of one process, and resume after an interruption.

The ranks are started with torch.multiprocessing and the environment torchrun would set
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so `train.finetune` takes its torchrun path.
"""

from __future__ import annotations

import pytest
import json
import os
import pickle
import socket
from pathlib import Path

import torch

from conftest import ORIGINAL, tiny_model
from longrope import distributed, models, train
from longrope import scaling as sc
from longrope.errors import UsageError
from longrope.tokenization import byte_tokenizer
from longrope.train import parallel, retention
from test_finetune import SEQ, Stop, config, packed_data
from test_finetune_retrieval import needles

WORLD = 2
MIXED = config(steps=4, checkpoint_every=10, short_share=0.5, distill_weight=0.5, needle_every=2, doc_mask=True)
PASSKEY_SEQ = 512  # the passkey prompt needs ~250 byte tokens
CHECKED = config(steps=2, seq_len=PASSKEY_SEQ, batch_size=1, passkey_every=2, checkpoint_every=10)


def passkey_run(folder: Path) -> list:
    """A short run at PASSKEY_SEQ with --passkey-every 2; its log's passkey entries."""
    scaling = sc.make("longrope", ORIGINAL, PASSKEY_SEQ, dim=16, base=10000.0)
    train.finetune(tiny_model(), byte_tokenizer(), scaling, packed_data(PASSKEY_SEQ, n_docs=6, n_words=200), CHECKED,
                   folder, command="test")
    log = [json.loads(line) for line in (folder / train.LOG).read_text().splitlines()]
    return [(e["step"], e["passkey"], e["passkey_by_depth"]) for e in log if "passkey" in e]


# GQA; q/k norms; fused qkv with partial rotary (rotary dim 8); input and output embeddings tied
# (SmolLM2's layout: one parameter in two places of the root FSDP unit)
ARCHS = ("llama", "qwen3", "phi3", "llama-tied")


def _tiny(arch: str):
    return tiny_model("llama", tie_word_embeddings=True) if arch == "llama-tied" else tiny_model(arch)


def scaling(dim: int = 16):  # n̂ > 0: rank 0 alone holds the start positions
    return sc.make("longrope", ORIGINAL, SEQ, dim=dim, base=10000.0).replace(n_hat=8)


def one_step(arch: str, group=None, autocast: bool = False, answers: bool = False, short: bool = False,
             documents: bool = False):
    """(loss, {name: gradient}) of one step on a fixed batch: one process, or this rank's part;
    `autocast`: bf16 autocast over float32 weights, as `longrope finetune` trains on a GPU;
    `answers`: a retrieval micro-batch, a few answer tokens weighted 2 (`--answer-weight 2`);
    `short`: a micro-batch of the original length (the short factors) distilled toward the model
    as given (`--short-share`, `--distill-weight 0.5`); `documents`: packed documents kept apart
    (`--doc-mask`: positions restart at each document's first token)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return _step(arch, group, answers, short, documents)


def document_positions() -> torch.Tensor:
    """position_ids of two rows of packed documents: starts inside a chunk of either rank, at a
    chunk's edge (SEQ // 4, where rank 0's first chunk ends) and a one-token document."""
    starts = [[0, 10, SEQ // 4, SEQ // 2 + 7, SEQ // 2 + 8, SEQ - 20], [0, 40, 3 * SEQ // 4 + 1]]
    rows = []
    for row in starts:
        bounds = row + [SEQ]
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])]))
    return torch.stack(rows)


def answer_mask() -> torch.Tensor:
    """Answer tokens in both rows, in chunks held by each of the two ranks and at the last position."""
    mask = torch.zeros(2, SEQ, dtype=torch.bool)
    mask[0, [3, 4, SEQ // 2, SEQ - 1]] = True
    mask[1, [SEQ // 4, SEQ - 5]] = True
    return mask


def _step(arch: str, group, answers: bool = False, short: bool = False, documents: bool = False):
    model = _tiny(arch).float()
    # the teacher differs from the student, so the term is not zero
    teacher = retention.frozen_teacher(tiny_model(arch, seed=1), torch.device("cpu")) if short else None
    models.attach(model, scaling(models.rope_info(model.config).dim))
    model.train()
    ids = torch.randint(3, 259, (2, ORIGINAL if short else SEQ), generator=torch.Generator().manual_seed(5))
    objective = {"answers": answer_mask(), "answer_weight": 2.0} if answers else {}
    if documents:
        objective = {"position_ids": document_positions()}
    if short:
        if group is not None:
            teacher = parallel.ContextParallel(group, SEQ, 16).prepare_teacher(teacher)
        objective = {"teacher": teacher, "distill_weight": 0.5}
    if group is None:
        # as `train.finetune` runs packed documents: the regime of the whole length, not of the restarted positions
        with parallel.global_regime(model, ids.shape[1]):
            nll, count = train.chunked_lm_loss(model, ids, 16, **objective)
        (nll / count).backward()
        return nll.item() / count, {n: p.grad for n, p in model.named_parameters()}
    parallel.use_context_parallel_attention(model)
    root = parallel.shard_model(model, group, chunk=16)
    nll, count = root(ids, **objective)
    (nll * root.loss_scale / count).backward()
    return distributed.all_reduce_sum(nll).item() / count, parallel.full_gradients(root)


def needle_check(group=None) -> tuple[float, dict]:
    """`--needle-every`'s figures (mean answer NLL, and by depth) of a fixed model: one process,
    or over the ranks (each running its positions of every sample)."""
    model = _tiny("llama").float()
    models.attach(model, scaling(models.rope_info(model.config).dim))
    if group is None:
        return retention.needle_loss(model, needles(), 16)
    parallel.use_context_parallel_attention(model)
    root = parallel.shard_model(model, group, chunk=16)
    return parallel.ContextParallel(group, SEQ, 16).needle_loss(root, needles())


def gathered_for_decoding(group) -> torch.Tensor | None:
    """What the passkey check decodes with under torchrun: logits of a fixed input from the model
    that `ContextParallel.passkey_accuracy` gathers on rank 0 (`retention.passkey_accuracy` stubbed
    to return them)."""
    model = _tiny("llama").float()
    scaled = scaling(models.rope_info(model.config).dim)
    models.attach(model, scaled)
    parallel.use_context_parallel_attention(model)
    root = parallel.shard_model(model, group, chunk=16)
    ids = torch.arange(3, 3 + SEQ)[None]
    real = retention.passkey_accuracy
    retention.passkey_accuracy = lambda m, tokenizer, prompts: m(ids).logits.detach()
    try:
        return parallel.ContextParallel(group, SEQ, 16).passkey_accuracy(root, None, None, scaled)
    finally:
        retention.passkey_accuracy = real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, work: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    work = Path(work)
    try:
        group = distributed.init("cpu")
        report = {}
        report["steps"] = {arch: one_step(arch, group) for arch in ARCHS}  # loss and full gradients
        report["autocast"] = one_step("llama", group, autocast=True)
        report["answers"] = one_step("llama", group, answers=True)
        report["short"] = one_step("llama", group, short=True)
        report["documents"] = {arch: one_step(arch, group, documents=True) for arch in ("llama", "qwen3")}
        report["needles"] = needle_check(group)
        report["gathered"] = gathered_for_decoding(group)
        # whole runs: uninterrupted, and stopped after step 3 then resumed
        tok, packed = byte_tokenizer(), packed_data()
        cfg = config(steps=4, checkpoint_every=2)
        train.finetune(tiny_model(), tok, scaling(), packed, cfg, work / "whole", command="test")

        def stop_at_3(info):
            if info.step == 3:
                raise Stop

        try:
            train.finetune(tiny_model(), tok, scaling(), packed, cfg, work / "resumed", callback=stop_at_3)
        except Stop:
            report["stopped"] = True
        train.finetune(tiny_model(), tok, scaling(), packed, cfg, work / "resumed", resume=True, command="test")
        # mixed context windows with distillation: short micro-batches among the long ones
        train.finetune(tiny_model(), tok, scaling(), packed, MIXED, work / "mixed", command="test", needles=needles())
        # the passkey check: rank 0 decodes on the weights gathered from both
        report["passkey"] = passkey_run(work / "checked")
        if rank == 0:
            (work / "report.pkl").write_bytes(pickle.dumps(report))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    distributed.exit_without_teardown(0)  # reached after success only: see its docstring


@pytest.mark.torchrun
def test_two_processes_give_the_one_process_step_and_run(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    work = tmp_path / "ranks"
    work.mkdir()
    mp.spawn(_rank_main, args=(_free_port(), str(work)), nprocs=WORLD, join=True)
    report = pickle.loads((work / "report.pkl").read_bytes())

    # one process: the same steps
    for arch in ARCHS:
        loss, grads = one_step(arch)
        two_loss, two_grads = report["steps"][arch]
        assert abs(two_loss - loss) <= 1e-6 * loss, arch
        assert two_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert (two_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), (arch, name)
    # a retrieval micro-batch: the answer term split over the ranks adds up to one process's
    loss, grads = one_step("llama", answers=True)
    two_loss, two_grads = report["answers"]
    assert loss > one_step("llama")[0] and abs(two_loss - loss) <= 1e-6 * loss
    for name, g in grads.items():
        assert (two_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    # a short micro-batch with distillation: the KL split over the ranks adds up to one process's
    loss, grads = one_step("llama", short=True)
    two_loss, two_grads = report["short"]
    assert abs(two_loss - loss) <= 1e-6 * loss and loss > 0
    for name, g in grads.items():
        assert (two_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    # bf16 autocast (q, k float32 out of the rotary, v bf16: the mixed dtypes a GPU run hands the
    # context-parallel attention): the same step to bf16 rounding
    loss, grads = one_step("llama", autocast=True)
    two_loss, two_grads = report["autocast"]
    assert abs(two_loss - loss) <= 1e-2 * loss
    for name, g in grads.items():
        assert (two_grads[name] - g).norm() <= 0.05 * g.norm(), name

    # packed documents: one process's step under transformers' own packed-sequence mask
    for arch in ("llama", "qwen3"):
        loss, grads = one_step(arch, documents=True)
        two_loss, two_grads = report["documents"][arch]
        assert abs(two_loss - loss) <= 1e-6 * loss and abs(loss - one_step(arch)[0]) > 1e-3 * loss, arch
        for name, g in grads.items():
            assert (two_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), (arch, name)

    # needle validation over the ranks: one process's figures
    mean, by_depth = needle_check()
    two_mean, two_by_depth = report["needles"]
    assert two_mean == pytest.approx(mean, rel=1e-6) and len(by_depth) == 3
    assert two_by_depth.keys() == by_depth.keys()
    assert list(two_by_depth.values()) == pytest.approx(list(by_depth.values()), rel=1e-4)

    # mixed windows with distillation: the two-process run ends with one process's weights
    train.finetune(tiny_model(), byte_tokenizer(), scaling(), packed_data(), MIXED, tmp_path / "mixed", command="test",
                   needles=needles())
    assert any(retention.is_short_micro_batch(MIXED.seed, MIXED.short_share, step, 0) for step in range(1, 5))
    one, _ = models.load(str(tmp_path / "mixed"))
    two, _ = models.load(str(work / "mixed"))
    for name, value in two.state_dict().items():
        diff = (value - one.state_dict()[name]).abs()
        assert diff.max() < 2e-4 and (diff > 1e-5).float().mean() < 1e-3, (name, diff.max().item())
    logged = [[e.get("needle_loss") for e in map(json.loads, (folder / train.LOG).read_text().splitlines())]
              for folder in (tmp_path / "mixed", work / "mixed")]
    assert [v is not None for v in logged[0]] == [False, True, False, True]  # every 2 steps
    assert [v is not None for v in logged[1]] == [False, True, False, True]
    assert [v for v in logged[1] if v] == pytest.approx([v for v in logged[0] if v], rel=1e-4)

    # the passkey check decodes rank 0's gathered copy: the model's own logits
    model = _tiny("llama").float()
    models.attach(model, scaling(models.rope_info(model.config).dim))
    with torch.no_grad():
        assert torch.equal(report["gathered"], model(torch.arange(3, 3 + SEQ)[None]).logits)
    checked = passkey_run(tmp_path / "checked")
    assert [step for step, _, _ in checked] == [2] and report["passkey"] == checked

    # one process: the same run; the two-process runs (whole and resumed) end with its weights and losses
    train.finetune(tiny_model(), byte_tokenizer(), scaling(), packed_data(), config(steps=4, checkpoint_every=2),
                   tmp_path / "one", command="test")
    one, _ = models.load(str(tmp_path / "one"))
    reference = one.state_dict()
    one_log = [json.loads(x)["loss"] for x in (tmp_path / "one" / train.LOG).read_text().splitlines()]
    assert report["stopped"]
    for run in ("whole", "resumed"):
        two, _ = models.load(str(work / run))
        # AdamW (lr 1e-3) turns a rounding-level gradient difference into a visible update difference
        # for elements whose gradient is near zero; everything else agrees to float32 summation order
        for name, value in two.state_dict().items():
            diff = (value - reference[name]).abs()
            assert diff.max() < 2e-4 and (diff > 1e-5).float().mean() < 1e-3, (run, name, diff.max().item())
        log = [json.loads(x)["loss"] for x in (work / run / train.LOG).read_text().splitlines()]
        assert len(log) == 4 and max(abs(a - b) for a, b in zip(log, one_log)) < 1e-4, (run, log, one_log)
        record = json.loads((work / run / train.FT_RECORD).read_text())
        assert record["processes"] == WORLD
        assert not (work / run / train.CHECKPOINT).exists()


def test_load_balanced_chunks_cover_the_sequence_and_reorder_back():
    n = 48
    for world in (1, 2, 3, 4):
        held = [parallel.shard_chunks(n, world, r) for r in range(world)]
        positions = sorted(p for chunks in held for a, b in chunks for p in range(a, b))
        assert positions == list(range(n)), world
        # causal work per rank (keys attended, summed over its positions) is the same for every rank
        work = {sum(p + 1 for a, b in chunks for p in range(a, b)) for chunks in held}
        assert len(work) == 1, (world, work)
        # what all_gather returns (rank order, each rank's two chunks) goes back to sequence order
        gathered = torch.cat([torch.arange(a, b) for chunks in held for a, b in chunks]).float()
        ordered = parallel.sequence_order(gathered.view(1, 1, n, 1), world)
        assert ordered.flatten().tolist() == list(range(n)), world
    try:
        parallel.shard_chunks(50, 2, 0)
    except UsageError as exc:
        assert "multiple of twice the number of processes (4)" in str(exc)
    else:
        raise AssertionError("an uneven split must be refused")
