"""What every training run here shares, written once: the configuration fields of the optimizer and
the run, AdamW, the learning-rate schedule, autocast, the output folder, the checkpoint (atomic;
model, optimizer, RNG, counters), the resume identity check, the step log and the finished-run
record. `pretrain` and `finetune` are each one loop over these.

A resumed run gives bit-identical results to an uninterrupted one: every batch is a pure function
of (seed, step), and the checkpoint carries everything else that changes (weights, optimizer
state, RNG state, the counters of the log).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import runs
from ..errors import UsageError

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
RECENT_LOSSES = 10  # logged losses averaged into a run's final loss
SAVE_DTYPES = ("float16", "bfloat16", "float32")


def need(ok: bool, message: str) -> None:
    """A configuration check: raise `message` as a UsageError unless `ok`."""
    if not ok:
        raise UsageError(message)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The fields every training run has. The fields without a default here get one in each kind
    of run (pretraining and fine-tuning want different ones). "help": the command line's
    (`cli.add_config_options`; a kind of run may give its own), also for the fields it redefines."""

    # optimisation
    steps: int = field(metadata={"help": "optimizer steps"})
    batch_size: int = field(metadata={"help": "sequences per micro-batch"})
    lr: float = field(metadata={"help": "peak learning rate (AdamW)"})
    warmup: int | None = None  # None: the kind of run's default (`default_warmup`), which its help says
    min_lr_ratio: float = field(metadata={"help": "final lr as a share of --lr"})
    schedule: str = field(metadata={"help": "decay after the warm-up", "choices": ("cosine", "linear")})
    weight_decay: float = field(metadata={"help": "AdamW weight decay"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm; 0 turns clipping off"})
    seed: int = field(default=0, metadata={"help": "order of the training sequences"})
    # run (may differ between a run and its resumption)
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype: bfloat16 or float32; master weights stay float32
    checkpoint_every: int = field(metadata={"help": "steps between checkpoints (what --resume continues from)"})
    log_every: int = field(metadata={"help": "steps between lines of the training log"})
    save_dtype: str = field(metadata={"help": "dtype of the saved weights", "choices": SAVE_DTYPES})

    RUN_FIELDS = ("device", "dtype", "checkpoint_every", "log_every", "save_dtype")

    def default_warmup(self) -> int:
        raise NotImplementedError

    @property
    def warmup_steps(self) -> int:
        return min(self.default_warmup() if self.warmup is None else self.warmup, self.steps)

    def need_positive(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            need(value >= 1, f"--{name.replace('_', '-')} must be positive, got {value}")

    def validate(self):
        """Raise a one-line UsageError naming the option at fault; return self."""
        self.need_positive(("steps", "batch_size", "checkpoint_every", "log_every"))
        # None: the kind of run resolves it before training (fine-tuning: by model size)
        need(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"--lr must be positive, got {self.lr}")
        need(self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in ("cosine", "linear"), f"--schedule must be cosine or linear, got {self.schedule!r}")
        need(self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "AdamW betas must be in [0, 1)")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 turns clipping off)")
        need(self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        need(self.save_dtype in SAVE_DTYPES,
             f"--save-dtype must be float16, bfloat16 or float32, got {self.save_dtype!r}")
        return self

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "warmup": self.warmup_steps}


# --------------------------------------------------------------------------------------------
# the optimizer and what surrounds a step


def lr_at(cfg: TrainConfig, step: int) -> float:
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


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    lr = lr_at(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    if cfg.lr is None:  # a caller's bug, not the user's: FinetuneConfig.for_model resolves the default
        raise ValueError("make_optimizer: cfg.lr is None; resolve the learning rate first (FinetuneConfig.for_model)")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients' global norm to `max_norm` (0: no clipping, None returned); returns the
    norm before clipping, whole (FSDP2 gives a DTensor)."""
    if max_norm <= 0:
        return None
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def autocast(device: torch.device | str, dtype: str):
    """bf16 autocast over float32 weights, or nothing (`dtype` float32)."""
    kind = torch.device(device).type
    if dtype == "bfloat16":
        return torch.autocast(kind, dtype=torch.bfloat16)
    return torch.autocast(kind, enabled=False)


def allow_tf32(device: torch.device) -> None:
    """float32 matmuls in TF32 on CUDA (bf16 autocast leaves a few in float32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# the output folder and resuming


def read_checkpoint(out: Path) -> dict:
    path = out / CHECKPOINT
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing problem
        raise UsageError(f"--resume: cannot read {path} ({type(exc).__name__}); pass --force to start over") from None


def prepare_out(out: Path, resume: bool, force: bool, record: str) -> dict | None:
    """Check --out (`runs.check_out`) and make it; return the checkpoint to resume from, or None.
    `record` is the file that marks a finished run."""
    if not force and (out / record).is_file() and not (out / CHECKPOINT).exists():
        raise UsageError(f"--out {out} already holds a finished model; choose another folder or pass --force")
    checkpoint = None
    if resume and (out / CHECKPOINT).is_file() and runs.written_by_longrope(out):
        checkpoint = read_checkpoint(out)
    runs.check_out(out, force=force, resume=resume, resumable=True)
    if resume and checkpoint is None and out.is_dir() and not (out / LOG).exists() \
            and any(p.name != runs.MARKER for p in out.iterdir()):
        raise UsageError(f"--out {out} is not empty and holds no checkpoint to resume")
    runs.open_dir(out, force=force, resume=resume, command="train")
    for stale in out.glob(f".{CHECKPOINT}.tmp-*"):  # left by a process killed while saving
        stale.unlink()
    return checkpoint


def check_resumable(cfg: TrainConfig, identity: dict, checkpoint: dict | None, world: int = 1) -> None:
    """A resumed run must be the run the checkpoint comes from: the same settings (run fields
    aside), identity (model, data, scaling ...) and number of processes."""
    if checkpoint is None:
        return
    if checkpoint.get("world", 1) != world:  # its state dicts are laid out per world
        raise UsageError(f"--resume: the checkpoint was made by {checkpoint.get('world', 1)} process(es), this "
                         f"run has {world}; resume with the same number or pass --force")

    def settings(config: dict, ident: dict) -> dict:
        return {**{k: v for k, v in config.items() if k not in cfg.RUN_FIELDS},
                **{f"identity.{k}": v for k, v in ident.items()}}

    ours, theirs = settings(cfg.to_dict(), identity), settings(checkpoint["config"], checkpoint.get("identity", {}))
    diff = runs.differences(theirs, ours)
    if diff:
        shown = ", ".join(f"{k} {str(theirs.get(k))[:60]!r} -> {str(ours.get(k))[:60]!r}" for k in diff[:3])
        raise UsageError(f"--resume: the checkpoint was made with different settings ({shown}); "
                         "use the same ones or pass --force to start over")


def command_line() -> str:
    """The command as typed: `longrope ...` from the console script or `python -m longrope`
    (torchrun included), else the whole argv (a script or test calling in)."""
    if sys.argv and sys.argv[0].endswith(("longrope", os.path.join("longrope", "__main__.py"))):
        return shlex.join(["longrope", *sys.argv[1:]])
    return shlex.join(sys.argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


# --------------------------------------------------------------------------------------------
# one run's bookkeeping


@dataclass
class StepInfo:
    """What a training callback gets after every optimizer step."""

    step: int
    total: int
    loss: float | None  # mean loss since the last log (None before the first)
    lr: float
    tokens_per_s: float | None


class Run:
    """The bookkeeping of one run in `out`: the counters a checkpoint carries over, the step log
    (train_log.jsonl: written by the main process only; lines past the checkpoint's step, written
    by an interrupted run, are dropped on resume), checkpoints and the finished-run record.
    Construct it once the model and optimizer hold the checkpoint's state (it restores the RNG),
    then `with run:` around the steps."""

    def __init__(self, out: Path, cfg: TrainConfig, device: torch.device, checkpoint: dict | None, *,
                 tokens_per_step: int, identity: dict | None = None, world: int = 1, main: bool = True):
        self.out, self.cfg, self.device, self.identity = out, cfg, device, identity
        self.tokens_per_step, self.world, self.main = tokens_per_step, world, main
        saved = checkpoint or {}
        self.start_step, self.tokens_seen = int(saved.get("step", 0)), int(saved.get("tokens_seen", 0))
        self.wall_before, self.recent = float(saved.get("wall_time_s", 0.0)), list(saved.get("recent_losses", []))
        self.first_loss: float | None = saved.get("first_loss")
        self.last_loss: float | None = None
        self.last_tps: float | None = None
        self.wall: float | None = None  # seconds of training in all, once the steps are over
        if checkpoint is not None:
            set_rng_state(checkpoint["rng"], device)
        if main and checkpoint is not None:
            _truncate_log(out / LOG, self.start_step)
        elif main:
            (out / LOG).unlink(missing_ok=True)

    def __enter__(self) -> "Run":
        self._log = open(self.out / LOG, "a", encoding="utf-8") if self.main else None
        self.t_run = self.t_log = time.perf_counter()
        self.loss_sum, self.since_log, self.tokens_since_log = torch.zeros((), device=self.device), 0, 0
        return self

    def __exit__(self, *exc) -> None:
        if self._log is not None:
            self._log.close()
        self.wall = self.elapsed()

    def steps(self) -> range:
        return range(self.start_step + 1, self.cfg.steps + 1)

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_run

    def step_done(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor | None = None,
                  extra: Callable[[int, int], dict] | None = None, tokens: int | None = None) -> None:
        """Count optimizer step `step`, its mean loss (a detached tensor: read only when a line is
        due, to spare a device sync per step) and its `tokens` (default tokens_per_step; a step of
        mixed context windows sees fewer). Every log_every steps and at the last, a log line: the
        mean loss since the last line, lr, tokens, throughput, grad norm, and what `extra(step,
        the last line's step)` returns (an evaluation; kept out of the throughput)."""
        tokens = self.tokens_per_step if tokens is None else tokens
        self.tokens_seen += tokens
        self.tokens_since_log += tokens
        self.loss_sum += loss
        self.since_log += 1
        if self.first_loss is None:
            self.first_loss = float(loss)
        if self.since_log < self.cfg.log_every and step < self.cfg.steps:
            return
        self.last_loss = float(self.loss_sum) / self.since_log
        now = time.perf_counter()
        self.last_tps = self.tokens_since_log / max(now - self.t_log, 1e-9)
        self.recent = (self.recent + [self.last_loss])[-RECENT_LOSSES:]
        entry = {"step": step, "loss": round(self.last_loss, 5), "lr": lr, "tokens": self.tokens_seen,
                 "tokens_per_s": round(self.last_tps, 1), "elapsed_s": round(self.wall_before + now - self.t_run, 3)}
        if grad_norm is not None:
            entry["grad_norm"] = round(float(grad_norm), 4)
        evaluated = extra(step, step - self.since_log) if extra is not None else {}
        entry.update(evaluated)
        if self._log is not None:
            self._log.write(json.dumps(entry) + "\n")
            self._log.flush()
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"loss became {self.last_loss} at step {step}; lower --lr")
        self.loss_sum.zero_()
        self.since_log = self.tokens_since_log = 0
        self.t_log = time.perf_counter() if evaluated else now

    def info(self, step: int, lr: float) -> StepInfo:
        return StepInfo(step, self.cfg.steps, self.last_loss, lr, self.last_tps)

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps

    def save_checkpoint(self, step: int, model_state: dict, optimizer_state: dict) -> None:
        """Write out/checkpoint.pt atomically (main process only): all a resumed run needs."""
        if not self.main:
            return
        with runs.atomic_file(self.out / CHECKPOINT) as tmp:
            torch.save({
                "step": step, "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict(),
                "identity": self.identity or {}, "model": model_state, "optimizer": optimizer_state,
                "rng": rng_state(self.device), "wall_time_s": self.elapsed(), "recent_losses": self.recent,
                "first_loss": self.first_loss, "world": self.world,
            }, tmp)

    def record(self, model: torch.nn.Module, command: str | None) -> dict:
        """What every finished run records about itself (the caller adds its own keys)."""
        return {
            "config": self.cfg.to_dict(), **({"identity": self.identity} if self.identity is not None else {}),
            "parameters": sum(p.numel() for p in model.parameters()), "tokens_seen": self.tokens_seen,
            "first_loss": self.first_loss, "final_loss": (sum(self.recent) / len(self.recent)) if self.recent else None,
            "last_logged_loss": self.recent[-1] if self.recent else None, "wall_time_s": round(self.wall, 2),
            "device": device_name(self.device),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": runs.versions(), "command": command if command is not None else command_line(),
        }

    def publish(self, record_name: str, record: dict, write: Callable[[Path], None],
                keep_checkpoint: bool = False) -> None:
        """Put the finished model into `out`: `write(folder)` makes and fills a temporary folder
        inside it, whose files then replace their namesakes in `out`; the record (its presence
        marks the run finished) is written last, and the checkpoint dropped unless kept."""
        tmp = self.out / f".final-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write(tmp)
            record["model_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            for item in sorted(tmp.iterdir()):
                target = self.out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        runs.write_text(self.out / record_name, json.dumps(record, indent=2) + "\n")
        if not keep_checkpoint:
            (self.out / CHECKPOINT).unlink(missing_ok=True)


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
