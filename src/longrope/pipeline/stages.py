"""The stages (search, finetune, carry, readjust) and `extend`, which runs them in order, resumably."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data, distributed, models, runs, train
from .. import scaling as sc
from ..search import STATE as SEARCH_STATE
from ..search import (SearchConfig, SearchResult, SearchSpace, ShortFactorSpace, model_fitness, planned_evals,
                      progress_hooks, run_distributed, seeds_from)
from ..search import run as run_search
from ..errors import UsageError
from .measure import first_tokens, measure_report
from .plan import (DONE, MARKER, MODEL_DIR, PLAN, REPORT_JSON, SILENT, PipelineConfig, ProgressHooks, Stage,
                   check_plan, format_length, silent_bar)


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

    def __init__(self, base_spec: str, tokenizer, documents: Sequence[data.TokenizedDocument],
                 config: PipelineConfig, info: models.RopeInfo, out: Path, log: Callable[[str], None]):
        self.base_spec, self.model_spec = base_spec, base_spec
        self.tokenizer, self.documents, self.config, self.info = tokenizer, list(documents), config, info
        self.out, self.log = out, log
        self.scaling: sc.LongRoPEScaling | None = None
        self.data_digest = documents_digest(documents)
        self._loaded: tuple[str, Any] | None = None
        self.eval_documents: list[data.TokenizedDocument] | None = None  # the report's; None: `documents`
        self.ranks: distributed.Group | None = None  # under torchrun: this process's place (rank 0 writes)
        self.progress = SILENT  # how the stages show progress (the caller's hooks on rank 0)

    @property
    def device(self) -> str:
        return self.config.device

    def model(self):
        if self._loaded is None or self._loaded[0] != self.model_spec:
            self._loaded = None
            model, _ = models.load(self.model_spec, dtype=getattr(torch, self.config.dtype), device=self.device)
            self._loaded = (self.model_spec, model)
        return self._loaded[1]

    def release_model(self) -> None:
        """Drop the evaluation copy (a fine-tune or the report loads its own)."""
        self._loaded = None

    def model_label(self) -> str:
        """The current model as recorded in identities (a stage folder's name, not a path)."""
        spec = Path(self.model_spec)
        return f"stage:{spec.name}" if spec.parent == self.out else "base"


def documents_digest(documents: Sequence[data.TokenizedDocument]) -> str:
    h = hashlib.sha256()
    for d in documents:
        tokens = np.asarray(d.tokens, dtype=np.int64)
        h.update(f"{d.id}\0{len(tokens)}\0".encode())
        h.update(tokens.tobytes())
    return h.hexdigest()


def search_on_documents(load_model: Callable[[], Any], documents: Sequence[data.TokenizedDocument], length: int,
                        space: SearchSpace, config: SearchConfig, folder: Path, *, samples: int, seed: int,
                        identity: Mapping[str, Any], what: str, device="cpu", chunk_size: int | None = None,
                        new_bar: Callable[[int | None, str, str], Any] = silent_bar,
                        ranks: distributed.Group | None = None) -> SearchResult:
    """Search `space` for the lowest perplexity on the first `length` tokens of `samples`
    documents (`data.select` with `seed`; their ids go into the summary), checkpointing in
    `folder`: continued when it holds a search's state, else started afresh (which also clears a
    torn first generation). `identity` (plus the number of documents) must match on resume.
    `load_model()` gives the model, loaded inside the search so that under torchrun (`ranks`)
    every rank meets a failure together: each evaluates its share of each generation, rank 0
    breeds, writes and tells the others. `new_bar(total, what, "evals")`: its progress."""
    chosen = data.select(documents, length, samples, seed=seed)
    windows, ids = first_tokens(chosen, length, device), [d.id for d in chosen]
    fresh = not (folder / SEARCH_STATE).is_file()
    with new_bar(planned_evals(config), what, "evals") as bar:
        kwargs = dict(identity={**identity, "samples": len(windows)}, resume=not fresh, force=fresh,
                      extra_summary={"documents": ids}, **progress_hooks(bar, config))
        run = run_search if ranks is None else run_distributed

        def search():
            return run(space, model_fitness(load_model(), windows, chunk_size), config, folder, **kwargs)

        return search() if ranks is None else distributed.agree(ranks, search, everyone=True)


# --------------------------------------------------------------------------------------------
# the stages: (context, stage, folder) -> outcome. Each may be interrupted and run again.


def _search(ctx: Context, space: SearchSpace, config: SearchConfig, length: int, folder: Path,
            what: str) -> SearchResult:
    t0 = time.time()
    result = search_on_documents(ctx.model, ctx.documents, length, space, config, folder,
                                 samples=ctx.config.samples, seed=ctx.config.seed,
                                 identity={"model": ctx.model_label(), "data": ctx.data_digest}, what=what,
                                 device=ctx.device, chunk_size=ctx.config.chunk_size,
                                 new_bar=ctx.progress.new_bar, ranks=ctx.ranks)
    ctx.log(f"  {what}: best perplexity {result.fitness:.4g} ({result.summary['evals']} evaluations, "
            f"{time.time() - t0:.0f} s)")
    return result


def run_search_stage(ctx: Context, stage: Stage, folder: Path) -> StageOutcome:
    info = ctx.info
    previous = ctx.scaling
    seeds = seeds_from(previous, stage.length) if isinstance(previous, sc.LongRoPEScaling) else ()
    # --keep-angles-seen holds for the whole plan: searched factors keep them as fine-tuned ones do
    space = SearchSpace(info.dim, info.base, info.original_length, stage.length, seeds=seeds,
                        keep_angles_seen=ctx.config.finetune.keep_angles_seen)
    config = ctx.config.search
    if stage.steps is not None:  # search:L:EVALS, e.g. a few candidates where each is a 2M-token forward
        config = dataclasses.replace(config, max_evals=min(stage.steps, config.max_evals or stage.steps))
    result = _search(ctx, space, config, stage.length, folder, stage.label)
    return StageOutcome(result.scaling, None, {"fitness": result.fitness, "documents": result.summary["documents"],
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
    scaling = ctx.config.finetune.scaling_to_train(stage_scaling(ctx, stage.length), ctx.info.dim, ctx.info.base)
    record_path = folder / train.FT_RECORD
    if not record_path.is_file():  # (present: trained and exported, only the stage marker is missing)
        cfg = dataclasses.replace(ctx.config.finetune, seq_len=stage.length,
                                  steps=stage.steps or ctx.config.finetune.steps, device=ctx.device)
        tok = ctx.tokenizer
        packed = train.pack_documents([d.tokens for d in ctx.documents], stage.length, tok.bos_token_id,
                                      tok.eos_token_id)
        ctx.release_model()  # training loads its own float32 copy
        model, _ = models.load(ctx.model_spec, dtype=torch.float32, device=ctx.device)
        with ctx.progress.new_bar(cfg.steps, stage.label, "steps") as bar:
            train.finetune(model, tok, scaling, packed, cfg, folder, resume=True,
                           callback=ctx.progress.training_callback(bar),
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
    space = ShortFactorSpace.for_scaling(extended, info.dim, info.base, ctx.config.readjust_cap)
    result = _search(ctx, space, ctx.config.readjust_search or ctx.config.search, stage.length, folder,
                     f"readjust short factors at {format_length(stage.length)}")
    ones = result.summary["baselines"]["ones"]
    return StageOutcome(result.scaling, None, {"fitness": result.fitness, "all_ones_fitness": ones,
                                               "short_attention_factor": result.scaling.attention_factor(stage.length),
                                               "documents": result.summary["documents"],
                                               "evals": result.summary["evals"]})


def run_carry_stage(ctx: Context, stage: Stage, folder: Path) -> StageOutcome:
    """The current factors carried to the stage's length (`scaling.carry`) with no search: what
    `search:L` evaluates first, taken as it is. SmolLM2 fine-tuned at 64k retrieves at 128k with
    its factors carried there (docs/BENCHMARKS.md), where a search by perplexity need not pick them."""
    carried = sc.carry(ctx.scaling, stage.length)  # (check_plan puts a search or finetune stage first)
    ctx.log(f"  {stage.label}: factors carried from scale {ctx.scaling.factor:g} to {carried.factor:g}")
    return StageOutcome(carried, None, {"from_factor": ctx.scaling.factor, "factor": carried.factor})


RUNNERS: dict[str, Callable[[Context, Stage, Path], StageOutcome]] = {
    "search": run_search_stage, "finetune": run_finetune_stage, "carry": run_carry_stage,
    "readjust": run_readjust_stage}


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


def validate_inputs(config: PipelineConfig, info: models.RopeInfo, documents: Sequence[data.TokenizedDocument],
                    tokenizer) -> None:
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
            if config.finetune.retrieval_share:  # its shortest sequences must hold the facts and questions
                train.retention.check_retrieval_fits(
                    tokenizer, info.original_length if config.finetune.short_share else stage.length)
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


def extend(model_spec: str, tokenizer, documents: Sequence[data.TokenizedDocument], config: PipelineConfig,
           out: str | os.PathLike, *, resume: bool = False, force: bool = False,
           runners: Mapping[str, Callable[[Context, Stage, Path], StageOutcome]] | None = None,
           log: Callable[[str], None] = print,
           eval_documents: Sequence[data.TokenizedDocument] | None = None,
           max_stages: int | None = None, progress: ProgressHooks | None = None,
           render_report: Callable[[Path, dict], None] | None = None) -> ExtendResult:
    """Run the plan on the model at `model_spec` (an HF folder, .gguf or named model) with
    `documents` (tokenised with `tokenizer`), writing everything into `out`; with `resume`,
    finished stages are skipped and an unfinished one continues. `runners` maps a stage kind to
    the function that runs it (default `RUNNERS`; tests count calls through it).
    `eval_documents`: what the final report is measured on; keep them apart from `documents`
    (default: `documents`, and the report says so). `max_stages`: run at most this many stages in
    this call (skipped ones do not count) and return `paused` if any remain: for time-limited jobs.
    `progress`: how each stage's progress and the report's are shown (rank 0 only; None: not at
    all). `render_report(out, report)`: writes what report.json holds in a readable form
    (`report.write_extend_report`: report.md, report.png), once it is measured or found.
    """
    if max_stages is not None and max_stages < 1:
        raise UsageError(f"--max-stages must be at least 1, got {max_stages}")
    runners = {**RUNNERS, **(runners or {})}
    out = Path(out)
    info = models.rope_info(models.load_config(model_spec))
    validate_inputs(config, info, documents, tokenizer)
    # under torchrun: searches split each generation over the ranks, fine-tunes split each sequence;
    # rank 0 alone writes files, exports and measures the report
    ranks = distributed.init(torch.device(config.device).type) if distributed.world_size() > 1 else None
    main = ranks is None or ranks.is_main
    if ranks is not None:
        config = dataclasses.replace(config, device=str(ranks.device))
        log = log if main else (lambda message: None)
    stages = list(config.stages)
    if config.readjust:
        stages.append(Stage("readjust", info.original_length))
    where = runs.input_identity(model_spec)
    identity = {"model": where, "data": documents_digest(documents), **config.identity()}
    if ranks is None:
        _prepare_out(out, identity, resume, force)
    else:
        distributed.agree(ranks, lambda: _prepare_out(out, identity, resume, force))
    if (out / DONE).is_file():
        done = json.loads((out / DONE).read_text())
        log(f"{out}: already complete")
        return ExtendResult(out, sc.from_dict(done["scaling"]), out / MODEL_DIR,
                            json.loads((out / REPORT_JSON).read_text()), done["stages"])

    ctx = Context(model_spec, tokenizer, documents, config, info, out, log)
    ctx.eval_documents = list(eval_documents) if eval_documents else None
    ctx.ranks = ranks
    ctx.progress = progress if progress is not None and main else SILENT
    markers, ran = [], 0
    for index, stage in enumerate(stages, start=1):
        folder = out / stage.folder(index)
        marker = folder / MARKER
        if ranks is not None:
            distributed.barrier()  # every rank sees the same finished stages
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
        distributed.barrier()
        done = json.loads((out / DONE).read_text())
        return ExtendResult(out, final, model_dir, json.loads((out / REPORT_JSON).read_text()), done["stages"])
    if not (model_dir / "config.json").is_file():
        model = ctx.model()
        models.attach(model, final)
        models.export(model, tokenizer, final, model_dir, force=True)
    log(f"exported {model_dir}")
    if (out / REPORT_JSON).is_file():  # a resumed run reuses a finished report
        report = json.loads((out / REPORT_JSON).read_text())
    else:
        ctx.release_model()  # the report loads the export, and the base model, itself
        report = measure_report(model_dir, final, markers, base_spec=model_spec, info=info, config=config,
                                documents=ctx.eval_documents or ctx.documents,
                                held_apart=ctx.eval_documents is not None, new_bar=ctx.progress.new_bar)
        runs.write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    if render_report is not None:
        render_report(out, report)
    done = {"scaling": final.to_dict(), "stages": markers, "model": MODEL_DIR, "identity": identity}
    runs.write_text(out / DONE, json.dumps(done, indent=2) + "\n")
    if ranks is not None:
        distributed.barrier()
    return ExtendResult(out, final, model_dir, report, markers)


