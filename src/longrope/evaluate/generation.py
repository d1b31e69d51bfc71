"""Greedy generation across LongRoPE's short/long switch, and passkey trials scored on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import lean, models, nll
from .. import scaling as sc
from ..passkey import PasskeyPrompt, passkey_correct
from .perplexity import as_batch


def _regime_changes(model, start: int, end: int) -> bool:
    """True if an attached LongRoPE scaling switches from short to long factors between
    sequence lengths `start` and `end` (cached keys would be stale)."""
    scaling = models.attached_scaling(model)
    return isinstance(scaling, sc.LongRoPEScaling) and scaling.regime(start) != scaling.regime(end)


@torch.inference_mode()
def greedy_generate(model, input_ids, max_new_tokens: int = 10, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation: one prefill that keeps only the last position's logits (the lean
    prefill where the architecture allows), then one token at a time with the KV cache. If a
    LongRoPE scaling would switch regime during decoding (a prompt just under the original
    context), each step recomputes the whole (short) sequence."""
    ids = as_batch(input_ids).to(model.get_output_embeddings().weight.device)
    recompute = _regime_changes(model, ids.shape[1], ids.shape[1] + max_new_tokens)
    cache_name = models.cache_argument(model)  # `cache` or, before transformers 5.24, `past_key_values`
    if not recompute and lean.unsupported_reason(model, ids.shape[1] + max_new_tokens) is None:
        # the lean prefill: the cache and one layer's buffers, no full-length MLP intermediates
        last, past = lean.prefill(model, ids)
        logits = nll.project(model, last)[-1]
    else:
        out = model(input_ids=ids, use_cache=not recompute, logits_to_keep=1)
        past, logits = (None if recompute else _returned_cache(out)), out.logits[0, -1]
    new: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits.float().argmax())
        new.append(token)
        if token == eos_token_id or step == max_new_tokens - 1:
            break
        if recompute:
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
        else:
            position = torch.tensor([[ids.shape[1] + len(new) - 1]], device=ids.device)
            out = model(input_ids=ids.new_tensor([[token]]), **{cache_name: past}, use_cache=True,
                        position_ids=position, logits_to_keep=1)
            past, logits = _returned_cache(out), out.logits[0, -1]
    return new


def _returned_cache(out):
    # `.cache` since transformers 5.24, where `.past_key_values` is a deprecated alias for it
    return out.cache if hasattr(out, "cache") else out.past_key_values


@dataclass(frozen=True)
class PasskeyTrial:
    key: str
    answer: str
    correct: bool
    depth: float
    nominal_length: int
    actual_length: int


def passkey_trial(model, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 10) -> PasskeyTrial:
    """Greedy-decode a few tokens after the prompt and score the digits."""
    new = greedy_generate(model, prompt.input_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return PasskeyTrial(prompt.key, answer, passkey_correct(answer, prompt.key), prompt.depth,
                        prompt.nominal_length, prompt.actual_length)


def passkey_accuracy(trials: Sequence[PasskeyTrial]) -> float:
    return sum(t.correct for t in trials) / len(trials) if trials else float("nan")


