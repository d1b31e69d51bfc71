"""Evaluation: the lean long-sequence forward, perplexity (truncate, sliding) and passkey retrieval.

The lean forward (`lean.py`) runs our own decoder loop over the model's modules: position-wise
ops over chunks of positions, causal flash SDPA with no mask, no KV cache; then the final hidden
states are projected through `lm_head` a chunk of positions at a time and scored in float32, so
neither (tokens × vocab) logits nor (tokens × intermediate) activations are ever materialised.
Architectures the lean loop does not cover fall back to transformers' own modules
(`modules_hidden_states`: the base model with `use_cache=False` and no attention mask) with the same
chunked projection. Functions are pure: model and tensors in, numbers out; the search calls
`nll_sum` / `perplexity` many times.

Supported: causal LMs whose logits are `lm_head(final hidden states)` (Llama, Mistral, Qwen2/3,
Phi-3); `logits_scaling` and `final_logit_softcapping` in the config are applied if present.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .. import lean, nll
from ..passkey import NeedleSample

DEFAULT_CHUNK = nll.DEFAULT_CHUNK
FORWARDS = ("auto", "lean", "modules")

# --------------------------------------------------------------------------------------------
# the lean forward and perplexity


def as_batch(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one sequence (n,) or (1, n), got shape {tuple(ids.shape)}")
    return ids.long()


def modules_hidden_states(model, input_ids) -> torch.Tensor:
    """(n, h) final hidden states of one sequence through transformers' own modules: base model,
    no cache, no mask (the fallback of the lean forward, and its reference)."""
    ids = as_batch(input_ids).to(model.get_output_embeddings().weight.device)
    out = nll.decoder(model)(input_ids=ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0]


def hidden_states(model, input_ids, chunk_size: int | None = None, forward: str = "auto") -> torch.Tensor:
    """(n, h) final hidden states: `forward` "lean" (our decoder loop, `lean.py`), "modules"
    (transformers' own, `modules_hidden_states`) or "auto" (lean where supported)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward: one of {', '.join(FORWARDS)}, got {forward!r}")
    ids = as_batch(input_ids)
    if forward == "lean" or (forward == "auto" and lean.unsupported_reason(model, ids.shape[1]) is None):
        return lean.final_hidden_states(model, ids, chunk_size)
    return modules_hidden_states(model, ids)


@torch.inference_mode()
def nll_sum(model, input_ids, chunk_size: int | None = None, score_from: int = 1, *,
            forward: str = "auto") -> tuple[float, int]:
    """(sum of the negative log-likelihoods, number of tokens scored) for one sequence.

    Token i (i >= max(1, score_from)) is predicted from positions < i. The lean forward runs
    position-wise ops `chunk_size` positions at a time; scoring is done `chunk_size` positions at
    a time in float32 (log-softmax via cross-entropy), summed in float64. With no `chunk_size` the
    lean forward sizes its own chunks to the model (`lean.layer_chunk`) and scoring takes
    DEFAULT_CHUNK positions at a time (a chunk's logits are positions × vocab floats). `forward`: see
    `hidden_states` ("modules" is transformers' forward with only the final projection chunked).
    """
    ids = as_batch(input_ids)
    n = ids.shape[1]
    first = max(1, int(score_from))
    if n <= first:
        return 0.0, 0
    hidden = hidden_states(model, ids, chunk_size, forward)
    return nll_of_hidden(model, hidden, ids, chunk_size or DEFAULT_CHUNK, first), n - first


@torch.inference_mode()
def nll_of_hidden(model, hidden: torch.Tensor, input_ids, chunk_size: int = DEFAULT_CHUNK, first: int = 1) -> float:
    """Summed NLL of tokens first.. of one sequence from its final hidden states (n, h) (`nll`)."""
    return nll.sequence_nll(model, hidden, as_batch(input_ids), first, chunk_size)[0]


@torch.inference_mode()
def stock_nll(model, input_ids, score_from: int = 1) -> tuple[float, int]:
    """The plain transformers way, for side-by-side comparison: `model(input_ids, labels=...)`
    (full logits). Returns (sum NLL, tokens scored) like `nll_sum`."""
    ids = as_batch(input_ids).to(model.get_output_embeddings().weight.device)
    labels = ids.clone()
    labels[:, :max(1, int(score_from))] = -100
    n = int((labels[:, 1:] != -100).sum())
    if n == 0:
        return 0.0, 0
    out = model(input_ids=ids, labels=labels, use_cache=False)
    return float(out.loss.double().item()) * n, n


def perplexity_from(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / n_tokens) if n_tokens else float("nan")


def nll_windows(model, windows: Iterable, chunk_size: int | None = None, stock: bool = False) -> tuple[float, int]:
    """Summed (NLL, tokens) over windows, each a token tensor or a (tokens, score_from) pair."""
    total, count = 0.0, 0
    fn = stock_nll if stock else nll_sum
    for window in windows:
        ids, score_from = window if isinstance(window, tuple) else (window, 1)
        kwargs = {} if stock else {"chunk_size": chunk_size}
        s, c = fn(model, ids, score_from=score_from, **kwargs)
        total, count = total + s, count + c
    return total, count


def perplexity(model, windows: Iterable, chunk_size: int | None = None) -> float:
    """Token-weighted exp(mean NLL) over windows (token tensors or (tokens, score_from) pairs)."""
    return perplexity_from(*nll_windows(model, windows, chunk_size))


def document_windows(tokens, spans) -> list[tuple[torch.Tensor, int]]:
    """(token tensor, score_from) pairs for `data.Window` spans of a document's tokens."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    return [(ids[w.start:w.end], w.score_from) for w in spans]


# --------------------------------------------------------------------------------------------
# peak memory


@dataclass
class PeakMemory:
    bytes: int | None = None  # None where it cannot be measured (CPU)


@contextmanager
def peak_memory(device) -> Iterable[PeakMemory]:
    """Measure torch.cuda.max_memory_allocated over the block (None on CPU)."""
    result = PeakMemory()
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            result.bytes = int(torch.cuda.max_memory_allocated(device))


# --------------------------------------------------------------------------------------------
# needle-driven perplexity (LongRoPE2's search fitness; the samples are `passkey`'s)

def needle_nll(model, samples: Iterable[NeedleSample], chunk_size: int | None = None) -> tuple[float, int]:
    """(sum of the NLL of the answer tokens, number of answer tokens) over the samples; the
    needle-driven perplexity is perplexity_from(*needle_nll(...))."""
    return nll_windows(model, [s.window for s in samples], chunk_size)
