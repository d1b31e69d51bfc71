"""Training: pretraining the small bundled base model from scratch at a short context.

`pretrain(config, documents, out)` trains a transformers Llama (LlamaConfig/LlamaForCausalLM, SDPA
attention) with the byte-level tokenizer on random `context`-token windows of the documents, mixed
with a share of synthetic passkey samples, and writes a Hugging Face folder that
`longrope.models.load(out)` loads. Checkpoints (model, optimizer, RNG, step) are written atomically
every `checkpoint_every` steps to `out/checkpoint.pt`; `resume=True` continues from there and gives
bit-identical results to an uninterrupted run (every batch is a pure function of (seed, step)).

Long-context fine-tuning (`finetune`, below): a pretrained model with a scaling attached is trained
on documents packed into `seq_len`-token sequences (BOS/EOS between documents), AdamW with a short
warm-up and linear decay (LongRoPE's lr 2e-5), bf16 autocast on CUDA over float32 master weights,
gradient checkpointing, SDPA attention and a chunked loss that never materialises (tokens × vocab)
logits. Checkpoints and resume work as for pretraining. One process on one device: see
`finetune` for where FSDP2 and context parallelism plug in (not implemented yet).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import models, nll, parallel, runs
from .data import Document, read_documents
from .errors import UsageError
from .evaluate import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION
from .tokenization import VOCAB_SIZE, byte_tokenizer

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # token id = byte + 3
MIN_CONTEXT = 32
CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
RECORD = "pretrain.json"

# --------------------------------------------------------------------------------------------
# documents and tokens (reading is data.py's; byte-level tokenisation is trivial: bytes + 3)


def load_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], ids: Iterable[str] | None = None,
                   exclude_ids: Iterable[str] | None = None) -> list[Document]:
    """Documents of one or several sources (`data.read_documents`: .txt/.md files, folders of them,
    .jsonl(.gz) with `text` and optionally `id`, .parquet, or `bundled`), filtered by id."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[Document] = []
    for source in paths:
        docs.extend(read_documents(source))
    return select_documents(docs, ids, exclude_ids)


def select_documents(docs: Sequence[Document], ids: Iterable[str] | None = None,
                     exclude_ids: Iterable[str] | None = None, what: str = "--data-ids") -> list[Document]:
    """Keep the documents named in `ids` (in that order; all must exist), drop `exclude_ids` and
    empty ones. Raises UsageError if nothing is left."""
    docs = list(docs)
    if ids is not None:
        wanted = list(dict.fromkeys(ids))
        by_id = {d.id: d for d in docs}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            known = ", ".join(list(by_id)[:8]) + (" ..." if len(by_id) > 8 else "")
            raise UsageError(f"{what}: no document with id {', '.join(missing)} (ids: {known})")
        docs = [by_id[i] for i in wanted]
    if exclude_ids is not None:
        drop = set(exclude_ids)
        docs = [d for d in docs if d.id not in drop]
    docs = [d for d in docs if d.text]
    if not docs:
        raise UsageError(f"{what}: no non-empty documents left")
    return docs


def encode(text: str | bytes) -> np.ndarray:
    """Byte-level token ids (no BOS): every UTF-8 byte + 3, as int64."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def token_stream(documents: Sequence[Document]) -> np.ndarray:
    """All documents' tokens, each followed by EOS, as one uint16 array."""
    parts = []
    for doc in documents:
        parts.append((np.frombuffer(doc.text.encode("utf-8"), dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET))
        parts.append(np.array([EOS_ID], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


# --------------------------------------------------------------------------------------------
# passkey samples, in the standard wording of evaluate's passkey test (its constants)


def passkey_needle(key: int | str) -> str:
    return PASSKEY_NEEDLE.format(key=key)


@dataclass(frozen=True)
class PasskeySample:
    ids: tuple[int, ...]  # BOS + bytes + 3: exactly `context` tokens, ending with the key's digits
    key: str
    needle_start: int  # index in ids of the needle's first token ("The pass key is ...")
    answer_start: int  # index in ids of the key's first digit after the question
    filler_tokens: int  # filler bytes in all (before + after the needle)
    depth: float  # filler before the needle / all filler (the requested depth, rounded to a byte)


def passkey_fixed_tokens(intro: bool = True, key_digits: int = 5) -> int:
    """Tokens of a passkey sample that are not filler (BOS included)."""
    needle = len(passkey_needle("0" * key_digits).encode())
    fixed = 1 + needle + 1 + len(PASSKEY_QUESTION.encode()) + 1 + key_digits
    if intro:
        fixed += len(PASSKEY_INTRO.encode()) + 1
    return fixed


def passkey_sample(context: int, key: int | str, depth: float, filler: str | bytes | None = None,
                   intro: bool = True) -> PasskeySample:
    """One passkey prompt of exactly `context` byte tokens (BOS first):

        <intro> <filler…> The pass key is K. Remember it. K is the pass key. <filler…> What is the pass key? The pass key is K

    `depth` in [0, 1] is the share of the filler placed before the needle. The filler is `filler`
    (real text) cycled to the needed length, or the standard "The grass is green. ..." repeated;
    each filler stretch ends with a space so words stay separated. Pure: no randomness inside.
    """
    key = str(key)
    if not key.isdigit():
        raise UsageError(f"passkey: key must be digits, got {key!r}")
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"passkey: depth must be in [0, 1], got {depth}")
    fixed = passkey_fixed_tokens(intro, len(key))
    n_filler = context - fixed
    if n_filler < 0:
        raise UsageError(f"passkey: a context of {context} tokens is too short for the prompt "
                         f"({fixed} tokens without filler{'; try intro=False' if intro else ''})")
    source = filler if filler is not None else PASSKEY_FILLER + " "
    source_bytes = source.encode("utf-8") if isinstance(source, str) else bytes(source)
    if n_filler and not source_bytes:
        raise UsageError("passkey: empty filler text")
    reps = -(-n_filler // max(1, len(source_bytes)))
    stream = (source_bytes * reps)[:n_filler]
    n_before = int(round(depth * n_filler))
    before, after = _end_with_space(stream[:n_before]), _end_with_space(stream[n_before:])
    head = (PASSKEY_INTRO + " ").encode() if intro else b""
    needle = (passkey_needle(key) + " ").encode()
    tail = f"{PASSKEY_QUESTION} {key}".encode()
    data = head + before + needle + after + tail
    ids = (BOS_ID, *(b + BYTE_OFFSET for b in data))
    assert len(ids) == context, (len(ids), context)
    needle_start = 1 + len(head) + len(before)
    return PasskeySample(ids=ids, key=key, needle_start=needle_start, answer_start=context - len(key),
                         filler_tokens=n_filler, depth=(n_before / n_filler) if n_filler else 0.0)


def _end_with_space(chunk: bytes) -> bytes:
    return chunk[:-1] + b" " if chunk and chunk[-1:] not in (b" ", b"\n") else chunk


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class PretrainConfig:
    # model
    context: int = 256
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int | None = None  # None: Llama's rule, 8/3·d_model rounded up to a multiple of 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    # optimisation
    steps: int = 1500
    batch_size: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"  # or "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # data
    passkey_share: float = 0.1
    seed: int = 0
    # run (may differ between a run and its resumption)
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype: bfloat16 or float32
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int = 0  # validation loss every so many steps (0: only at the end); needs validation documents
    eval_windows: int = 64
    save_dtype: str = "float16"

    RUN_FIELDS = ("device", "dtype", "compile", "checkpoint_every", "log_every", "eval_every", "eval_windows",
                  "save_dtype")

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 256 * -(-int(8 * self.d_model / 3) // 256)

    @property
    def warmup_steps(self) -> int:
        w = max(1, self.steps // 20) if self.warmup is None else self.warmup
        return min(w, self.steps)

    def validate(self) -> "PretrainConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(self.context >= MIN_CONTEXT, f"--context must be at least {MIN_CONTEXT}, got {self.context}")
        for name in ("d_model", "layers", "heads", "kv_heads", "head_dim", "steps", "batch_size",
                     "checkpoint_every", "log_every"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        need(self.eval_every >= 0 and self.eval_windows >= 1, "--eval-every must be >= 0 and --eval-windows >= 1")
        need(self.head_dim % 2 == 0, f"--head-dim must be even (RoPE rotates pairs), got {self.head_dim}")
        need(self.heads % self.kv_heads == 0,
             f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")
        need(self.intermediate_size is None or self.intermediate_size >= 1, "--intermediate-size must be positive")
        need(self.rope_theta > 1, f"--rope-theta must be > 1, got {self.rope_theta}")
        _check_optimisation(self)
        need(0 <= self.passkey_share <= 1, f"--passkey-share must be in [0, 1], got {self.passkey_share}")
        if self.passkey_share > 0:
            shortest = passkey_fixed_tokens(intro=False)
            need(self.context >= shortest, f"--passkey-share > 0 needs --context >= {shortest} (the passkey prompt "
                                           f"alone is that long); use a longer context or --passkey-share 0")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["intermediate_size"] = self.ffn_size
        d["warmup"] = self.warmup_steps
        return d


def _check_optimisation(cfg) -> None:
    """The checks pretraining and fine-tuning share (AdamW, schedule, dtypes); one UsageError line."""
    checks = [
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be positive, got {cfg.lr}"),
        (cfg.warmup is None or cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}"),
        (cfg.schedule in ("cosine", "linear"), f"--schedule must be cosine or linear, got {cfg.schedule!r}"),
        (cfg.weight_decay >= 0, "--weight-decay must be >= 0"),
        (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "AdamW betas must be in [0, 1)"),
        (cfg.grad_clip >= 0, "--grad-clip must be >= 0 (0 turns clipping off)"),
        (cfg.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}"),
        (cfg.save_dtype in ("float16", "bfloat16", "float32"),
         f"--save-dtype must be float16, bfloat16 or float32, got {cfg.save_dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def llama_config(cfg: PretrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.context,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_implementation="sdpa")


def build_model(cfg: PretrainConfig):
    """A freshly initialised LlamaForCausalLM (float32) from the config's seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg))
    return model


def parameter_count(cfg: PretrainConfig) -> int:
    d, f, L, v = cfg.d_model, cfg.ffn_size, cfg.layers, VOCAB_SIZE
    attn = d * cfg.heads * cfg.head_dim * 2 + d * cfg.kv_heads * cfg.head_dim * 2
    per_layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if cfg.tie_embeddings else 2) + L * per_layer + d


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up, then cosine or linear
    decay to lr·min_lr_ratio at the last step."""
    warm = cfg.warmup_steps
    if warm and step <= warm:
        return cfg.lr * step / warm
    span = max(1, cfg.steps - warm)
    progress = min(1.0, (step - warm) / span)
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - low) * progress
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# batches: a pure function of (seed, step)


def make_batch(stream: np.ndarray, cfg: PretrainConfig, step: int) -> torch.Tensor:
    """[batch_size, context] int64 token ids for optimizer step `step`: random windows of the
    stream (BOS first), with a share of passkey samples (filler: real text or the standard one;
    the intro sentence when it fits, half of the time)."""
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
        batch[row] = passkey_training_sample(stream, T, rng).ids
    return torch.from_numpy(batch)


def validation_batch(stream: np.ndarray, context: int, n: int) -> torch.Tensor:
    """[n, context] fixed windows (BOS first) spread evenly over a held-out stream."""
    starts = np.linspace(0, len(stream) - (context - 1), num=n).astype(np.int64)
    batch = np.empty((n, context), dtype=np.int64)
    batch[:, 0] = BOS_ID
    batch[:, 1:] = stream[starts[:, None] + np.arange(context - 1)]
    return torch.from_numpy(batch)


@torch.no_grad()
def validation_loss(model, batch: torch.Tensor, device: torch.device, dtype: str, chunk: int = 64) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    with _autocast(device, dtype):
        for i in range(0, len(batch), chunk):
            part = batch[i:i + chunk].to(device)
            total += float(lm_loss(model, part)) * len(part)
    model.train(was_training)
    return total / len(batch)


def _autocast(device: torch.device | str, dtype: str):
    kind = torch.device(device).type
    if dtype == "bfloat16":
        return torch.autocast(kind, dtype=torch.bfloat16)
    return torch.autocast(kind, enabled=False)


def passkey_training_sample(stream: np.ndarray, context: int, rng: np.random.Generator) -> PasskeySample:
    key = int(rng.integers(10000, 100000))
    depth = float(rng.random())
    intro = context >= passkey_fixed_tokens(intro=True) and rng.random() < 0.5
    filler = None
    if rng.random() < 0.5:
        n = context  # more than enough real text; cut to length by passkey_sample
        start = int(rng.integers(0, max(1, len(stream) - n)))
        chunk = stream[start:start + n].astype(np.int64)
        chunk = np.where(chunk == EOS_ID, ord("\n") + BYTE_OFFSET, chunk)
        filler = bytes((chunk - BYTE_OFFSET).clip(0, 255).astype(np.uint8))
    return passkey_sample(context, key, depth, filler=filler, intro=intro)


# --------------------------------------------------------------------------------------------
# training


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float | None  # mean loss since the last log (None before the first)
    lr: float
    tokens_per_s: float | None


@dataclass
class PretrainResult:
    out: Path
    model: object  # float32 LlamaForCausalLM on the training device
    record: dict = field(default_factory=dict)


def _prepare_out(out: Path, resume: bool, force: bool, record: str = RECORD) -> dict | None:
    """Checks --out (`runs.check_out`) and makes it; returns the checkpoint to resume from (or
    None). `record` marks a finished run."""
    ckpt_path = out / CHECKPOINT
    if not force and (out / record).is_file() and not ckpt_path.exists():
        raise UsageError(f"--out {out} already holds a finished model; choose another folder or pass --force")
    checkpoint = None
    if resume and ckpt_path.is_file() and runs.written_by_longrope(out):
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing problem
            raise UsageError(f"--resume: cannot read {ckpt_path} ({type(exc).__name__}); "
                             "pass --force to start over") from None
    runs.check_out(out, force=force, resume=resume, resumable=True)
    if resume and checkpoint is None and out.is_dir() and any(p.name != runs.MARKER for p in out.iterdir()) and not (out / LOG).exists():
        raise UsageError(f"--out {out} is not empty and holds no checkpoint to resume")
    runs.open_dir(out, force=force, resume=resume, command="train")
    return checkpoint


def _check_resumable(cfg: PretrainConfig, saved: dict) -> None:
    ours = {k: v for k, v in cfg.to_dict().items() if k not in PretrainConfig.RUN_FIELDS}
    theirs = {k: v for k, v in saved.items() if k not in PretrainConfig.RUN_FIELDS}
    diff = runs.differences(theirs, ours)
    if diff:
        shown = ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff)
        raise UsageError(f"--resume: the checkpoint was made with different settings ({shown}); "
                         "use the same ones or pass --force to start over")


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_optimizer(model, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over every position (float32)."""
    logits = model(input_ids=batch, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1))


def pretrain(cfg: PretrainConfig, documents: Sequence[Document], out: str | os.PathLike, *, resume: bool = False,
             force: bool = False, keep_checkpoint: bool = False, callback: Callable[[StepInfo], None] | None = None,
             command: str | None = None, data_info: dict | None = None,
             validation: Sequence[Document] | None = None) -> PretrainResult:
    """Train from scratch (or from `out/checkpoint.pt` with resume) and write the final model to `out`.

    `callback(StepInfo)` runs after every optimizer step (after that step's checkpoint, if any);
    an exception it raises stops training, leaving the checkpoint to resume from. `validation`
    documents (held out) give a validation loss every `eval_every` steps and at the end."""
    cfg.validate()
    device = models.resolve_device(cfg.device)
    out = Path(out)
    stream = token_stream(documents)
    if len(stream) < cfg.context:
        raise UsageError(f"--data: {len(stream)} tokens in all is less than one --context of {cfg.context}")
    val_batch = None
    if validation:
        val_stream = token_stream(validation)
        if len(val_stream) < cfg.context:
            raise UsageError(f"validation documents hold {len(val_stream)} tokens, less than one --context")
        val_batch = validation_batch(val_stream, cfg.context, cfg.eval_windows)
    checkpoint = _prepare_out(out, resume, force)
    out.mkdir(parents=True, exist_ok=True)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    start_step, tokens_seen, wall_before, recent = 0, 0, 0.0, []
    if checkpoint is not None:
        _check_resumable(cfg, checkpoint["config"])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"], device)
        start_step, tokens_seen = int(checkpoint["step"]), int(checkpoint["tokens_seen"])
        wall_before, recent = float(checkpoint["wall_time_s"]), list(checkpoint["recent_losses"])
        _truncate_log(out / LOG, start_step)
    else:
        (out / LOG).unlink(missing_ok=True)
    del checkpoint
    model.train()
    forward = torch.compile(model) if cfg.compile else model
    autocast = _autocast(device, cfg.dtype)
    tokens_per_step = cfg.batch_size * cfg.context
    t_run = time.perf_counter()
    t_log, steps_since_log = t_run, 0
    loss_sum = torch.zeros((), device=device)
    last_loss, last_tps, grad_norm = None, None, None

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save({
            "step": step, "tokens_seen": tokens_seen, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
            "wall_time_s": wall_before + time.perf_counter() - t_run, "recent_losses": recent,
        }, out / CHECKPOINT)

    with open(out / LOG, "a", encoding="utf-8") as log:
        for step in range(start_step + 1, cfg.steps + 1):
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = make_batch(stream, cfg, step)
            if device.type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)
            with autocast:
                loss = lm_loss(forward, batch)
            loss.backward()
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            loss_sum += loss.detach()
            steps_since_log += 1
            if steps_since_log == cfg.log_every or step == cfg.steps:
                last_loss = float(loss_sum) / steps_since_log
                now = time.perf_counter()
                last_tps = steps_since_log * tokens_per_step / max(now - t_log, 1e-9)
                recent = (recent + [last_loss])[-10:]
                entry = {"step": step, "loss": round(last_loss, 5), "lr": lr, "tokens": tokens_seen,
                         "tokens_per_s": round(last_tps, 1), "elapsed_s": round(wall_before + now - t_run, 3)}
                if grad_norm is not None:
                    entry["grad_norm"] = round(float(grad_norm), 4)
                if val_batch is not None and cfg.eval_every and (step // cfg.eval_every
                                                                 > (step - steps_since_log) // cfg.eval_every):
                    entry["val_loss"] = round(validation_loss(model, val_batch, device, cfg.dtype), 5)
                    t_log = time.perf_counter()  # keep evaluation out of tokens/s
                log.write(json.dumps(entry) + "\n")
                log.flush()
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss became {last_loss} at step {step}; lower --lr")
                loss_sum.zero_()
                steps_since_log = 0
                t_log = max(t_log, now)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(step)
            if callback is not None:
                callback(StepInfo(step, cfg.steps, last_loss, lr, last_tps))
    wall = wall_before + time.perf_counter() - t_run

    model.eval()
    val_loss = validation_loss(model, val_batch, device, cfg.dtype) if val_batch is not None else None
    accuracy = passkey_accuracy(model, cfg.context, device=device, dtype=cfg.dtype, seed=cfg.seed)
    record = {
        "config": cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": tokens_seen, "final_loss": (sum(recent) / len(recent)) if recent else None,
        "last_logged_loss": recent[-1] if recent else None, "validation_loss": val_loss,
        "passkey_accuracy_at_context": accuracy, "wall_time_s": round(wall, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": runs.versions(), "command": command if command is not None else _argv(),
        "data": {**(data_info or {}), "documents": len(documents), "tokens": int(len(stream)),
                 "validation_documents": [d.id for d in validation or []]},
    }
    save_model(model, out, cfg.save_dtype, record)
    if not keep_checkpoint:
        (out / CHECKPOINT).unlink(missing_ok=True)
    return PretrainResult(out=out, model=model, record=record)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint by an interrupted run)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line torn by a killed process
            continue
        if entry is not None and entry["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def save_model(model, out: Path, save_dtype: str, record: dict) -> None:
    """Write the HF folder (weights in `save_dtype`, config, byte tokenizer, generation config) into
    `out` file by file through a temporary folder; pretrain.json is written last."""
    tmp = out / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        small = copy.deepcopy(model).to(device="cpu", dtype=getattr(torch, save_dtype))
        small.config.use_cache = True
        small.save_pretrained(tmp, safe_serialization=True)
        small.generation_config.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        record["model_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        for item in sorted(tmp.iterdir()):
            os.replace(item, out / item.name)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp / RECORD, out / RECORD)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def passkey_accuracy(model, context: int, *, n: int = 32, device: torch.device | str = "cpu",
                     dtype: str = "float32", seed: int = 0) -> float | None:
    """Share of standard-filler passkey prompts of `context` tokens (intro included when it fits,
    depths spread over [0, 1]) whose key the model reproduces greedily. Teacher-forced argmax at
    every digit equals greedy decoding's exact match, so one forward pass suffices."""
    if context < passkey_fixed_tokens(intro=False):
        return None
    intro = context >= passkey_fixed_tokens(intro=True)
    rng = np.random.default_rng([seed, 0xE7A1])
    samples = [passkey_sample(context, int(rng.integers(10000, 100000)), i / max(1, n - 1), intro=intro)
               for i in range(n)]
    ids = torch.tensor([s.ids for s in samples], device=device)
    with _autocast(device, dtype):
        logits = model(input_ids=ids, use_cache=False).logits
    a = samples[0].answer_start
    predicted = logits[:, a - 1:-1].argmax(-1)
    return float((predicted == ids[:, a:]).all(-1).float().mean())


def _argv() -> str:
    import shlex

    return shlex.join(sys.argv)


# ============================================================================================
# long-context fine-tuning

FT_RECORD = "finetune.json"  # written last: the run is finished
DEFAULT_LOSS_CHUNK = nll.DEFAULT_CHUNK


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning a scaled model at `seq_len` tokens. Defaults follow LongRoPE (§4.1): AdamW
    (β = 0.9, 0.95), lr 2e-5 with linear decay, a short warm-up. One optimizer step sees
    batch_size × grad_accum sequences."""

    seq_len: int
    steps: int
    lr: float = 2e-5
    warmup: int | None = None  # None: 20 steps, at most a tenth of the run
    min_lr_ratio: float = 0.0  # linear decay to lr·min_lr_ratio at the last step
    schedule: str = "linear"  # or "cosine"
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # run (may differ between a run and its resumption)
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype (bfloat16 on GPU); master weights stay float32
    gradient_checkpointing: bool = True
    loss_chunk: int = DEFAULT_LOSS_CHUNK  # positions projected to logits at a time
    checkpoint_every: int = 100
    log_every: int = 1
    save_dtype: str = "float32"

    RUN_FIELDS = ("device", "dtype", "gradient_checkpointing", "loss_chunk", "checkpoint_every", "log_every",
                  "save_dtype")

    @property
    def warmup_steps(self) -> int:
        w = min(20, self.steps // 10) if self.warmup is None else self.warmup
        return min(w, self.steps)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> "FinetuneConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        for name in ("steps", "batch_size", "grad_accum", "loss_chunk", "checkpoint_every", "log_every"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        _check_optimisation(self)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["warmup"] = self.warmup_steps
        return d


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


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0xF17E]).permutation(n)


def finetune_batch(packed: np.ndarray, cfg: FinetuneConfig, step: int, micro: int = 0) -> torch.Tensor:
    """[batch_size, seq_len] for micro-batch `micro` of optimizer step `step` (1-based): the packed
    sequences in a fresh seeded order every epoch. A pure function of (seed, step, micro), so a
    resumed run sees exactly the batches an uninterrupted one does. (Data parallelism would give
    rank r the rows r, r + world, ... of a world × larger batch; context parallelism would shard
    each row's positions.)"""
    n = len(packed)
    first = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size
    rows, orders = [], {}
    for k in range(first, first + cfg.batch_size):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = _epoch_order(cfg.seed, epoch, n)
        rows.append(orders[epoch][k % n])
    return torch.from_numpy(np.ascontiguousarray(packed[rows]))


def chunked_lm_loss(model, input_ids: torch.Tensor, chunk: int = DEFAULT_LOSS_CHUNK) -> tuple[torch.Tensor, int]:
    """(summed next-token cross entropy, number of targets) of a [batch, seq] batch, without ever
    building (tokens × vocab) logits: the decoder's final hidden states are projected through
    `lm_head` and scored `chunk` positions at a time; with autograd on, each chunk runs under
    activation checkpointing, so its logits are freed at once and recomputed in the backward pass
    (peak: one chunk's logits, not the sequence's)."""
    out = nll.decoder(model)(input_ids=input_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    batch, length = input_ids.shape
    return nll.summed_nll(model, hidden[:, :-1], input_ids[:, 1:], chunk, torch.float32), batch * (length - 1)


@dataclass
class FinetuneResult:
    out: Path
    model: object  # the fine-tuned model (in save_dtype), scaling attached, eval mode
    record: dict = field(default_factory=dict)


def _check_finetune_resumable(cfg: FinetuneConfig, identity: dict, saved: dict) -> None:
    ours = {**{k: v for k, v in cfg.to_dict().items() if k not in FinetuneConfig.RUN_FIELDS},
            **{f"identity.{k}": v for k, v in identity.items()}}
    theirs = {**{k: v for k, v in saved["config"].items() if k not in FinetuneConfig.RUN_FIELDS},
              **{f"identity.{k}": v for k, v in saved.get("identity", {}).items()}}
    diff = runs.differences(theirs, ours)
    if diff:
        shown = ", ".join(f"{k} {str(theirs.get(k))[:60]!r} -> {str(ours.get(k))[:60]!r}" for k in diff[:3])
        raise UsageError(f"--resume: the checkpoint was made with different settings ({shown}); "
                         "use the same ones or pass --force to start over")


def finetune(model, tokenizer, scaling, packed: np.ndarray, cfg: FinetuneConfig, out: str | os.PathLike, *,
             resume: bool = False, force: bool = False, keep_checkpoint: bool = False,
             callback: Callable[[StepInfo], None] | None = None, identity: dict | None = None,
             command: str | None = None) -> FinetuneResult:
    """Fine-tune `model` (a transformers causal LM, moved to float32 on cfg.device) with `scaling`
    attached on `packed` sequences ([n, seq_len], see `pack_documents`); write `out`: the
    checkpoint exported with the scaling (`models.export`: plain transformers loads it),
    train_log.jsonl, and finetune.json last.

    Checkpoints (model, optimizer, RNG, step; atomic) go to `out/checkpoint.pt` every
    `checkpoint_every` steps; `resume=True` continues from there with identical optimizer state
    and batches. `identity` (model, data, ...) must match on resume, as must every non-run field
    of `cfg` and the scaling. `callback(StepInfo)` runs after every optimizer step (after that
    step's checkpoint); an exception it raises stops the run, leaving the checkpoint.

    Under torchrun (WORLD_SIZE > 1; `parallel`): every rank takes the same sequences and runs its
    slice of their positions (context parallelism, RoPE at global positions, the short/long
    choice on the global length) with the weights sharded by FSDP2; rank 0 writes every file.
    A checkpoint holds full state dicts, so it resumes only with the same number of processes."""
    cfg.validate()
    device = models.resolve_device(cfg.device)
    ranks = parallel.init(device.type) if parallel.world_size() > 1 else None
    if ranks is not None:
        device = ranks.device
        ranks.chunks(cfg.seq_len)  # --seq-len must split evenly into 2 × ranks chunks
    main = ranks is None or ranks.is_main
    out = Path(out)
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.shape[1] != cfg.seq_len or len(packed) == 0:
        raise UsageError(f"finetune: expected packed sequences of shape (n >= 1, {cfg.seq_len}), got {packed.shape}")
    identity = {"scaling": scaling.to_dict(), **(identity or {})}
    if ranks is None:
        checkpoint = _prepare_out(out, resume, force, record=FT_RECORD)
    else:  # rank 0 checks (and with --force clears) the folder; the others read the checkpoint after it
        found = parallel.agree(ranks, lambda: _prepare_out(out, resume, force, record=FT_RECORD) is not None)
        checkpoint = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True) if found else None
    world = 1 if ranks is None else ranks.world
    if checkpoint is not None and checkpoint.get("world", 1) != world:  # its state dicts are laid out per world
        raise UsageError(f"--resume: the checkpoint was made by {checkpoint.get('world', 1)} process(es), this "
                         f"run has {world}; resume with the same number or pass --force")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f".{CHECKPOINT}.tmp-*"):  # left by a process killed while saving
            stale.unlink()

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = _prepare_finetune_model(model, scaling, cfg, device, context_parallel=ranks is not None)
    trainable = model if ranks is None else parallel.shard_model(model, ranks, cfg.loss_chunk)
    optimizer = make_optimizer(trainable, cfg, device)
    start_step, tokens_seen, wall_before, recent, first_loss = 0, 0, 0.0, [], None
    if checkpoint is not None:
        _check_finetune_resumable(cfg, identity, checkpoint)
        if ranks is None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            parallel.load_full_state(trainable, optimizer, checkpoint["model"], checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"], device)
        start_step, tokens_seen = int(checkpoint["step"]), int(checkpoint["tokens_seen"])
        wall_before, recent = float(checkpoint["wall_time_s"]), list(checkpoint["recent_losses"])
        first_loss = checkpoint.get("first_loss")
        if main:
            _truncate_log(out / LOG, start_step)
    elif main:
        (out / LOG).unlink(missing_ok=True)
    del checkpoint
    autocast = _autocast(device, cfg.dtype)
    tokens_per_step = cfg.sequences_per_step * cfg.seq_len
    targets_per_step = cfg.sequences_per_step * (cfg.seq_len - 1)
    t_run = time.perf_counter()
    t_log, steps_since_log = t_run, 0
    loss_sum = torch.zeros((), device=device)
    last_loss, last_tps, grad_norm = None, None, None

    def save_checkpoint(step: int) -> None:
        if ranks is None:
            model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
        else:  # a collective: every rank gathers, rank 0 writes
            model_state, optimizer_state = parallel.full_state(trainable, optimizer)
        if main:
            _atomic_torch_save({
                "step": step, "tokens_seen": tokens_seen, "config": cfg.to_dict(), "identity": identity,
                "model": model_state, "optimizer": optimizer_state, "rng": _rng_state(device),
                "wall_time_s": wall_before + time.perf_counter() - t_run, "recent_losses": recent,
                "first_loss": first_loss, "world": world,
            }, out / CHECKPOINT)
        if ranks is not None:
            parallel.barrier()

    with (open(out / LOG, "a", encoding="utf-8") if main else contextlib.nullcontext()) as log:
        for step in range(start_step + 1, cfg.steps + 1):
            lr = lr_at(cfg, step)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = finetune_batch(packed, cfg, step, micro).to(device, non_blocking=True)
                if ranks is None:
                    with autocast:
                        nll, _ = chunked_lm_loss(model, batch, cfg.loss_chunk)
                    loss = nll / targets_per_step  # the step's mean over all its micro-batches
                    loss.backward()
                    step_loss += loss.detach()
                else:  # this rank's slice of positions; the step's loss is the sum over the ranks
                    with autocast:
                        nll, _ = trainable(batch)
                    (nll * ranks.loss_scale / targets_per_step).backward()
                    step_loss += parallel.all_reduce_sum(nll) / targets_per_step
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                    grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            loss_sum += step_loss
            steps_since_log += 1
            if first_loss is None:
                first_loss = float(step_loss)
            if steps_since_log == cfg.log_every or step == cfg.steps:
                last_loss = float(loss_sum) / steps_since_log
                now = time.perf_counter()
                last_tps = steps_since_log * tokens_per_step / max(now - t_log, 1e-9)
                recent = (recent + [last_loss])[-10:]
                entry = {"step": step, "loss": round(last_loss, 5), "lr": lr, "tokens": tokens_seen,
                         "tokens_per_s": round(last_tps, 1), "elapsed_s": round(wall_before + now - t_run, 3)}
                if grad_norm is not None:
                    entry["grad_norm"] = round(float(grad_norm), 4)
                if log is not None:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss became {last_loss} at step {step}; lower --lr")
                loss_sum.zero_()
                steps_since_log = 0
                t_log = now
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(step)
            if callback is not None:
                callback(StepInfo(step, cfg.steps, last_loss, lr, last_tps))
    wall = wall_before + time.perf_counter() - t_run

    if ranks is not None:  # the export is made by rank 0 from an unsharded copy
        model_state, _ = parallel.full_state(trainable, optimizer)
        if not main:
            parallel.barrier()  # wait for rank 0's export
            return FinetuneResult(out=out, model=None, record={})
        model = parallel.unsharded_copy(model, model_state)
        models.attach(model, scaling)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()
    model.to(dtype=getattr(torch, cfg.save_dtype))
    record = {
        "config": cfg.to_dict(), "identity": identity, "scaling": scaling.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()), "sequences": int(len(packed)),
        "tokens_seen": tokens_seen, "first_loss": first_loss,
        "final_loss": (sum(recent) / len(recent)) if recent else None,
        "last_logged_loss": recent[-1] if recent else None, "wall_time_s": round(wall, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": runs.versions(), "command": command if command is not None else _argv(),
    }
    if ranks is not None:
        record["processes"] = ranks.world
    try:
        _export_into(model, tokenizer, scaling, out, record)
        if not keep_checkpoint:
            (out / CHECKPOINT).unlink(missing_ok=True)
    finally:
        if ranks is not None:
            parallel.barrier()
    return FinetuneResult(out=out, model=model, record=record)


def _prepare_finetune_model(model, scaling, cfg: FinetuneConfig, device: torch.device, context_parallel: bool = False):
    """float32 master weights on `device`, the scaling attached, gradient checkpointing on, train
    mode; with `context_parallel`, attention over the ranks' slices (`parallel`)."""
    model.to(device=device, dtype=torch.float32)
    models.attach(model, scaling)
    if context_parallel:
        parallel.use_context_parallel_attention(model)
    elif getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        print(f"note: attention implementation {model.config._attn_implementation!r}; load with sdpa for long sequences")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _export_into(model, tokenizer, scaling, out: Path, record: dict) -> None:
    """`models.export` into a temporary folder inside `out`, its files moved into `out`, then the
    record written last (its presence means the run is complete)."""
    tmp = out / f".export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.config.use_cache = True
        models.export(model, tokenizer, scaling, tmp)
        record["model_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        for item in sorted(tmp.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        text = json.dumps(record, indent=2) + "\n"
        (out / f".{FT_RECORD}.tmp").write_text(text)
        os.replace(out / f".{FT_RECORD}.tmp", out / FT_RECORD)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
