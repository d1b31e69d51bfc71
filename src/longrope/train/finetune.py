"""Long-context fine-tuning: a pretrained model with a scaling attached, trained on documents packed
into `seq_len`-token sequences (BOS/EOS between documents).

AdamW with a short warm-up and cosine decay (lr by model size: `default_lr`), bf16 autocast on CUDA over
float32 master weights, gradient checkpointing, SDPA attention and a chunked loss that never
materialises (tokens × vocab) logits. One process on one device, or, under torchrun, context
parallelism with FSDP2 (`parallel`): the same loop either way. Checkpoints, resume and the log
are `loop`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import distributed, models, nll
from .. import scaling as sc
from ..errors import UsageError
from . import loop, parallel, retention

FT_RECORD = "finetune.json"  # written last: the run is finished
# Checkpointing keeps attention outputs from this sequence length on. Selective checkpointing
# decides per op, in Python, what to keep; it pays once attention is most of a step. SmolLM2-135M
# on an H200 (docs/BENCHMARKS.md, issue 16): at 16k it was 1.5× slower than recomputing whole
# layers (0.376 s against 0.252 s), at 32k 13% faster, at 64k 17% faster. Larger models reach
# that point at shorter lengths, where recomputing whole layers is what they did before.
KEEP_ATTENTION_FROM = 32768
# The peak learning rate when none is given. Below 1B parameters 5e-5: on SmolLM2-135M at 64k it
# brought the needle loss down faster than LongRoPE's 2e-5 with linear decay (1.34 against 1.56
# at step 60, docs/BENCHMARKS.md, issue 16). From 1B on LongRoPE's own 2e-5 (§4.1, LLaMA-2-7B);
# nothing here measured those sizes.
SMALL_MODEL_PARAMETERS = 1_000_000_000
SMALL_MODEL_LR = 5e-5
LONGROPE_LR = 2e-5


def default_lr(n_parameters: int) -> float:
    """The peak learning rate for a model of `n_parameters` when --lr is not given."""
    return SMALL_MODEL_LR if n_parameters < SMALL_MODEL_PARAMETERS else LONGROPE_LR


def checkpointing_keeps_attention(seq_len: int) -> bool:
    """Whether a fine-tune at `seq_len` checkpoints selectively (attention outputs kept)."""
    return seq_len >= KEEP_ATTENTION_FROM


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(loop.TrainConfig):
    """Fine-tuning a scaled model at `seq_len` tokens: AdamW (β = 0.9, 0.95, LongRoPE §4.1), a short
    warm-up, cosine decay to a tenth of the peak, the peak by model size (`default_lr`) unless
    given. One optimizer step sees batch_size × grad_accum sequences."""

    seq_len: int
    steps: int
    lr: float | None = field(default=None, metadata={
        "help": f"peak learning rate (AdamW; default {SMALL_MODEL_LR:g} below "
                f"{SMALL_MODEL_PARAMETERS / 1e9:g}B parameters, {LONGROPE_LR:g} from there, LongRoPE's)"})
    warmup: int | None = field(default=None, metadata={"help": "warm-up steps (default 20, at most 10% of the steps)"})
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    batch_size: int = 1
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = 0.0
    # keeping short-context skills and retrieval (`retention`)
    short_share: float = field(default=0.0, metadata={
        "help": "share of the micro-batches at the model's original length, run with the short factors"})
    distill_weight: float = field(default=0.0, metadata={
        "help": "W: short sequences add W·KL(base model ‖ model) per token (needs --short-share)"})
    doc_mask: bool = field(default=False, metadata={
        "help": "positions restart per packed document and attention stays inside it"})
    needle_every: int = field(default=0, metadata={
        "help": "steps between needle validations (mean NLL of passkey answers, also by depth; needs --needle-data); "
                "0: none"})
    retrieval_share: float = field(default=0.0, metadata={
        "help": "share of the micro-batches that carry 4 key-value facts at random depths and questions on them at "
                "the end (our own wording, not the passkey's or RULER's); their answers weigh --answer-weight"})
    answer_weight: float = field(default=1.0, metadata={
        "help": "W: in a retrieval micro-batch's loss the answers' mean NLL counts W times beside the mean NLL of all "
                "its tokens"})
    keep_angles_seen: bool = field(default=False, metadata={
        "help": "raise the long factors of the frequency pairs that never turned fully in pretraining to at least the "
                "extension factor s, so none meets an angle pretraining never showed within the target length "
                "(LongRoPE2's constraint past the critical dimension; `scaling.keep_angles_seen`); LongRoPE only"})
    seen_margin: float = field(default=1.0, metadata={
        "help": "M: with --keep-angles-seen, raise those factors to M·s, so the farthest distance of the target "
                "length meets at most 1/M of the angles pretraining showed (its longest distances are its rarest); "
                "1.25 found every needle of SmolLM2 at 64k where 1 missed those 62k back (docs/BENCHMARKS.md)"})
    passkey_every: int = field(default=0, metadata={
        "help": "steps between passkey checks at --seq-len (greedy; the standard filler prompt, 2 keys at each "
                "depth 0.05-0.95; logged as 'passkey', the share found, and 'passkey_by_depth'); 0: none"})
    # run (may differ between a run and its resumption)
    gradient_checkpointing: bool = field(default=True, metadata={  # the option is --no-gradient-checkpointing
        "help": "keep every activation (faster, more memory)"})
    compile_layers: bool = field(default=False, metadata={
        "help": "compile each decoder layer with torch.compile, which fuses the small kernels around the matmuls and "
                "attention (SmolLM2 at 64k on an H200: 0.86x the step time); compiling first takes a while and needs "
                "a C/C++ compiler on the CPU, Triton on CUDA; one process only"})
    fused_loss: bool = field(default=False, metadata={
        "help": "the training loss through Liger's fused linear cross-entropy kernel (CUDA, pip install "
                "liger-kernel): no logits recomputed in the backward; one process only"})
    loss_chunk: int = field(default=nll.DEFAULT_CHUNK, metadata={"help": "positions projected to logits at a time"})
    checkpoint_every: int = 100
    log_every: int = 1
    save_dtype: str = "float32"

    RUN_FIELDS = loop.TrainConfig.RUN_FIELDS + ("gradient_checkpointing", "loss_chunk", "compile_layers", "fused_loss")

    def default_warmup(self) -> int:
        return min(20, self.steps // 10)

    def scaling_to_train(self, scaling, dim: int, base: float):
        """The scaling this run trains and exports: `scaling`, or with --keep-angles-seen its
        unturned frequency pairs raised to s."""
        if not self.keep_angles_seen:
            return scaling
        if not isinstance(scaling, sc.LongRoPEScaling):
            raise UsageError(f"--keep-angles-seen: needs a LongRoPE scaling (per-pair factors), got "
                             f"{scaling.rope_type}; use --scaling with a longrope file or preset")
        return sc.keep_angles_seen(scaling, dim, base, self.seen_margin)

    def for_model(self, n_parameters: int) -> "FinetuneConfig":
        """This configuration with the peak learning rate resolved for a model of that size."""
        return self if self.lr is not None else dataclasses.replace(self, lr=default_lr(n_parameters))

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> "FinetuneConfig":
        loop.need(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        super().validate()
        self.need_positive(("grad_accum", "loss_chunk"))
        loop.need(0 <= self.short_share < 1, f"--short-share must be in [0, 1), got {self.short_share}")
        loop.need(self.distill_weight >= 0 and math.isfinite(self.distill_weight),
                  f"--distill-weight must be >= 0, got {self.distill_weight}")
        loop.need(not self.distill_weight or self.short_share > 0,
                  "--distill-weight applies to the short sequences: give --short-share > 0 too")
        loop.need(0 <= self.retrieval_share <= 1, f"--retrieval-share must be in [0, 1], got {self.retrieval_share}")
        loop.need(self.answer_weight >= 0 and math.isfinite(self.answer_weight),
                  f"--answer-weight must be >= 0, got {self.answer_weight}")
        loop.need(self.needle_every >= 0, f"--needle-every must be >= 0, got {self.needle_every}")
        loop.need(self.passkey_every >= 0, f"--passkey-every must be >= 0, got {self.passkey_every}")
        loop.need(math.isfinite(self.seen_margin) and self.seen_margin >= 1,
                  f"--seen-margin must be >= 1, got {self.seen_margin}")
        loop.need(self.seen_margin == 1 or self.keep_angles_seen, "--seen-margin applies with --keep-angles-seen")
        # context parallel attention gathers keys and values across ranks inside each layer: not compiled
        loop.need(not (self.compile_layers and distributed.world_size() > 1),
                  "--compile-layers: one process only, not under torchrun; drop it there")
        if self.fused_loss:  # (FSDP shards the output projection that Liger's kernel reads whole)
            loop.need(distributed.world_size() == 1, "--fused-loss: one process only, not under torchrun; drop it there")
            why = nll.fused_nll_available()
            loop.need(why is None, f"--fused-loss: {why}; or drop --fused-loss")
            loop.need(str(self.device).startswith("cuda"),
                      f"--fused-loss: needs --device cuda (Liger's kernels are Triton), got {self.device}")
        return self


def pack_documents(documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, bos_id: int | None,
                   eos_id: int | None) -> np.ndarray:
    """(n, seq_len) int64 training sequences: each document with BOS first and EOS last (added only
    where the tokens lack them: `data.load_tokenized` already carries the tokenizer's BOS), all
    concatenated in order and cut into full sequences; the last partial sequence is dropped.
    Raises UsageError when the documents do not fill one sequence."""
    parts = []
    for tokens in documents:
        t = np.asarray(tokens, dtype=np.int64)
        if bos_id is not None and (t.size == 0 or t[0] != bos_id):
            parts.append(np.array([bos_id], dtype=np.int64))
        parts.append(t)
        if eos_id is not None and (t.size == 0 or t[-1] != eos_id):
            parts.append(np.array([eos_id], dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(stream) // seq_len
    if n == 0:
        raise UsageError(f"--seq-len {seq_len}: the documents hold {len(stream)} tokens in all (BOS/EOS included), "
                         "not enough for one sequence; use a shorter --seq-len or more --data")
    return stream[:n * seq_len].reshape(n, seq_len)


def finetune_batch(packed: np.ndarray, cfg: FinetuneConfig, step: int, micro: int = 0) -> torch.Tensor:
    """[batch_size, seq_len] for micro-batch `micro` of optimizer step `step` (1-based): the packed
    sequences in a fresh seeded order every epoch. A pure function of (seed, step, micro), so a
    resumed run sees exactly the batches an uninterrupted one does (and under context parallelism
    every rank the same ones, each running its own positions of them)."""
    n = len(packed)
    first = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size
    rows, orders = [], {}
    for k in range(first, first + cfg.batch_size):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([cfg.seed, epoch, 0xF17E]).permutation(n)
        rows.append(orders[epoch][k % n])
    return torch.from_numpy(np.ascontiguousarray(packed[rows]))


def pick_source(seed: int, weights: Sequence[float], step: int, micro: int) -> int:
    """Which data source micro-batch `micro` of step `step` comes from: drawn with probability
    proportional to `weights`, a pure function of (seed, step, micro) like `finetune_batch`, so a
    resumed run draws the sources an uninterrupted one does. One source: always 0."""
    if len(weights) == 1:
        return 0
    p = np.asarray(weights, dtype=np.float64)
    return int(np.random.default_rng([seed, step, micro, 0x50C]).choice(len(p), p=p / p.sum()))


@dataclass
class FinetuneResult:
    out: Path
    model: object  # the fine-tuned model (in save_dtype), scaling attached, eval mode; None on ranks > 0
    record: dict = field(default_factory=dict)


def finetune(model, tokenizer, scaling, packed: np.ndarray | Sequence[np.ndarray], cfg: FinetuneConfig,
             out: str | os.PathLike, *,
             resume: bool = False, force: bool = False, keep_checkpoint: bool = False,
             callback: Callable[[loop.StepInfo], None] | None = None, identity: dict | None = None,
             command: str | None = None, needles: Sequence | None = None,
             source_weights: Sequence[float] | None = None) -> FinetuneResult:
    """Fine-tune `model` (a transformers causal LM, moved to float32 on cfg.device) with `scaling`
    attached on `packed` sequences ([n, seq_len], see `pack_documents`), or on several such
    sources, each micro-batch drawn from one with probability proportional to `source_weights`
    (`pick_source`; each source's sequences in their own seeded order); write `out`: the
    checkpoint exported with the scaling (`models.export`: plain transformers loads it),
    train_log.jsonl, and finetune.json last.

    Checkpoints (model, optimizer, RNG, step; atomic) go to `out/checkpoint.pt` every
    `checkpoint_every` steps; `resume=True` continues from there with identical optimizer state
    and batches. `identity` (model, data, ...) must match on resume, as must every non-run field
    of `cfg` and the scaling. `callback(StepInfo)` runs after every optimizer step (after that
    step's checkpoint); an exception it raises stops the run, leaving the checkpoint.

    `retention`'s options (also under torchrun):
    cfg.short_share of the micro-batches are the same
    documents cut at the scaling's original length (short factors), where cfg.distill_weight adds
    KL(`model` as given, frozen ‖ the trained model); cfg.doc_mask restarts positions at every
    BOS (attention stays inside each document; the regime is still the sequence's length);
    cfg.retrieval_share of the micro-batches are `retention.retrieval_sequence`s (facts in the
    documents, questions at the end; read whole, without document masks) whose answers count
    cfg.answer_weight times in the loss (`parallel.chunked_lm_loss`, or `local_lm_loss` under
    torchrun); cfg.needle_every logs "needle_loss", the mean answer NLL of `needles`
    (`passkey.needle_samples`), at the first log line after every multiple of it, and each
    needle's by depth; cfg.passkey_every logs "passkey", the greedy passkey accuracy at
    cfg.seq_len (`retention.passkey_prompts`), likewise.

    Under torchrun (WORLD_SIZE > 1) the run is context parallel (`parallel.ContextParallel`):
    every rank takes the same sequences and runs its slice of their positions (RoPE at global
    positions, the short/long choice on the global length), the weights sharded by FSDP2; rank 0
    writes every file. A checkpoint resumes only with the same number of processes."""
    cfg = cfg.for_model(sum(p.numel() for p in model.parameters())).validate()
    info = models.rope_info(model.config)
    scaling = cfg.scaling_to_train(scaling, info.dim, info.base)
    sources = [np.asarray(packed)] if isinstance(packed, np.ndarray) else [np.asarray(p) for p in packed]
    weights = list(source_weights) if source_weights is not None else [1.0] * len(sources)
    for pack in sources:
        if pack.ndim != 2 or pack.shape[1] != cfg.seq_len or len(pack) == 0:
            raise UsageError(f"finetune: expected packed sequences of shape (n >= 1, {cfg.seq_len}), got {pack.shape}")
    if not sources or len(weights) != len(sources) or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or sum(weights) <= 0:
        raise UsageError(f"finetune: {len(sources)} data sources need as many weights >= 0, not all 0; got {weights}")
    short_len = getattr(scaling, "original_max_position_embeddings", None)
    if cfg.short_share and not (short_len and short_len < cfg.seq_len):
        raise UsageError(f"--short-share: the scaling's original length ({short_len}) must be below --seq-len")
    if cfg.doc_mask and tokenizer.bos_token_id is None:
        raise UsageError("--doc-mask: the tokenizer has no BOS token to mark where documents start")
    if cfg.needle_every and not needles:
        raise UsageError("--needle-every: needs needle samples (--needle-data)")
    ranks = parallel.strategy(models.resolve_device(cfg.device), cfg.seq_len, cfg.loss_chunk, cfg.fused_loss)
    if ranks.world > 1:  # what else runs context parallel must split into its chunks too
        if cfg.short_share:
            parallel.check_splits(short_len, ranks.world, "--short-share: the original length")
        for sample in needles if cfg.needle_every else ():
            parallel.check_splits(len(sample.input_ids), ranks.world, "--needle-every: a needle sample's length")
    if cfg.retrieval_share:  # the shortest sequences trained must hold the facts and questions
        retention.check_retrieval_fits(tokenizer, short_len if cfg.short_share else cfg.seq_len)
    prompts = retention.passkey_prompts(tokenizer, cfg.seq_len, cfg.seed) if cfg.passkey_every else None
    device, out = ranks.device, Path(out)
    identity = {"scaling": scaling.to_dict(), **({"source_weights": weights} if len(sources) > 1 else {}),
                **(identity or {})}
    checkpoint = ranks.open_out(out, resume, force, FT_RECORD)
    loop.check_resumable(cfg, identity, checkpoint, ranks.world)
    loop.allow_tf32(device)
    # the model as given, before the scaling is attached
    teacher = ranks.prepare_teacher(retention.frozen_teacher(model, device)) if cfg.distill_weight else None
    short_sources = [retention.short_sequences(p, short_len) for p in sources] if cfg.short_share else None
    # the model, or its FSDP2 root
    keep_attention = ranks.keeps_attention and checkpointing_keeps_attention(cfg.seq_len)
    trained = ranks.prepare(_prepare_model(model, scaling, cfg, device, keep_attention=keep_attention))
    optimizer = loop.make_optimizer(trained, cfg, device)
    if checkpoint is not None:
        ranks.load_state(trained, optimizer, checkpoint)
    run = loop.Run(out, cfg, device, checkpoint, tokens_per_step=cfg.sequences_per_step * cfg.seq_len,
                   identity=identity, world=ranks.world, main=ranks.is_main)
    del checkpoint
    autocast = loop.autocast(device, cfg.dtype)

    def micro_batch(step: int, micro: int) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """(batch, whether it is short, its answer tokens if it is a retrieval micro-batch)"""
        short = retention.is_short_micro_batch(cfg.seed, cfg.short_share, step, micro)
        source = pick_source(cfg.seed, weights, step, micro)
        batch = finetune_batch((short_sources if short else sources)[source], cfg, step, micro)
        answers = None
        if retention.is_retrieval_micro_batch(cfg.seed, cfg.retrieval_share, step, micro):
            rows = [retention.retrieval_sequence(row, tokenizer, [cfg.seed, step, micro, i])
                    for i, row in enumerate(batch.numpy())]
            batch = torch.from_numpy(np.stack([r.ids for r in rows]))
            answers = torch.from_numpy(np.stack([r.answers for r in rows])).to(device)
        return batch.to(device, non_blocking=True), short, answers

    def objective(batch: torch.Tensor, short: bool, answers: torch.Tensor | None) -> dict:
        """What `ranks.nll` adds to the plain NLL."""
        extra = {}
        # a retrieval sequence is read whole: its questions look back across the packed documents
        if cfg.doc_mask and answers is None:
            extra["position_ids"] = retention.document_positions(batch, tokenizer.bos_token_id)
        if short and teacher is not None:
            extra.update(teacher=teacher, distill_weight=cfg.distill_weight)
        if answers is not None:
            extra.update(answers=answers, answer_weight=cfg.answer_weight)
        return extra

    def validate(step: int, last_logged: int) -> dict:  # each check whose boundary passed since the last line
        def due(every: int) -> bool:
            return bool(every) and step // every > last_logged // every

        checks = {}
        # the checks' lengths and decoding would each compile the layers anew: they run eager
        eager = torch.compiler.set_stance("force_eager") if cfg.compile_layers else contextlib.nullcontext()
        with autocast, eager:  # the training dtype: float32 master weights alone would take SDPA's O(n²) math kernel
            if due(cfg.needle_every):
                mean, by_depth = ranks.needle_loss(trained, needles)
                checks.update(needle_loss=round(mean, 5), needle_loss_by_depth=by_depth)
            if due(cfg.passkey_every) and (found := ranks.passkey_accuracy(trained, tokenizer, prompts, scaling)):
                share, by_depth = found  # (under torchrun rank 0's, which writes the log)
                checks.update(passkey=round(share, 4), passkey_by_depth=by_depth)
        return checks

    with run:
        for step in run.steps():
            lr = loop.set_lr(optimizer, cfg, step)
            batches = [micro_batch(step, micro) for micro in range(cfg.grad_accum)]
            targets = sum(b.shape[0] * (b.shape[1] - 1) for b, _, _ in batches)  # the loss is the mean over these
            step_loss = torch.zeros((), device=device)
            for batch, short, answers in batches:
                # restarted positions must not switch a long sequence to the short factors
                regime = parallel.global_regime(model, batch.shape[1]) if cfg.doc_mask else contextlib.nullcontext()
                with autocast, regime:
                    summed = ranks.nll(trained, batch, **objective(batch, short, answers))  # this process's positions
                (summed * ranks.loss_scale / targets).backward()
                step_loss += ranks.sum_over_ranks(summed) / targets
            grad_norm = loop.clip_gradients(trained, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step_done(step, lr, step_loss, grad_norm, extra=validate,
                          tokens=sum(b.numel() for b, _, _ in batches))
            if run.checkpoint_due(step):
                run.save_checkpoint(step, *ranks.full_state(trained, optimizer))
                ranks.barrier()
            if callback is not None:
                callback(run.info(step, lr))

    model = ranks.final_model(model, trained, optimizer, scaling)
    if model is None:  # a rank > 0: rank 0 exports
        return FinetuneResult(out=out, model=None, record={})
    if cfg.gradient_checkpointing:
        models.disable_checkpointing(model)
    if cfg.compile_layers:
        models.uncompile_layers(model)
    model.eval()
    model.to(dtype=getattr(torch, cfg.save_dtype))
    record = {**run.record(model, command), "scaling": scaling.to_dict(),
              "sequences": int(sum(len(p) for p in sources))}
    if ranks.world > 1:
        record["processes"] = ranks.world
    try:
        run.publish(FT_RECORD, record, lambda folder: _export(model, tokenizer, scaling, folder), keep_checkpoint)
    finally:
        ranks.barrier()
    return FinetuneResult(out=out, model=model, record=record)


def _prepare_model(model, scaling, cfg: FinetuneConfig, device: torch.device, keep_attention: bool):
    """float32 master weights on `device`, the scaling attached, gradient checkpointing on, train mode."""
    model.to(device=device, dtype=torch.float32)
    models.attach(model, scaling)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:  # attention kept: most of a long step's time, little of its memory
        models.enable_checkpointing(model, keep_attention=keep_attention)
    if cfg.compile_layers:
        models.compile_layers(model)
    model.train()
    return model


def _export(model, tokenizer, scaling, folder: Path) -> None:
    model.config.use_cache = True
    models.export(model, tokenizer, scaling, folder)
