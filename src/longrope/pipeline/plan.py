"""What a caller hands `extend`: the plan (stages, `PipelineConfig`) and how to show progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import scaling as sc
from .. import train
from ..search import SHORT_CAP, SearchConfig
from ..errors import UsageError

STAGE_KINDS = ("search", "finetune", "carry")
MARKER = "stage.json"  # written last into a finished stage's folder
PLAN, DONE = "plan.json", "extend.json"
MODEL_DIR, REPORT_JSON = "model", "report.json"  # (report.md and report.png: `report.write_extend_report`)
MAX_REPORT_LENGTHS = 6
READJUST_ATTENTION = ("one", "keep")


# --------------------------------------------------------------------------------------------
# the plan


parse_length = sc.parse_length  # the one reading of '64k' (plans, --lengths, --target-length)


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Stage:
    kind: str  # "search", "finetune", "carry" (or "readjust", added by the pipeline)
    length: int
    steps: int | None = None  # finetune: optimizer steps; search: most evaluations (None: the pipeline's default)

    @property
    def label(self) -> str:
        return f"{self.kind}:{format_length(self.length)}" + (f":{self.steps}" if self.steps is not None else "")

    def folder(self, index: int) -> str:
        return f"stage-{index:02d}-{self.kind}-{format_length(self.length)}"


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``search:64k,finetune:64k:400,search:256k:8`` -> Stages (UsageError naming the bad item).
    A third field is a finetune's steps or a search's largest number of evaluations."""
    hint = "write e.g. search:64k,finetune:64k,search:256k"
    if not str(text).strip():
        raise UsageError(f"--stages: empty plan; {hint}")
    stages = []
    for item in str(text).split(","):
        parts = [p.strip() for p in item.strip().split(":")]
        kind = parts[0].lower()
        if not item.strip():
            raise UsageError(f"--stages: empty stage in {text!r}; {hint}")
        if kind not in STAGE_KINDS:
            raise UsageError(f"--stages: unknown stage {parts[0]!r} in {item.strip()!r}; kinds: "
                             f"{', '.join(STAGE_KINDS)}; {hint}")
        if len(parts) not in (2, 3) or (kind == "carry" and len(parts) == 3):
            raise UsageError(f"--stages: {item.strip()!r} is not KIND:LENGTH (or finetune:LENGTH:STEPS, "
                             f"search:LENGTH:EVALS); {hint}")
        try:
            length = parse_length(parts[1])
        except UsageError as exc:
            raise UsageError(f"--stages: {item.strip()!r}: {exc}") from None
        steps = None
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                what = "steps" if kind == "finetune" else "evaluations"
                raise UsageError(f"--stages: {item.strip()!r}: {what} must be a positive integer")
            steps = int(parts[2])
        stages.append(Stage(kind, length, steps))
    return tuple(stages)


def check_plan(stages: Sequence[Stage], original_length: int, target_length: int) -> None:
    if target_length <= original_length:
        raise UsageError(f"--target-length {target_length} must be above the model's context {original_length}")
    if not stages:
        raise UsageError("--stages: empty plan")
    for stage in stages:
        if not original_length < stage.length <= target_length:
            raise UsageError(f"--stages: {stage.label} must be above the model's context {original_length} and "
                             f"at most --target-length {target_length}")
    if stages[0].kind == "carry":
        raise UsageError(f"--stages: {stages[0].label} carries an earlier stage's factors; put a search or finetune "
                         f"stage before it, e.g. finetune:{format_length(stages[0].length // 2)},{stages[0].label}")
    if stages[-1].length != target_length:
        raise UsageError(f"--stages: the last stage ({stages[-1].label}) must be at --target-length "
                         f"{format_length(target_length)}")


def default_report_lengths(original_length: int, target_length: int) -> tuple[int, ...]:
    """L₀, 2·L₀, 4·L₀ ... and the target, thinned to at most MAX_REPORT_LENGTHS (ends kept)."""
    lengths = [original_length]
    while lengths[-1] * 2 < target_length:
        lengths.append(lengths[-1] * 2)
    lengths.append(target_length)
    if len(lengths) > MAX_REPORT_LENGTHS:
        picks = np.linspace(0, len(lengths) - 1, MAX_REPORT_LENGTHS).round().astype(int)
        lengths = [lengths[i] for i in sorted(set(picks.tolist()))]
    return tuple(lengths)


@dataclass(frozen=True)
class PipelineConfig:
    """What `extend` does. The search, fine-tuning and report settings apply to every stage."""

    # "help": the command line's (`cli.add_config_options`)
    target_length: int
    stages: tuple[Stage, ...]
    # search documents per stage (the first L tokens of each)
    samples: int = field(default=5, metadata={"help": "documents per search"})
    search: SearchConfig = field(default_factory=SearchConfig)
    # template of every finetune stage: seq_len comes from the stage, steps from it when given
    finetune: train.FinetuneConfig = field(default_factory=lambda: train.FinetuneConfig(seq_len=2, steps=400))
    readjust: bool = field(default=True, metadata={"help": "skip the short-context readjustment"})  # --no-readjust
    readjust_cap: float = field(default=SHORT_CAP, metadata={"help": "largest searched short factor"})
    readjust_search: SearchConfig | None = None  # None: `search`
    readjust_attention: str = field(default="one", metadata={"choices": READJUST_ATTENTION, "help": (
        "short-regime attention factor: one (the model's own inside its window; exported as short_mscale, which "
        "vLLM and longrope.load apply and plain transformers ignores for Llama/Phi-3) or keep (the long factor at "
        "every length, transformers' longrope as it stands)")})
    report_lengths: tuple[int, ...] | None = None  # None: default_report_lengths
    report_docs: int = field(default=3, metadata={"help": "documents per length in the report"})
    passkey_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    passkey_trials: int = field(default=1, metadata={"help": "keys per length and depth (depths 0, 0.5, 1)"})
    seed: int = field(default=0, metadata={"help": "searches, document choice, training order"})
    device: str = "cpu"
    dtype: str = "float32"  # model dtype for searches and the report (bfloat16 on GPU)
    chunk_size: int | None = field(default=None, metadata={  # None: evaluate's default
        "help": "tokens per forward chunk in evaluation"})

    def validate(self) -> "PipelineConfig":
        checks = [
            (self.samples >= 1, f"--samples must be at least 1, got {self.samples}"),
            (self.report_docs >= 1, f"--report-docs must be at least 1, got {self.report_docs}"),
            (self.passkey_trials >= 0, f"--passkey-trials must be >= 0, got {self.passkey_trials}"),
            (all(0 <= d <= 1 for d in self.passkey_depths), "passkey depths must be in [0, 1]"),
            (self.dtype in ("float32", "bfloat16", "float16"), f"--dtype: unknown {self.dtype!r}"),
            (self.readjust_attention in READJUST_ATTENTION,
             f"--readjust-attention: one of {', '.join(READJUST_ATTENTION)}, got {self.readjust_attention!r}"),
            (self.chunk_size is None or self.chunk_size >= 1, "--chunk-size must be at least 1"),
            (self.report_lengths is None or all(n >= 2 for n in self.report_lengths),
             "--report-lengths must be at least 2 tokens each"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self.search.validate()
        (self.readjust_search or self.search).validate()
        self.finetune.validate()  # its stages' settings, before the first stage runs
        return self

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        out = {"target_length": self.target_length, "stages": [s.label for s in self.stages],
               "samples": self.samples, "search": self.search.to_dict(), "readjust": self.readjust,
               "seed": self.seed,
               "finetune": {k: v for k, v in self.finetune.to_dict().items()
                            if k not in train.FinetuneConfig.RUN_FIELDS + ("seq_len", "steps", "warmup")}}
        out["finetune"]["default_steps"] = self.finetune.steps
        if self.readjust:
            out["readjust_cap"] = self.readjust_cap
            out["readjust_attention"] = self.readjust_attention
            out["readjust_search"] = (self.readjust_search or self.search).to_dict()
        return out


# --------------------------------------------------------------------------------------------
# progress, handed in by the caller


@dataclass(frozen=True)
class ProgressHooks:
    """How `extend` shows its progress, from the caller (`progress.Progress` lives above this layer).
    `new_bar(total, description, unit)` makes a bar with Progress's interface (a context manager
    with update, update_to, skip, set_total, limit_time, close); `training_callback(bar)` makes the
    per-step callback of `train.finetune` that moves it (`progress.step_callback`)."""

    new_bar: Callable[[int | None, str, str], Any]
    training_callback: Callable[[Any], Callable[[Any], None] | None]


class SilentBar:
    """A bar that shows nothing (no display given, or a rank other than 0): every call does nothing."""

    n, total = 0, None  # read by `search.progress_hooks`

    def __enter__(self) -> "SilentBar":
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def silent_bar(total: int | None, description: str, unit: str) -> SilentBar:
    return SilentBar()


SILENT = ProgressHooks(new_bar=silent_bar, training_callback=lambda bar: None)
