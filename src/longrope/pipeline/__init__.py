"""Progressive extension (LongRoPE §3.3) and short-context readjustment: the plan (`plan`), its
stages and `extend` (`stages`), and the measurement of the final report (`measure`). The
seed-style facade over all of it is `facade.LongRoPEModel`.

A plan is a list of stages run in order, e.g. ``search:64k,finetune:64k,search:256k,search:2048k``:

- ``search:L`` searches LongRoPE factors for L tokens on the current model (the base model, or
  the last fine-tuned one). Its initial population holds PI, NTK and YaRN and, after the first
  stage, the previous stage's factors as they are and carried to the new scale
  (`scaling.carry`), evaluated first. ``search:L:EVALS`` caps that stage's evaluations
  (at 2M tokens each candidate is minutes of GPU time: ``search:2048k:2`` tries the previous
  factors as they are and carried to the new scale, and keeps the better).
- ``carry:L`` carries the current factors to L without a search (`scaling.carry`: λ^(ln s'/ln s),
  the temperature for s'): the progressive seed taken as it is, e.g. ``finetune:64k,carry:128k``.
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
to ``OUT/model`` and the report (perplexity and passkey at a few lengths from L₀ to the target)
is measured into ``OUT/report.json``; the caller's `render_report` (`report.write_extend_report`)
turns it into report.md and report.png.

Every stage writes into ``OUT/stage-NN-KIND-LENGTH/`` and, last and atomically, ``stage.json``;
a resumed run skips stages that have it and continues the one that has not (a search from its
state, a fine-tune from its checkpoint). ``extend.json`` is written when everything is done.

The display of progress lives above this layer (`progress`): the caller hands in `ProgressHooks`.
"""

from .measure import evaluate_lengths, first_tokens, measure_report
from .plan import (DONE, MARKER, MAX_REPORT_LENGTHS, MODEL_DIR, PLAN, READJUST_ATTENTION, REPORT_JSON, SILENT,
                   STAGE_KINDS, PipelineConfig, ProgressHooks, SilentBar, Stage, check_plan, default_report_lengths,
                   format_length, parse_length, parse_stages, silent_bar)
from .stages import (RUNNERS, Context, ExtendResult, StageOutcome, documents_digest, extend, run_carry_stage,
                     run_finetune_stage, run_readjust_stage, run_search_stage, search_on_documents, stage_scaling,
                     validate_inputs)

__all__ = [
    "DONE", "MARKER", "MAX_REPORT_LENGTHS", "MODEL_DIR", "PLAN", "READJUST_ATTENTION", "REPORT_JSON", "RUNNERS",
    "SILENT", "STAGE_KINDS",
    "Context", "ExtendResult", "PipelineConfig", "ProgressHooks", "SilentBar", "Stage", "StageOutcome",
    "check_plan", "default_report_lengths", "documents_digest", "evaluate_lengths", "extend", "first_tokens",
    "format_length", "measure_report", "parse_length", "parse_stages", "run_finetune_stage", "run_readjust_stage",
    "run_carry_stage", "run_search_stage", "search_on_documents", "silent_bar", "stage_scaling", "validate_inputs",
]
