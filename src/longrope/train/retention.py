"""What keeps a long-context fine-tune from losing the base model's short-context skills and its
retrieval (issue 16), as pieces of the one fine-tuning loop:

- mixed context windows (LongRoPE2 §3.3): a seeded share of the micro-batches are sequences of
  the model's original length, which the attached rotary runs with the short factors;
- distillation toward the base model on those short sequences (the frozen model as loaded);
- document-masked packing: positions restart at every document, so transformers' packed-sequence
  mask keeps attention inside each document;
- needle-driven validation: the mean NLL of passkey answers in held-apart documents;
- passkey checks: greedy passkey accuracy at the training length, the curve of retrieval against
  steps (the standard filler prompt, nothing from the training data).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import numpy as np
import torch

from .. import evaluate

NEEDLE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where needle validation places the passkey in its windows
PASSKEY_DEPTHS = (0.05, 0.275, 0.5, 0.725, 0.95)  # interior depths, as the passkey tables report
PASSKEY_KEYS = 2  # keys per depth


def frozen_teacher(model, device: torch.device):
    """A frozen float32 copy of `model` as given (before the scaling is attached): eval mode, no
    gradients; the reference distribution of the distillation term."""
    teacher = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def short_sequences(packed: np.ndarray, short_len: int) -> np.ndarray:
    """The packed token stream cut again into (n, short_len) sequences (the tail of each long
    sequence that does not fill one is dropped): the short windows come from the same documents."""
    per_row = packed.shape[1] // short_len
    return np.ascontiguousarray(packed[:, :per_row * short_len]).reshape(-1, short_len)


def is_short_micro_batch(seed: int, share: float, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of step `step` is a short one: a pure function of (seed, step,
    micro) drawn with probability `share` (a micro-batch's sequences share one length)."""
    return share > 0 and np.random.default_rng([seed, step, micro, 0x5407]).random() < share


def document_positions(batch: torch.Tensor, bos_id: int) -> torch.Tensor:
    """position_ids (batch, n) restarting at 0 at every `bos_id` (each packed document's first
    token; the piece before the first BOS counts from 0 too). transformers reads restarting
    positions without an attention mask as packed documents and masks attention across them."""
    n = batch.shape[1]
    index = torch.arange(n, device=batch.device).expand_as(batch)
    starts = torch.where(batch == bos_id, index, torch.zeros_like(index))
    return index - torch.cummax(starts, dim=1).values


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode inside, its mode restored after (a check in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def needle_loss(model, samples: Sequence, chunk: int) -> float:
    """Mean NLL of the answer tokens of `samples` (`passkey.needle_samples`), in eval mode."""
    with evaluating(model):
        total, count = evaluate.needle_nll(model, samples, chunk)
    return total / count


def passkey_prompts(tokenizer, length: int, seed: int) -> list:
    """The passkey prompts of `--passkey-every`: PASSKEY_KEYS random keys at each PASSKEY_DEPTHS,
    `length` tokens each, the same as `longrope eval passkey --depths ... --trials 2` draws."""
    prompts = evaluate.passkey_prompts(tokenizer, [length], PASSKEY_DEPTHS, PASSKEY_KEYS, seed)
    return [prompts[key] for key in sorted(prompts)]


def passkey_accuracy(model, tokenizer, prompts: Sequence) -> float:
    """Share of `prompts` whose key the model decodes greedily, in eval mode."""
    with evaluating(model):
        return evaluate.passkey_accuracy([evaluate.passkey_trial(model, tokenizer, p) for p in prompts])
