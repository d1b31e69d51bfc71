"""The one copy of what turns a decoder's hidden states into a loss: decoder access, the logit
projection (with the config's output scaling and soft-capping) and the chunked negative
log-likelihood, used by evaluation, the search and training alike.

Long inputs never get a (tokens × vocab) logits tensor: positions are projected and scored a
chunk at a time in float32. With autograd on, each chunk runs under activation checkpointing, so
its logits are freed at once and recomputed in the backward pass (peak: one chunk's logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 4096  # positions scored at a time: a chunk's logits are chunk × vocab floats


def decoder(model) -> torch.nn.Module:
    """The decoder stack that returns final hidden states (`model.model` for HF causal LMs)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model.get_decoder()


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of `hidden` (..., h), with the config's output scaling/soft-capping."""
    return _logits(model.get_output_embeddings(), hidden, *_output_transform(model))


def _output_transform(model) -> tuple[float | None, float | None]:
    config = model.config
    return getattr(config, "logits_scaling", None), getattr(config, "final_logit_softcapping", None)


def _logits(head: torch.nn.Module, hidden: torch.Tensor, scale: float | None, cap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if scale:
        logits = logits / scale
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_nll(head, hidden, targets, scale, cap) -> torch.Tensor:
    return F.cross_entropy(_logits(head, hidden, scale, cap), targets, reduction="sum")


def summed_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Summed cross entropy of `targets` (m,) or (batch, m) predicted from `hidden` (m, h) or
    (batch, m, h): each row's positions are projected and scored `chunk` at a time in float32,
    the chunks summed in `dtype` (float64 for evaluation; training sums in float32). Under
    autograd each chunk is checkpointed."""
    if hidden.dim() == 2:
        hidden, targets = hidden.unsqueeze(0), targets.unsqueeze(0)
    head = model.get_output_embeddings()
    scale, cap = _output_transform(model)
    grad = torch.is_grad_enabled()
    targets = targets.to(hidden.device)
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    for row in range(targets.shape[0]):
        for start in range(0, targets.shape[1], chunk):
            end = min(start + chunk, targets.shape[1])
            args = (head, hidden[row, start:end], targets[row, start:end], scale, cap)
            part = checkpoint(_chunk_nll, *args, use_reentrant=False) if grad else _chunk_nll(*args)
            total = total + part.to(dtype)
    return total


def sequence_nll(model, hidden: torch.Tensor, input_ids: torch.Tensor, first: int = 1,
                 chunk: int = DEFAULT_CHUNK) -> tuple[float, int]:
    """(summed NLL, tokens scored) of one sequence's tokens `first`.. (each predicted from the
    positions before it) from its final hidden states (n, h); summed in float64."""
    ids = input_ids.reshape(-1)
    n = ids.shape[0]
    if n <= first:
        return 0.0, 0
    return float(summed_nll(model, hidden[first - 1:n - 1], ids[first:n], chunk).item()), n - first
