"""Passkey prompts of an exact length in the byte tokenizer's ids: the samples the bundled
byte-level model is pretrained on, and its quick passkey check.

The wording is the standard passkey test's (`evaluate`'s PASSKEY_* sentences), so the model meets
in training the prompt `longrope eval` asks. `evaluate.passkey_prompt` serves any tokenizer and
fills whole sentences up to about a length; a sample here is exactly `context` tokens with the
needle at its depth to the byte, so that every row of a training batch has the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError
from .evaluate import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION
from .tokenization import BOS_ID, BYTE_OFFSET, EOS_ID, decode_bytes, encode


@dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]  # BOS, then byte tokens: exactly `context` tokens, ending with the key's digits
    key: str
    needle_start: int  # index in ids of the needle's first token ("The pass key is ...")
    answer_start: int  # index in ids of the key's first digit after the question
    filler_tokens: int  # filler bytes in all (before + after the needle)
    depth: float  # filler before the needle / all filler (the requested depth, rounded to a byte)


def fixed_tokens(intro: bool = True, key_digits: int = 5) -> int:
    """Tokens of a sample that are not filler (BOS included)."""
    needle = len(PASSKEY_NEEDLE.format(key="0" * key_digits).encode())
    fixed = 1 + needle + 1 + len(PASSKEY_QUESTION.encode()) + 1 + key_digits
    if intro:
        fixed += len(PASSKEY_INTRO.encode()) + 1
    return fixed


def sample(context: int, key: int | str, depth: float, filler: str | bytes | None = None,
           intro: bool = True) -> Sample:
    """One passkey prompt of exactly `context` byte tokens (BOS first):

        <intro> <filler…> The pass key is K. Remember it. K is the pass key. <filler…> What is the pass key? The pass key is K

    `depth` in [0, 1] is the share of the filler placed before the needle. The filler is `filler`
    (real text) cycled to the needed length, or the standard "The grass is green. ..." repeated;
    each filler stretch ends with a space so words stay separated. Pure: no randomness inside.
    """
    key = str(key)
    if not key.isdigit():
        raise UsageError(f"passkey: key must be digits, got {key!r}")
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"passkey: depth must be in [0, 1], got {depth}")
    fixed = fixed_tokens(intro, len(key))
    n_filler = context - fixed
    if n_filler < 0:
        raise UsageError(f"passkey: a context of {context} tokens is too short for the prompt "
                         f"({fixed} tokens without filler{'; try intro=False' if intro else ''})")
    source = filler if filler is not None else PASSKEY_FILLER + " "
    source_bytes = source.encode("utf-8") if isinstance(source, str) else bytes(source)
    if n_filler and not source_bytes:
        raise UsageError("passkey: empty filler text")
    reps = -(-n_filler // max(1, len(source_bytes)))
    stream = (source_bytes * reps)[:n_filler]
    n_before = int(round(depth * n_filler))
    before, after = _end_with_space(stream[:n_before]), _end_with_space(stream[n_before:])
    head = (PASSKEY_INTRO + " ").encode() if intro else b""
    needle = (PASSKEY_NEEDLE.format(key=key) + " ").encode()
    tail = f"{PASSKEY_QUESTION} {key}".encode()
    data = head + before + needle + after + tail
    ids = (BOS_ID, *encode(data).tolist())
    assert len(ids) == context, (len(ids), context)
    needle_start = 1 + len(head) + len(before)
    return Sample(ids=ids, key=key, needle_start=needle_start, answer_start=context - len(key),
                  filler_tokens=n_filler, depth=(n_before / n_filler) if n_filler else 0.0)


def _end_with_space(chunk: bytes) -> bytes:
    return chunk[:-1] + b" " if chunk and chunk[-1:] not in (b" ", b"\n") else chunk


def random_sample(stream: np.ndarray, context: int, rng: np.random.Generator) -> Sample:
    """A sample drawn from `rng`: a 5-digit key, any depth, the intro half of the time (when it
    fits) and, half of the time, a stretch of `stream` (byte ids, EOS between documents) as the
    filler instead of the standard sentences."""
    key = int(rng.integers(10000, 100000))
    depth = float(rng.random())
    intro = context >= fixed_tokens(intro=True) and rng.random() < 0.5
    filler = None
    if rng.random() < 0.5:
        n = context  # more than enough real text; cut to length by `sample`
        start = int(rng.integers(0, max(1, len(stream) - n)))
        chunk = stream[start:start + n].astype(np.int64)
        filler = decode_bytes(np.where(chunk == EOS_ID, ord("\n") + BYTE_OFFSET, chunk))
    return sample(context, key, depth, filler=filler, intro=intro)


@torch.no_grad()
def greedy_accuracy(model, context: int, *, n: int = 32, device: torch.device | str = "cpu",
                    seed: int = 0) -> float | None:
    """Share of standard-filler samples of `context` tokens (intro included when it fits, depths
    spread over [0, 1]) whose key the model reproduces greedily; None when no sample fits.
    Teacher-forced argmax at every digit equals greedy decoding's exact match, so one forward
    pass suffices. Runs under the caller's autocast."""
    if context < fixed_tokens(intro=False):
        return None
    intro = context >= fixed_tokens(intro=True)
    rng = np.random.default_rng([seed, 0xE7A1])
    samples = [sample(context, int(rng.integers(10000, 100000)), i / max(1, n - 1), intro=intro)
               for i in range(n)]
    ids = torch.tensor([s.ids for s in samples], device=device)
    logits = model(input_ids=ids, use_cache=False).logits
    a = samples[0].answer_start
    predicted = logits[:, a - 1:-1].argmax(-1)
    return float((predicted == ids[:, a:]).all(-1).float().mean())
