"""Pretraining the small bundled base model from scratch at a short context.

`pretrain(config, documents, out)` trains a transformers Llama (SDPA attention) with the byte-level
tokenizer on random `context`-token windows of the documents, mixed with a share of synthetic
passkey samples (`passkey`), and writes a Hugging Face folder that `longrope.models.load(out)`
loads. Checkpoints, resume and the log are `loop`'s.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .. import models, passkey
from ..data import Document
from ..errors import UsageError
from ..tokenization import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer, encode
from . import loop

PRETRAIN_RECORD = "pretrain.json"  # written last: the run is finished
MIN_CONTEXT = 32


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(loop.TrainConfig):
    # model
    context: int = field(default=256, metadata={"help": "training context in tokens (= bytes + BOS)"})
    d_model: int = field(default=256, metadata={"help": "hidden size"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (GQA)"})
    head_dim: int = field(default=64, metadata={"help": "dimensions per head"})
    intermediate_size: int | None = field(default=None, metadata={  # None: Llama's rule (`ffn_size`)
        "help": "MLP width (default 8/3·d_model rounded up to a multiple of 256)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share the input and output embeddings"})
    # optimisation: pretraining's defaults of the shared fields
    steps: int = 1500
    batch_size: int = field(default=512, metadata={"help": "windows per step (512 × 256 tokens fits any GPU)"})
    lr: float = 3e-3
    warmup: int | None = field(default=None, metadata={"help": "warm-up steps (default 5% of --steps)"})
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.1
    # data
    passkey_share: float = field(default=0.1, metadata={"help": "share of synthetic passkey samples"})
    # run (may differ between a run and its resumption)
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int = field(default=0, metadata={  # needs validation documents
        "help": "validation loss every N steps (with --val-ids; 0: only at the end)"})
    eval_windows: int = field(default=64, metadata={"help": "validation windows of --context tokens"})
    save_dtype: str = "float16"

    RUN_FIELDS = loop.TrainConfig.RUN_FIELDS + ("compile", "eval_every", "eval_windows")

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 256 * -(-int(8 * self.d_model / 3) // 256)

    def default_warmup(self) -> int:
        return max(1, self.steps // 20)  # 5% of the steps

    def validate(self) -> "PretrainConfig":
        need = loop.need
        need(self.context >= MIN_CONTEXT, f"--context must be at least {MIN_CONTEXT}, got {self.context}")
        self.need_positive(("d_model", "layers", "heads", "kv_heads", "head_dim"))
        super().validate()
        need(self.eval_every >= 0 and self.eval_windows >= 1, "--eval-every must be >= 0 and --eval-windows >= 1")
        need(self.head_dim % 2 == 0, f"--head-dim must be even (RoPE rotates pairs), got {self.head_dim}")
        need(self.heads % self.kv_heads == 0,
             f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")
        need(self.intermediate_size is None or self.intermediate_size >= 1, "--intermediate-size must be positive")
        need(self.rope_theta > 1, f"--rope-theta must be > 1, got {self.rope_theta}")
        need(0 <= self.passkey_share <= 1, f"--passkey-share must be in [0, 1], got {self.passkey_share}")
        shortest = passkey.fixed_tokens(intro=False)
        need(self.passkey_share == 0 or self.context >= shortest,
             f"--passkey-share > 0 needs --context >= {shortest} (the passkey prompt alone is that long); "
             "use a longer context or --passkey-share 0")
        return self

    def to_dict(self) -> dict:
        return {**super().to_dict(), "intermediate_size": self.ffn_size}


def llama_config(cfg: PretrainConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.context,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_implementation="sdpa")


def build_model(cfg: PretrainConfig) -> LlamaForCausalLM:
    """A freshly initialised LlamaForCausalLM (float32) from the config's seed."""
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(llama_config(cfg))


def parameter_count(cfg: PretrainConfig) -> int:
    d, f, L, v = cfg.d_model, cfg.ffn_size, cfg.layers, VOCAB_SIZE
    attn = d * cfg.heads * cfg.head_dim * 2 + d * cfg.kv_heads * cfg.head_dim * 2
    per_layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if cfg.tie_embeddings else 2) + L * per_layer + d


# --------------------------------------------------------------------------------------------
# tokens and batches: a batch is a pure function of (seed, step)


def token_stream(documents: Sequence[Document]) -> np.ndarray:
    """All documents' byte tokens, each document followed by EOS, as one uint16 array."""
    eos = np.array([EOS_ID], dtype=np.uint16)
    parts = [part for doc in documents for part in (encode(doc.text).astype(np.uint16), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def make_batch(stream: np.ndarray, cfg: PretrainConfig, step: int) -> torch.Tensor:
    """[batch_size, context] int64 token ids for optimizer step `step`: random windows of the
    stream (BOS first), with a share of passkey samples (`passkey.random_sample`)."""
    rng = np.random.default_rng([cfg.seed, step, 0x10C0])
    B, T = cfg.batch_size, cfg.context
    share = cfg.passkey_share * B
    n_pk = int(share) + int(rng.random() < share - int(share))
    n_lm = B - n_pk
    batch = np.empty((B, T), dtype=np.int64)
    batch[:, 0] = BOS_ID
    starts = rng.integers(0, len(stream) - (T - 1) + 1, size=n_lm)
    if n_lm:
        batch[:n_lm, 1:] = stream[starts[:, None] + np.arange(T - 1)]
    for row in range(n_lm, B):
        batch[row] = passkey.random_sample(stream, T, rng).ids
    return torch.from_numpy(batch)


def validation_batch(stream: np.ndarray, context: int, n: int) -> torch.Tensor:
    """[n, context] fixed windows (BOS first) spread evenly over a held-out stream."""
    starts = np.linspace(0, len(stream) - (context - 1), num=n).astype(np.int64)
    batch = np.empty((n, context), dtype=np.int64)
    batch[:, 0] = BOS_ID
    batch[:, 1:] = stream[starts[:, None] + np.arange(context - 1)]
    return torch.from_numpy(batch)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over every position (float32)."""
    logits = model(input_ids=batch, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model, batch: torch.Tensor, device: torch.device, dtype: str, chunk: int = 64) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    with loop.autocast(device, dtype):
        for i in range(0, len(batch), chunk):
            part = batch[i:i + chunk].to(device)
            total += float(lm_loss(model, part)) * len(part)
    model.train(was_training)
    return total / len(batch)


# --------------------------------------------------------------------------------------------
# training


@dataclass
class PretrainResult:
    out: Path
    model: object  # float32 LlamaForCausalLM on the training device
    record: dict = field(default_factory=dict)


def pretrain(cfg: PretrainConfig, documents: Sequence[Document], out: str | os.PathLike, *, resume: bool = False,
             force: bool = False, keep_checkpoint: bool = False, callback: Callable[[loop.StepInfo], None] | None = None,
             command: str | None = None, data_info: dict | None = None,
             validation: Sequence[Document] | None = None) -> PretrainResult:
    """Train from scratch (or from `out/checkpoint.pt` with resume) and write the final model to `out`.

    `callback(StepInfo)` runs after every optimizer step (after that step's checkpoint, if any);
    an exception it raises stops training, leaving the checkpoint to resume from. `validation`
    documents (held out) give a validation loss every `eval_every` steps and at the end."""
    cfg.validate()
    device, out = models.resolve_device(cfg.device), Path(out)
    stream = token_stream(documents)
    if len(stream) < cfg.context:
        raise UsageError(f"--data: {len(stream)} tokens in all is less than one --context of {cfg.context}")
    val_batch = _validation_batch(validation, cfg)
    checkpoint = loop.prepare_out(out, resume, force, PRETRAIN_RECORD)
    loop.check_resumable(cfg, {}, checkpoint)
    loop.allow_tf32(device)
    model = build_model(cfg).to(device)
    optimizer = loop.make_optimizer(model, cfg, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    run = loop.Run(out, cfg, device, checkpoint, tokens_per_step=cfg.batch_size * cfg.context)
    del checkpoint
    model.train()
    forward = torch.compile(model) if cfg.compile else model
    autocast = loop.autocast(device, cfg.dtype)

    def validate(step: int, last_logged: int) -> dict:  # when an eval_every boundary passed since the last line
        if val_batch is None or not cfg.eval_every or step // cfg.eval_every <= last_logged // cfg.eval_every:
            return {}
        return {"val_loss": round(validation_loss(model, val_batch, device, cfg.dtype), 5)}

    with run:
        for step in run.steps():
            lr = loop.set_lr(optimizer, cfg, step)
            batch = make_batch(stream, cfg, step)
            if device.type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)
            with autocast:
                loss = lm_loss(forward, batch)
            loss.backward()
            grad_norm = loop.clip_gradients(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step_done(step, lr, loss.detach(), grad_norm, extra=validate)
            if run.checkpoint_due(step):
                run.save_checkpoint(step, model.state_dict(), optimizer.state_dict())
            if callback is not None:
                callback(run.info(step, lr))

    model.eval()
    val_loss = validation_loss(model, val_batch, device, cfg.dtype) if val_batch is not None else None
    with autocast:
        accuracy = passkey.greedy_accuracy(model, cfg.context, device=device, seed=cfg.seed)
    record = {
        **run.record(model, command), "validation_loss": val_loss, "passkey_accuracy_at_context": accuracy,
        "data": {**(data_info or {}), "documents_ids": [d.id for d in documents], "documents": len(documents),
                 "tokens": int(len(stream)), "validation_documents": [d.id for d in validation or []]},
    }
    run.publish(PRETRAIN_RECORD, record, lambda folder: write_model(model, folder, cfg.save_dtype), keep_checkpoint)
    return PretrainResult(out=out, model=model, record=record)


def _validation_batch(validation: Sequence[Document] | None, cfg: PretrainConfig) -> torch.Tensor | None:
    if not validation:
        return None
    stream = token_stream(validation)
    if len(stream) < cfg.context:
        raise UsageError(f"validation documents hold {len(stream)} tokens, less than one --context")
    return validation_batch(stream, cfg.context, cfg.eval_windows)


def write_model(model, folder: Path, save_dtype: str) -> None:
    """Make `folder` and write the HF model into it: weights in `save_dtype`, config, byte
    tokenizer, generation config (the training model itself is left as it is)."""
    folder.mkdir()
    small = copy.deepcopy(model).to(device="cpu", dtype=getattr(torch, save_dtype))
    small.config.use_cache = True
    small.save_pretrained(folder, safe_serialization=True)
    small.generation_config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
