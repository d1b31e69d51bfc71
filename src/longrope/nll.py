"""The one copy of what turns a decoder's hidden states into a loss: decoder access, the logit
projection (with the config's output scaling and soft-capping), the chunked negative
log-likelihood, used by evaluation, the search and training alike, and the chunked KL divergence
to a teacher's next-token distributions (fine-tuning's distillation).

Long inputs never get a (tokens × vocab) logits tensor: positions are projected and scored a
chunk at a time in float32. With autograd on, each chunk runs under activation checkpointing, so
its logits are freed at once and recomputed in the backward pass (peak: one chunk's logits).
`summed_nll_fused` is the training loss through Liger's fused kernel instead (CUDA, optional).
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


def _chunk_kl(head, hidden, teacher_head, teacher_hidden, scale, cap) -> torch.Tensor:
    student = F.log_softmax(_logits(head, hidden, scale, cap), dim=-1)
    with torch.no_grad():  # the teacher is frozen (also when the backward recomputes the chunk)
        teacher = F.log_softmax(_logits(teacher_head, teacher_hidden, scale, cap), dim=-1)
    # Σ p_teacher (log p_teacher − log p_student): exactly 0 where both give the same logits
    return F.kl_div(student, teacher, reduction="sum", log_target=True)


def _sum_over_chunks(score, tensors: tuple[torch.Tensor, ...], chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """Σ score(*slices) over the rows and `chunk`-position slices of `tensors` (each (batch, m, ...)),
    summed in `dtype`; under autograd each call is checkpointed (its logits freed at once)."""
    grad = torch.is_grad_enabled()
    total = torch.zeros((), dtype=dtype, device=tensors[0].device)
    for row in range(tensors[0].shape[0]):
        for start in range(0, tensors[0].shape[1], chunk):
            parts = [t[row, start:start + chunk] for t in tensors]
            part = checkpoint(score, *parts, use_reentrant=False) if grad else score(*parts)
            total = total + part.to(dtype)
    return total


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
    return _sum_over_chunks(lambda h, t: _chunk_nll(head, h, t, scale, cap), (hidden, targets.to(hidden.device)),
                            chunk, dtype)


def fused_nll_available() -> str | None:
    """None when `summed_nll_fused` can run here, else why not (a line for the user)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "needs liger-kernel (pip install liger-kernel, or longrope[liger])"
    if not torch.cuda.is_available():
        return "needs a CUDA device (Liger's kernels are Triton)"
    return None


def summed_nll_fused(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`summed_nll` for training through Liger's fused linear cross-entropy (CUDA): it projects a
    chunk of positions, takes the softmax and the chunk's gradients in one pass and frees the
    logits, so the backward recomputes nothing. bf16 inputs (the projection's precision under
    autocast, as in `summed_nll`) with float32 accumulation; summed in float32. The config's
    soft-capping is Liger's `softcap`; a logits scaling is refused (ValueError: not supported)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    scale, cap = _output_transform(model)
    if scale:
        raise ValueError("summed_nll_fused: a model with logits_scaling is not supported; use summed_nll")
    head = model.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    bias = None if head.bias is None else head.bias.to(torch.bfloat16)
    with torch.autocast(hidden.device.type, enabled=False):  # its kernels take the dtypes they are given
        loss = liger_fused_linear_cross_entropy(flat.to(torch.bfloat16), head.weight.to(torch.bfloat16),
                                                targets.reshape(-1).to(hidden.device), bias, reduction="sum",
                                                softcap=cap, accum_dtype=torch.float32)
    return loss.float()


def summed_kl(model, hidden: torch.Tensor, teacher, teacher_hidden: torch.Tensor, chunk: int = DEFAULT_CHUNK,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ model) between the next-token distributions that `teacher`
    (frozen, same vocabulary and output transform) gives from `teacher_hidden` and `model` from
    `hidden`, both (batch, m, h): `chunk` positions projected at a time in float32 (never the
    whole (tokens × vocab) logits), checkpointed under autograd; gradients reach `model` only."""
    head, teacher_head = model.get_output_embeddings(), teacher.get_output_embeddings()
    scale, cap = _output_transform(model)
    return _sum_over_chunks(lambda h, t: _chunk_kl(head, h, teacher_head, t, scale, cap),
                            (hidden, teacher_hidden.detach()), chunk, dtype)


def sequence_nll(model, hidden: torch.Tensor, input_ids: torch.Tensor, first: int = 1,
                 chunk: int = DEFAULT_CHUNK) -> tuple[float, int]:
    """(summed NLL, tokens scored) of one sequence's tokens `first`.. (each predicted from the
    positions before it) from its final hidden states (n, h); summed in float64."""
    ids = input_ids.reshape(-1)
    n = ids.shape[0]
    if n <= first:
        return 0.0, 0
    return float(summed_nll(model, hidden[first - 1:n - 1], ids[first:n], chunk).item()), n - first
