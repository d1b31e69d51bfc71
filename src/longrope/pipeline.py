"""Progressive extension (LongRoPE §3.3), short-context readjustment, and the `LongRoPEModel` facade.

A plan is a list of stages run in order, e.g. ``search:64k,finetune:64k,search:256k,search:2048k``:

- ``search:L`` searches LongRoPE factors for L tokens on the current model (the base model, or
  the last fine-tuned one). Its initial population holds PI, NTK and YaRN and, after the first
  stage, the previous stage's factors as they are and carried to the new scale
  (`search.rescale_factors`), evaluated first. ``search:L:EVALS`` caps that stage's evaluations
  (at 2M tokens each candidate is minutes of GPU time: ``search:2048k:2`` tries the previous
  factors as they are and carried to the new scale, and keeps the better).
- ``finetune:L`` (or ``finetune:L:STEPS``) fine-tunes the current model at L tokens with the
  current scaling (when it targets L; otherwise LongRoPE with YaRN's factors for L), and the
  stages after it use the fine-tuned model.

Then (unless turned off) the short-context readjustment: `short_factor` is searched at the
original context L₀ with `long_factor`, n̂ and the long attention factor kept and, by default,
the short regime's attention factor set to 1 (`readjust_attention`: the temperature
sqrt(1 + ln s / ln L) corrects long inputs but sharpens short ones; transformers' longrope has
one factor for both, so this part travels as short_mscale and in longrope.json); fitness =
perplexity of the first L₀ tokens of the search documents. The factors lie in [1, cap]
(default 1.5; see `search.ShortFactorSpace`). Only L₀ is searched: the exported scaling has one short vector, used
for sequences up to L₀ (2·L₀ is in the long regime, where `long_factor` applies). All-ones is in the
initial population and the search returns the best it evaluated, so the result is never worse
than all-ones there, by construction. Last, the checkpoint carrying the final scaling is exported
to ``OUT/model`` and a report (perplexity and passkey at a few lengths from L₀ to the target) is
written.

Every stage writes into ``OUT/stage-NN-KIND-LENGTH/`` and, last and atomically, ``stage.json``;
a resumed run skips stages that have it and continues the one that has not (a search from its
state, a fine-tune from its checkpoint). ``extend.json`` is written when everything is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as D
from . import models, parallel, runs
from . import scaling as sc
from . import search as S
from . import train
from .errors import UsageError
from .progress import Progress, step_callback

STAGE_KINDS = ("search", "finetune")
MARKER = "stage.json"  # written last into a finished stage's folder
PLAN, DONE = "plan.json", "extend.json"
MODEL_DIR, REPORT_MD, REPORT_JSON, REPORT_PNG = "model", "report.md", "report.json", "report.png"
MAX_REPORT_LENGTHS = 6
READJUST_ATTENTION = ("one", "keep")


# --------------------------------------------------------------------------------------------
# the plan


parse_length = sc.parse_length  # the one reading of '64k' (plans, --lengths, --target-length)


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Stage:
    kind: str  # "search", "finetune" (or "readjust", added by the pipeline)
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
        if len(parts) not in (2, 3):
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

    target_length: int
    stages: tuple[Stage, ...]
    samples: int = 5  # search documents per stage (the first L tokens of each)
    search: S.SearchConfig = field(default_factory=S.SearchConfig)
    # template of every finetune stage: seq_len comes from the stage, steps from it when given
    finetune: train.FinetuneConfig = field(default_factory=lambda: train.FinetuneConfig(seq_len=2, steps=400))
    readjust: bool = True
    readjust_cap: float = S.SHORT_CAP
    readjust_search: S.SearchConfig | None = None  # None: `search`
    # the short regime's attention factor after readjustment: "one" (the model's own temperature
    # inside its trained window; exported as short_mscale, which plain transformers ignores for
    # Llama / Phi-3) or "keep" (the long one at every length, transformers' longrope as it stands)
    readjust_attention: str = "one"
    report_lengths: tuple[int, ...] | None = None  # None: default_report_lengths
    report_docs: int = 3
    passkey_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    passkey_trials: int = 1  # keys per (length, depth)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # model dtype for searches and the report (bfloat16 on GPU)
    chunk_size: int | None = None  # evaluate's default

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
# what the stages share


@dataclass
class StageOutcome:
    scaling: sc.LongRoPEScaling
    model: str | None = None  # a new model folder for the stages after this one (fine-tuning)
    summary: dict = field(default_factory=dict)


class Context:
    """The state that moves from stage to stage: which model the next stage starts from, the
    current scaling, the documents; the model is loaded lazily and kept while it is current."""

    def __init__(self, base_spec: str, tokenizer, documents: Sequence[D.TokenizedDocument],
                 config: PipelineConfig, info: models.RopeInfo, out: Path, log: Callable[[str], None]):
        self.base_spec, self.model_spec = base_spec, base_spec
        self.tokenizer, self.documents, self.config, self.info = tokenizer, list(documents), config, info
        self.out, self.log = out, log
        self.scaling: sc.LongRoPEScaling | None = None
        self.data_digest = documents_digest(documents)
        self._loaded: tuple[str, Any] | None = None
        self.eval_documents: list[D.TokenizedDocument] | None = None  # the report's; None: `documents`
        self.ranks: parallel.Group | None = None  # under torchrun: this process's place (rank 0 writes)
        self.progress = True  # show the stages' progress (`progress.Progress`); off: quiet, or not rank 0

    @property
    def device(self) -> str:
        return self.config.device

    def model(self):
        if self._loaded is None or self._loaded[0] != self.model_spec:
            self._loaded = None
            model, _ = models.load(self.model_spec, dtype=getattr(torch, self.config.dtype), device=self.device)
            self._loaded = (self.model_spec, model)
        return self._loaded[1]

    def model_label(self) -> str:
        """The current model as recorded in identities (a stage folder's name, not a path)."""
        spec = Path(self.model_spec)
        return f"stage:{spec.name}" if spec.parent == self.out else "base"

    def windows(self, length: int) -> tuple[list, list[str]]:
        """The first `length` tokens of `samples` documents (seeded choice), on the device."""
        chosen = D.select(self.documents, length, self.config.samples, seed=self.config.seed)
        windows = [torch.as_tensor(d.tokens[:length], dtype=torch.long, device=self.device) for d in chosen]
        return windows, [d.id for d in chosen]

    def fitness(self, windows):
        return S.model_fitness(self.model(), windows, self.config.chunk_size)


def documents_digest(documents: Sequence[D.TokenizedDocument]) -> str:
    h = hashlib.sha256()
    for d in documents:
        tokens = np.asarray(d.tokens, dtype=np.int64)
        h.update(f"{d.id}\0{len(tokens)}\0".encode())
        h.update(tokens.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the stages: (context, stage, folder) -> outcome. Each may be interrupted and run again.


def _search(ctx: Context, space: S.SearchSpace, config: S.SearchConfig, windows, ids, folder: Path,
            what: str) -> S.SearchResult:
    identity = {"model": ctx.model_label(), "data": ctx.data_digest, "samples": len(windows)}
    fresh = not (folder / S.STATE).is_file()  # nothing to resume: start (clears a torn first generation)
    t0 = time.time()
    bar = Progress(S.planned_evals(config), what, "evals", quiet=not ctx.progress, leave=False)
    kwargs = dict(identity=identity, resume=not fresh, force=fresh, extra_summary={"documents": ids},
                  **S.progress_hooks(bar, config))
    with bar:
        if ctx.ranks is None:
            result = S.run(space, ctx.fitness(windows), config, folder, **kwargs)
        else:  # every rank evaluates its share of each generation; rank 0 breeds, writes, and tells the others
            result = parallel.agree(ctx.ranks, lambda: S.run_distributed(space, ctx.fitness(windows), config,
                                                                          folder, **kwargs), everyone=True)
    ctx.log(f"  {what}: best perplexity {result.fitness:.4g} ({result.summary['evals']} evaluations, "
            f"{time.time() - t0:.0f} s)")
    return result


def run_search_stage(ctx: Context, stage: Stage, folder: Path) -> StageOutcome:
    info = ctx.info
    previous = ctx.scaling
    seeds = S.seeds_from(previous, stage.length) if isinstance(previous, sc.LongRoPEScaling) else ()
    space = S.SearchSpace(info.dim, info.base, info.original_length, stage.length, seeds=seeds)
    windows, ids = ctx.windows(stage.length)
    config = ctx.config.search
    if stage.steps is not None:  # search:L:EVALS, e.g. a few candidates where each is a 2M-token forward
        config = dataclasses.replace(config, max_evals=min(stage.steps, config.max_evals or stage.steps))
    result = _search(ctx, space, config, windows, ids, folder, stage.label)
    return StageOutcome(result.scaling, None, {"fitness": result.fitness, "documents": ids,
                                               "baselines": result.summary["baselines"],
                                               "evals": result.summary["evals"]})


def stage_scaling(ctx: Context, length: int) -> sc.LongRoPEScaling:
    """The scaling a fine-tune at `length` uses: the current one if it targets `length`, else
    LongRoPE with YaRN's factors for `length`."""
    if isinstance(ctx.scaling, sc.LongRoPEScaling) and ctx.scaling.target_length == length:
        return ctx.scaling
    info = ctx.info
    return sc.make("longrope", info.original_length, length, dim=info.dim, base=info.base)


def run_finetune_stage(ctx: Context, stage: Stage, folder: Path) -> StageOutcome:
    scaling = stage_scaling(ctx, stage.length)
    record_path = folder / train.FT_RECORD
    if not record_path.is_file():  # (present: trained and exported, only the stage marker is missing)
        cfg = dataclasses.replace(ctx.config.finetune, seq_len=stage.length,
                                  steps=stage.steps or ctx.config.finetune.steps, device=ctx.device)
        tok = ctx.tokenizer
        packed = train.pack_documents([d.tokens for d in ctx.documents], stage.length, tok.bos_token_id,
                                      tok.eos_token_id)
        ctx._loaded = None  # free the evaluation copy; training loads its own float32 one
        model, _ = models.load(ctx.model_spec, dtype=torch.float32, device=ctx.device)
        with Progress(cfg.steps, stage.label, "steps", quiet=not ctx.progress, leave=False) as bar:
            train.finetune(model, tok, scaling, packed, cfg, folder, resume=True, callback=step_callback(bar),
                           identity={"model": ctx.model_label(), "data": ctx.data_digest},
                           command=f"longrope extend ({stage.label})")
        del model
    record = json.loads(record_path.read_text())
    ctx.log(f"  {stage.label}: loss {record['first_loss']:.4g} -> {record['final_loss']:.4g} "
            f"({record['config']['steps']} steps, {record['wall_time_s']:.0f} s)")
    return StageOutcome(scaling, str(folder), {"first_loss": record["first_loss"], "final_loss": record["final_loss"],
                                               "steps": record["config"]["steps"]})


def run_readjust_stage(ctx: Context, stage: Stage, folder: Path) -> StageOutcome:
    if not isinstance(ctx.scaling, sc.LongRoPEScaling):
        raise UsageError("readjustment needs a LongRoPE scaling from an earlier stage")
    info = ctx.info
    extended = ctx.scaling
    if ctx.config.readjust_attention == "one":  # inside the trained window, the model's own temperature
        extended = extended.replace(short_attention_factor=1.0)
    space = S.ShortFactorSpace.for_scaling(extended, info.dim, info.base, ctx.config.readjust_cap)
    windows, ids = ctx.windows(stage.length)
    result = _search(ctx, space, ctx.config.readjust_search or ctx.config.search, windows, ids, folder,
                     f"readjust short factors at {format_length(stage.length)}")
    ones = result.summary["baselines"]["ones"]
    return StageOutcome(result.scaling, None, {"fitness": result.fitness, "all_ones_fitness": ones,
                                               "short_attention_factor": result.scaling.attention_factor(stage.length),
                                               "documents": ids, "evals": result.summary["evals"]})


RUNNERS: dict[str, Callable[[Context, Stage, Path], StageOutcome]] = {
    "search": run_search_stage, "finetune": run_finetune_stage, "readjust": run_readjust_stage}


# --------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class ExtendResult:
    out: Path
    scaling: sc.LongRoPEScaling  # the final scaling (long factors of the last search, readjusted short ones)
    model_dir: Path | None  # the exported checkpoint carrying it (None: paused before the export)
    report: dict | None  # what report.json holds (None: paused)
    stages: list[dict] = field(default_factory=list)  # each stage's marker
    paused: bool = False  # `max_stages` reached with stages left: continue with resume=True


def validate_inputs(config: PipelineConfig, info: models.RopeInfo, documents: Sequence[D.TokenizedDocument]) -> None:
    """Everything that can be checked before any stage runs (UsageError naming the problem)."""
    config.validate()
    check_plan(config.stages, info.original_length, config.target_length)
    if not documents:
        raise UsageError("--data: no documents")
    longest = max(len(d) for d in documents)
    total = sum(len(d) + 2 for d in documents)
    needs = [(s, s.length) for s in config.stages if s.kind == "search"]
    if config.readjust:
        needs.append((Stage("readjust", info.original_length), info.original_length))
    for stage, length in needs:
        if longest < length:
            raise UsageError(f"--data: {stage.label} needs a document of {length} tokens; the longest has "
                             f"{longest}; give longer documents or a shorter stage")
    for stage in config.stages:
        if stage.kind == "finetune":
            if total < stage.length:
                raise UsageError(f"--data: {stage.label}: the documents hold about {total} tokens in all, less "
                                 f"than one sequence of {stage.length}")
            dataclasses.replace(config.finetune, seq_len=stage.length, steps=stage.steps or config.finetune.steps,
                                device=config.device).validate()
    if config.readjust and not 1 < config.readjust_cap <= 1.25 * config.target_length / info.original_length:
        raise UsageError(f"--readjust-cap must be above 1 and at most 1.25 × the scale, got {config.readjust_cap}")


def _prepare_out(out: Path, identity: dict, resume: bool, force: bool) -> None:
    runs.check_out(out, force=force, resume=resume, resumable=True)
    plan = out / PLAN
    if out.is_dir() and any(out.iterdir()) and resume:
        if not plan.is_file():
            raise UsageError(f"--resume {out}: no {PLAN} there, so nothing to resume; choose another folder")
        saved = json.loads(plan.read_text())
        diff = runs.differences(saved, identity)
        if diff:
            raise UsageError(f"--resume {out}: that run was made with a different {diff[0]} "
                             f"({str(saved.get(diff[0]))[:80]!r}); use the same settings, another --out, or --force")
    runs.open_dir(out, force=force, resume=resume, command="extend")
    runs.write_text(plan, json.dumps(identity, indent=2) + "\n")


def extend(model_spec: str, tokenizer, documents: Sequence[D.TokenizedDocument], config: PipelineConfig,
           out: str | os.PathLike, *, resume: bool = False, force: bool = False,
           runners: Mapping[str, Callable[[Context, Stage, Path], StageOutcome]] | None = None,
           log: Callable[[str], None] = print,
           eval_documents: Sequence[D.TokenizedDocument] | None = None,
           max_stages: int | None = None, progress: bool = True) -> ExtendResult:
    """Run the plan on the model at `model_spec` (an HF folder, .gguf or named model) with
    `documents` (tokenised with `tokenizer`), writing everything into `out`; with `resume`,
    finished stages are skipped and an unfinished one continues. `runners` maps a stage kind to
    the function that runs it (default `RUNNERS`; tests count calls through it).
    `eval_documents`: what the final report is measured on; keep them apart from `documents`
    (default: `documents`, and the report says so). `max_stages`: run at most this many stages in
    this call (skipped ones do not count) and return `paused` if any remain: for time-limited jobs.
    `progress`: show each stage's progress and the report's (`progress.Progress`; rank 0 only).
    """
    if max_stages is not None and max_stages < 1:
        raise UsageError(f"--max-stages must be at least 1, got {max_stages}")
    runners = {**RUNNERS, **(runners or {})}
    out = Path(out)
    info = models.rope_info(models.load_config(model_spec))
    validate_inputs(config, info, documents)
    # under torchrun: searches split each generation over the ranks, fine-tunes split each sequence
    # (`parallel`); rank 0 alone writes files, exports and evaluates the report
    ranks = parallel.init(torch.device(config.device).type) if parallel.world_size() > 1 else None
    main = ranks is None or ranks.is_main
    if ranks is not None:
        config = dataclasses.replace(config, device=str(ranks.device))
        log = log if main else (lambda message: None)
    stages = list(config.stages)
    if config.readjust:
        stages.append(Stage("readjust", info.original_length))
    where = os.path.abspath(model_spec) if os.path.exists(model_spec) else model_spec
    identity = {"model": where, "data": documents_digest(documents), **config.identity()}
    if ranks is None:
        _prepare_out(out, identity, resume, force)
    else:
        parallel.agree(ranks, lambda: _prepare_out(out, identity, resume, force))
    if (out / DONE).is_file():
        done = json.loads((out / DONE).read_text())
        log(f"{out}: already complete")
        return ExtendResult(out, sc.from_dict(done["scaling"]), out / MODEL_DIR,
                            json.loads((out / REPORT_JSON).read_text()), done["stages"])

    ctx = Context(model_spec, tokenizer, documents, config, info, out, log)
    ctx.eval_documents = list(eval_documents) if eval_documents else None
    ctx.ranks = ranks
    ctx.progress = progress and main
    markers, ran = [], 0
    for index, stage in enumerate(stages, start=1):
        folder = out / stage.folder(index)
        marker = folder / MARKER
        if ranks is not None:
            parallel.barrier()  # every rank sees the same finished stages
        if max_stages is not None and ran == max_stages and not marker.is_file():
            log(f"paused after {ran} stage(s) (max_stages); {len(stages) - index + 1} left: run again with resume")
            return ExtendResult(out, ctx.scaling, None, None, markers, paused=True)
        if marker.is_file():
            saved = json.loads(marker.read_text())
            ctx.scaling = sc.from_dict(saved["scaling"])
            if saved.get("model"):
                ctx.model_spec = str(out / saved["model"])
            log(f"stage {index}/{len(stages)} {stage.label}: done before, skipped")
            markers.append(saved)
            continue
        log(f"stage {index}/{len(stages)} {stage.label}")
        runs.make_dir(folder, command=f"extend {stage.label}")
        t0 = time.time()
        outcome = runners[stage.kind](ctx, stage, folder)
        ran += 1
        saved = {"index": index, "stage": stage.label, "kind": stage.kind, "length": stage.length,
                 "scaling": outcome.scaling.to_dict(),
                 "model": os.path.relpath(outcome.model, out) if outcome.model else None,
                 "summary": outcome.summary, "seconds": round(time.time() - t0, 2)}
        if main:
            runs.write_text(marker, json.dumps(saved, indent=2) + "\n")
        ctx.scaling = sc.from_dict(saved["scaling"])  # as a resumed run reads it back
        if outcome.model:
            ctx.model_spec = outcome.model
        markers.append(saved)

    final = ctx.scaling
    model_dir = out / MODEL_DIR
    if not main:  # rank 0 exports and measures the report
        parallel.barrier()
        done = json.loads((out / DONE).read_text())
        return ExtendResult(out, final, model_dir, json.loads((out / REPORT_JSON).read_text()), done["stages"])
    if not (model_dir / "config.json").is_file():
        model = ctx.model()
        models.attach(model, final)
        models.export(model, tokenizer, final, model_dir, force=True)
    log(f"exported {model_dir}")
    report = write_report(ctx, model_dir, final, markers)
    done = {"scaling": final.to_dict(), "stages": markers, "model": MODEL_DIR, "identity": identity}
    runs.write_text(out / DONE, json.dumps(done, indent=2) + "\n")
    if ranks is not None:
        parallel.barrier()
    return ExtendResult(out, final, model_dir, report, markers)


# --------------------------------------------------------------------------------------------
# the report


@torch.no_grad()
def evaluate_lengths(model, tokenizer, documents: Sequence[D.TokenizedDocument], lengths: Sequence[int], *,
                     n_docs: int, depths: Sequence[float], trials: int, seed: int, device: str,
                     chunk_size: int | None = None, quiet: bool = True) -> list[dict]:
    """Per length: perplexity of the first L tokens of `n_docs` documents (None where no document
    is long enough) and passkey accuracy over depths × trials (None where the prompt does not fit).
    `quiet=False`: show progress, length by length (the longest costs the most by far): a cell is
    the perplexity or one passkey trial."""
    from . import evaluate

    rows = []
    rng = random.Random(seed)
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    for length in lengths:
        bar = Progress(1 + len(depths) * trials, f"report {format_length(length)}", "cells", quiet=quiet)
        row: dict[str, Any] = {"length": length}
        eligible = [d for d in documents if len(d) >= length]
        if eligible:
            chosen = D.select(eligible, length, n_docs, seed=seed + 1)
            windows = [torch.as_tensor(d.tokens[:length], dtype=torch.long, device=device) for d in chosen]
            row["ppl"] = float(evaluate.perplexity(model, windows, **kwargs))
            row["documents"] = [d.id for d in chosen]
        else:
            row["ppl"], row["documents"] = None, []
        bar.update()
        answers = []
        for depth in depths:
            for _ in range(trials):
                key = evaluate.random_key(rng)
                try:
                    prompt = evaluate.passkey_prompt(tokenizer, length, depth, key)
                except ValueError:  # the prompt alone is longer than `length`
                    prompt = None
                if prompt is not None:
                    answers.append(evaluate.passkey_trial(model, tokenizer, prompt))
                bar.update()
        row["passkey"] = evaluate.passkey_accuracy(answers) if answers else None
        row["passkey_trials"] = len(answers)
        rows.append(row)
        bar.close()
    return rows


def write_report(ctx: Context, model_dir: Path, final: sc.LongRoPEScaling, markers: list[dict]) -> dict:
    """Evaluate the exported checkpoint (reloaded, so the export is what is measured) and write
    report.json and report.md (atomically; a resumed run reuses a finished report)."""
    from . import evaluate

    out, config, info = ctx.out, ctx.config, ctx.info
    if (out / REPORT_JSON).is_file():
        return json.loads((out / REPORT_JSON).read_text())
    lengths = config.report_lengths or default_report_lengths(info.original_length, config.target_length)
    ctx._loaded = None
    model, tokenizer = models.load(str(model_dir), dtype=getattr(torch, config.dtype), device=config.device)
    models.attach(model, final)  # our float64-angle rotary rather than transformers' own
    held_apart = ctx.eval_documents is not None
    documents = ctx.eval_documents if held_apart else ctx.documents
    rows = evaluate_lengths(model, tokenizer, documents, lengths, n_docs=config.report_docs,
                            depths=config.passkey_depths, trials=config.passkey_trials, seed=config.seed,
                            device=config.device, chunk_size=config.chunk_size, quiet=not ctx.progress)
    # inside the original window, the base model on the same documents: what readjustment must keep
    short_rows = [r for r in rows if r["length"] <= info.original_length and r["ppl"] is not None]
    if short_rows:
        del model
        base, _ = models.load(ctx.base_spec, dtype=getattr(torch, config.dtype), device=config.device)
        by_id = {d.id: d for d in documents}
        kwargs = {} if config.chunk_size is None else {"chunk_size": config.chunk_size}
        for r in short_rows:
            windows = [torch.as_tensor(by_id[i].tokens[:r["length"]], dtype=torch.long, device=config.device)
                       for i in r["documents"]]
            r["base_ppl"] = float(evaluate.perplexity(base, windows, **kwargs))
        del base
    report = {"model": ctx.base_spec, "original_length": info.original_length,
              "target_length": config.target_length, "scaling": final.to_dict(), "results": rows,
              "stages": [{k: m[k] for k in ("stage", "summary", "seconds")} for m in markers],
              "note": ("perplexity: first L tokens of documents drawn from --eval-data, which the stages never "
                       "saw" if held_apart else "perplexity: first L tokens of documents drawn from --data (they may "
                       "include the search documents; give --eval-data to keep them apart)")
                      + "; passkey: standard filler, greedy exact match"}
    runs.write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    lines = [f"# longrope extend: {format_length(info.original_length)} -> {format_length(config.target_length)}",
             "", "| stage | result |", "| --- | --- |"]
    for m in markers:
        s = m["summary"]
        if "final_loss" in s:
            what = f"loss {s['first_loss']:.4g} -> {s['final_loss']:.4g} in {s['steps']} steps"
        elif "all_ones_fitness" in s:
            what = f"perplexity at L₀ {s['fitness']:.4g} (all-ones short factors {s['all_ones_fitness']:.4g})"
        else:
            what = f"search perplexity {s['fitness']:.4g} ({s['evals']} evaluations)"
        lines.append(f"| {m['stage']} | {what} |")
    lines += ["", "| length | perplexity | base model | passkey |", "| ---: | ---: | ---: | ---: |"]
    for r in rows:
        ppl = "n/a" if r["ppl"] is None else f"{r['ppl']:.3f}"
        base_ppl = f"{r['base_ppl']:.3f}" if "base_ppl" in r else ""
        pk = "n/a" if r["passkey"] is None else f"{r['passkey']:.0%} of {r['passkey_trials']}"
        lines.append(f"| {format_length(r['length'])} | {ppl} | {base_ppl} | {pk} |")
    lines += ["", f"Checkpoint: `{MODEL_DIR}/` ({final.rope_type}, factor {final.factor:g}, n̂ = {final.n_hat}).",
              report["note"] + "."]
    runs.write_text(out / REPORT_MD, "\n".join(lines) + "\n")
    _plot_report(rows, out / REPORT_PNG)
    return report


def _plot_report(rows: list[dict], path: Path) -> None:
    """Perplexity by length of the extended model, and of the base model inside its window."""
    from .report import plot_ppl

    records = [{"method": "extended", "length": r["length"], "ppl": r["ppl"]} for r in rows if r["ppl"] is not None]
    records += [{"method": "base model", "length": r["length"], "ppl": r["base_ppl"]} for r in rows if "base_ppl" in r]
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # savefig reads the format from it
    if records and plot_ppl(records, tmp):
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# the seed-style facade


class LongRoPEModel(torch.nn.Module):
    """A small Llama-architecture language model (transformers' LlamaForCausalLM, the byte-level
    tokenizer of `longrope.tokenization`, head_dim = d_model // n_heads) whose context window
    `extend_context` extends with the progressive LongRoPE pipeline.

    ``model(input_ids)`` takes a (batch, seq) LongTensor of token ids and returns the logits, a
    float tensor (batch, seq, vocab). The model starts randomly initialised (seeded): train it
    (`longrope.train`) or load weights into `model.hf_model` to make the numbers mean something.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 4, num_layers: int = 4, base_length: int = 256, *,
                 n_kv_heads: int | None = None, intermediate_size: int | None = None, rope_theta: float = 10000.0,
                 seed: int = 0):
        super().__init__()
        from .tokenization import byte_tokenizer

        if d_model < 2 or n_heads < 1 or d_model % n_heads or (d_model // n_heads) % 2:
            raise UsageError(f"LongRoPEModel: d_model ({d_model}) must be a multiple of n_heads ({n_heads}) with an "
                             "even head_dim (RoPE rotates pairs)")
        cfg = train.PretrainConfig(context=base_length, d_model=d_model, layers=num_layers, heads=n_heads,
                                   kv_heads=n_kv_heads or n_heads, head_dim=d_model // n_heads,
                                   intermediate_size=intermediate_size, rope_theta=rope_theta, seed=seed,
                                   passkey_share=0.0)
        try:
            cfg.validate()
        except UsageError as exc:  # its messages name pretrain's options
            names = {"--context": "base_length", "--layers": "num_layers", "--heads": "n_heads",
                     "--kv-heads": "n_kv_heads", "--d-model": "d_model"}
            message = str(exc)
            for option, name in names.items():
                message = message.replace(option + " ", name + " ")
            raise UsageError(f"LongRoPEModel: {message}") from None
        self.hf_model = train.build_model(cfg).eval()
        self.tokenizer = byte_tokenizer()
        self.base_length = base_length
        self.max_length = base_length
        self.scaling: sc.Scaling | None = None
        self.workdir: Path | None = None

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike, device: str = "cpu") -> "LongRoPEModel":
        """Wrap an existing model (an HF folder, .gguf or named model) instead of a fresh one."""
        model, tokenizer = models.load(str(spec), device=device)
        info = models.rope_info(model.config)
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.hf_model, self.tokenizer = model, tokenizer
        self.base_length = self.max_length = info.original_length
        self.scaling, self.workdir = models.attached_scaling(model), None
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.hf_model.get_output_embeddings().weight.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        return self.hf_model(input_ids=ids, use_cache=False).logits

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text)["input_ids"]])

    def extend_context(self, data, target_length: int | str, *, stages: str | None = None,
                       out: str | os.PathLike | None = None, finetune_steps: int = 0, samples: int = 2,
                       search: S.SearchConfig | None = None, readjust: bool = True,
                       report_lengths: Sequence[int] | None = None, device: str = "cpu", resume: bool = False,
                       seed: int = 0, log: Callable[[str], None] = print) -> ExtendResult:
        """Extend the context window to `target_length` tokens with the progressive pipeline and
        return its result; afterwards the model carries the final scaling (and fine-tuned weights).

        `data`: a path (.txt/.md, folder, .jsonl(.gz), .parquet), "bundled", or a list of texts.
        `stages` default: ``search:TARGET``; with `finetune_steps` > 0, LongRoPE's progressive
        recipe in small: ``search:HALF,finetune:HALF:STEPS,search:TARGET`` (HALF = TARGET/2 when
        that is above the base length, else TARGET). Small search budget by default
        (population 16, 4 generations). Outputs go to `out` (default: a new temporary folder,
        kept in `self.workdir`)."""
        target = parse_length(target_length) if isinstance(target_length, str) else int(target_length)
        if target <= self.base_length:
            raise UsageError(f"target_length {target} must be above the model's context {self.base_length}")
        if stages is None:
            half = target // 2
            mid = half if half > self.base_length else target
            stages = (f"search:{mid},finetune:{mid}:{finetune_steps},search:{target}" if finetune_steps > 0
                      else f"search:{target}")
        plan = parse_stages(stages)
        workdir = (runs.open_dir(out, resume=resume, command="extend_context") if out is not None
                   else Path(tempfile.mkdtemp(prefix="longrope-extend-")))
        self.workdir = workdir
        base = workdir / "base-model"
        run_dir = workdir / "run"
        if not (resume and (base / "config.json").is_file()):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            shutil.rmtree(base, ignore_errors=True)
            self.hf_model.save_pretrained(base)
            self.tokenizer.save_pretrained(base)
        documents = self._documents(data)
        config = PipelineConfig(
            target_length=target, stages=plan, samples=samples,
            search=search or S.SearchConfig(population=16, mutations=4, crossovers=4, parents=8, generations=4,
                                            seed=seed),
            finetune=train.FinetuneConfig(seq_len=2, steps=max(1, finetune_steps), lr=1e-4, checkpoint_every=50,
                                          log_every=10, device=device),
            readjust=readjust, report_lengths=tuple(report_lengths) if report_lengths else None,
            seed=seed, device=device)
        result = extend(str(base), self.tokenizer, documents, config, run_dir, resume=resume, log=log)
        model, _ = models.load(str(result.model_dir), device=device)
        models.attach(model, result.scaling)
        self.hf_model, self.scaling, self.max_length = model, result.scaling, target
        return result

    def _documents(self, data) -> list[D.TokenizedDocument]:
        if isinstance(data, (str, os.PathLike)):
            return D.load_tokenized(data, self.tokenizer)
        texts = list(data)
        if not texts:
            raise UsageError("data: no documents")
        specials = D.special_tokens_added(self.tokenizer)
        docs = []
        for i, item in enumerate(texts):
            doc_id, text = (item.id, item.text) if isinstance(item, D.Document) else (f"doc{i}", str(item))
            docs.append(D.TokenizedDocument(doc_id, np.asarray(D.tokenize_text(self.tokenizer, text, specials=specials),
                                                               dtype=np.int64)))
        return docs

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Export the model (with its scaling, if extended) as a Hugging Face checkpoint."""
        scaling = self.scaling or sc.NoScaling()
        return models.export(self.hf_model, self.tokenizer, scaling, path, force=force)
