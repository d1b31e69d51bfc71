"""Evaluation: perplexity of long documents through the lean forward (`perplexity`), generation
across LongRoPE's short/long switch and passkey trials (`generation`), and several scalings
measured side by side (`methods`: what `longrope eval` runs). The prompts are `longrope.passkey`'s.
RULER-style tasks: their prompts and scorer (`ruler`), run on a model resumably (`ruler_suite`).

Supported: causal LMs whose logits are `lm_head(final hidden states)` (Llama, Mistral, Qwen2/3,
Phi-3); `logits_scaling` and `final_logit_softcapping` in the config are applied if present.
"""

from .generation import PasskeyTrial, greedy_generate, passkey_accuracy, passkey_trial
from .methods import (MethodSpec, method_entries, method_specs, passkey_prompts, passkey_records, perplexity_records, scaling_at,
                      scaling_label)
from .perplexity import (DEFAULT_CHUNK, FORWARDS, PeakMemory, as_batch, document_windows, hidden_states,
                         modules_hidden_states, needle_nll, nll_of_hidden, nll_sum, nll_windows, peak_memory,
                         perplexity, perplexity_from, stock_nll)
from .ruler import (NIAH_HAYSTACKS, NIAH_WORDINGS, TASKS as RULER_TASKS, RulerSample, fit_to_length, has_chat_template,
                    make_sample as ruler_sample, score as ruler_score)
from .ruler_suite import CellLog, Prompts, cell_key, first_samples, open_run, ruler_cells, ruler_records

__all__ = [
    "DEFAULT_CHUNK", "FORWARDS", "MethodSpec", "PasskeyTrial", "PeakMemory", "as_batch", "document_windows",
    "greedy_generate", "hidden_states", "method_entries", "method_specs", "modules_hidden_states", "needle_nll", "nll_of_hidden",
    "nll_sum", "nll_windows", "passkey_accuracy", "passkey_prompts", "passkey_records", "passkey_trial",
    "peak_memory", "perplexity", "perplexity_from", "perplexity_records", "scaling_at", "scaling_label",
    "stock_nll", "RULER_TASKS", "RulerSample", "fit_to_length", "ruler_sample", "ruler_score",
    "NIAH_HAYSTACKS", "NIAH_WORDINGS", "has_chat_template", "CellLog", "Prompts", "cell_key", "first_samples",
    "open_run", "ruler_cells", "ruler_records",
]
