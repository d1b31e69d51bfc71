"""Passkey retrieval, the prompts: the standard test's wording, prompts of about a length for any
tokenizer (`passkey_prompt`, what `longrope eval passkey` asks), needles in real documents whose
answer alone is scored (`needle_samples`, LongRoPE2's search fitness), and samples of exactly
`context` byte tokens (`sample`: what the bundled byte-level model is pretrained on, so it meets
in training the prompt the evaluation asks, with every row of a batch the same shape).

Tokenizers in, token ids out: running a model on them is `evaluate`'s.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import UsageError
from .tokenization import BOS_ID, BYTE_OFFSET, EOS_ID, decode_bytes, encode


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    input_ids: list[int]
    key: str
    depth: float  # requested depth in [0, 1]
    nominal_length: int  # the length asked for
    needle_char: int  # where the needle starts in `text`

    @property
    def actual_length(self) -> int:
        return len(self.input_ids)


def passkey_text(key: str, haystack_before: str, haystack_after: str) -> str:
    """The standard prompt: instruction, haystack, needle, haystack, question."""
    parts = [PASSKEY_INTRO, haystack_before, PASSKEY_NEEDLE.format(key=key), haystack_after, PASSKEY_QUESTION]
    return " ".join(p for p in parts if p)


def split_at_depth(haystack: str, depth: float, filler: bool) -> tuple[str, str]:
    """Split the haystack at a sentence boundary near `depth` of its characters."""
    if not haystack:
        return "", ""
    target = int(round(depth * len(haystack)))
    if target <= 0:
        return "", haystack
    if target >= len(haystack):
        return haystack, ""
    if filler:
        unit = len(PASSKEY_FILLER) + 1
        k = int(round(target / unit))
        cut = k * unit
    else:
        # the end of the sentence or line nearest the target
        candidates = [m.end() for m in re.finditer(r"[.!?]\s+|\n", haystack[max(0, target - 2000):target + 2000])]
        cut = (max(0, target - 2000) + min(candidates, key=lambda c: abs(max(0, target - 2000) + c - target))
               if candidates else target)
    return haystack[:cut].rstrip(), haystack[cut:].lstrip()


def passkey_prompt(tokenizer, length: int, depth: float, key: str | int, haystack: str | None = None) -> PasskeyPrompt:
    """A prompt of at most `length` tokens, as close to it as the haystack's granularity allows
    (whole filler repetitions; characters of real text), with the needle at `depth`.

    `haystack=None` repeats the standard filler sentences; otherwise the leading characters of
    the given real text are used (give comfortably more characters than `length` tokens need).
    The whole prompt is tokenised as one text, with the tokenizer's special tokens (BOS).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(key)
    filler = haystack is None
    needle = PASSKEY_NEEDLE.format(key=key)

    def build(n: int) -> tuple[str, list[int]]:  # n: filler repetitions, or characters of text
        stack = " ".join([PASSKEY_FILLER] * n) if filler else haystack[:n]
        text = passkey_text(key, *split_at_depth(stack, depth, filler))
        return text, list(tokenizer(text)["input_ids"])

    limit = length if filler else len(haystack)
    empty = build(0)
    base = len(empty[1])
    if base > length:
        raise ValueError(f"length {length}: shorter than the passkey prompt without haystack ({base} tokens)")
    probe = min(limit, 4 if filler else 4096)
    rate = max(1e-3, (len(build(probe)[1]) - base) / probe) if probe else 1.0  # tokens per unit
    tolerance = math.ceil(rate) if filler else max(1, length // 1000)
    best_n, best = 0, empty
    n = min(limit, max(0, int((length - base) / rate)))
    for _ in range(40):
        built = build(n)
        tokens = len(built[1])
        if tokens <= length:
            if n >= best_n:
                best_n, best = n, built
            if length - tokens < tolerance or n >= limit:
                break
        if n > 0:
            rate = max(1e-3, (tokens - base) / n)
        step = (length - tokens) / rate
        new_n = n + (max(1, int(step)) if step > 0 else min(-1, math.floor(step)))
        new_n = min(limit, max(0, new_n))
        if tokens > length:
            if n - best_n <= 1:
                break
            if new_n <= best_n:  # bisect between the best fit and this overshoot
                new_n = (best_n + n) // 2
        if new_n == n or (tokens <= length and new_n <= best_n):
            break
        n = new_n
    text, ids = best
    return PasskeyPrompt(text, ids, key, float(depth), int(length), text.index(needle))


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def passkey_correct(answer: str, key: str | int) -> bool:
    """Exact match: the first run of digits in the answer is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group(0) == str(key)



# --------------------------------------------------------------------------------------------
# needles in real documents (LongRoPE2's needle-driven perplexity)

NEEDLE_MAX_DEPTH = 0.02  # the needle starts within the first 2% of the window (and after token 0)


@dataclass(frozen=True)
class NeedleSample:
    """A real document window with a passkey needle near its start and, at its end, the question
    and the answer: only the answer tokens are scored (`window` is nll_sum's (ids, score_from))."""

    input_ids: torch.Tensor  # (length,) int64
    key: str
    needle_start: int  # token index of the needle's first token
    needle_end: int  # one past its last token
    answer_start: int  # the answer is input_ids[answer_start:]

    @property
    def answer_length(self) -> int:
        return len(self.input_ids) - self.answer_start

    @property
    def window(self) -> tuple[torch.Tensor, int]:
        return self.input_ids, self.answer_start


def encode_plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def needle_sample(tokenizer, document_tokens, length: int, key: str | int, offset: int = 1) -> NeedleSample:
    """Exactly `length` tokens: the document's first `offset` tokens (its BOS, if tokenised with
    one), the needle, the document's next tokens, the question, the answer " {key}". Pieces are
    tokenised separately and concatenated, so the answer tokens are exactly those of " {key}"."""
    key = str(key)
    needle, question, answer = _needle_pieces(tokenizer, key)
    filler = length - len(needle) - len(question) - len(answer)
    if filler < 1:
        raise ValueError(f"length {length}: too short for the needle, question and answer "
                         f"({length - filler} tokens)")
    doc = [int(t) for t in (document_tokens.tolist() if hasattr(document_tokens, "tolist") else document_tokens)]
    if len(doc) < filler:
        raise ValueError(f"document has {len(doc)} tokens; a needle sample of {length} needs {filler}")
    offset = min(max(int(offset), 0), filler)
    ids = doc[:offset] + needle + doc[offset:filler] + question + answer
    assert len(ids) == length
    return NeedleSample(torch.tensor(ids, dtype=torch.long), key, offset, offset + len(needle),
                        length - len(answer))


def needle_samples(tokenizer, documents: Sequence, length: int, seed: int = 0,
                   max_depth: float = NEEDLE_MAX_DEPTH, depths: Sequence[float] | None = None) -> list[NeedleSample]:
    """Needle samples from tokenised documents (token sequences of at least `length` tokens), a
    random 5-digit key each, drawn from `seed` (deterministic). Without `depths`: one per document,
    the needle at an offset in [1, max(1, max_depth·length)] (LongRoPE2's: near the start, the
    longest dependency). With `depths`: one per depth, needle at that share of the document text
    before it, the documents taken in turn."""
    rng = random.Random(seed)
    out = []
    if depths is None:
        for doc in documents:
            key = random_key(rng)
            offset = rng.randint(1, max(1, int(max_depth * length)))
            out.append(needle_sample(tokenizer, doc, length, key, offset))
        return out
    for i, depth in enumerate(depths):
        if not 0 <= depth <= 1:
            raise ValueError(f"needle depth {depth}: must be in [0, 1]")
        key = random_key(rng)
        out.append(needle_sample(tokenizer, documents[i % len(documents)], length, key,
                                 max(1, round(depth * _filler_tokens(tokenizer, length, key)))))
    return out


def _needle_pieces(tokenizer, key: str) -> tuple[list[int], list[int], list[int]]:
    """The needle, the question and the answer of a needle sample, tokenised apart."""
    return (encode_plain(tokenizer, "\n" + PASSKEY_NEEDLE.format(key=key) + "\n"),
            encode_plain(tokenizer, "\n" + PASSKEY_QUESTION), encode_plain(tokenizer, " " + key))


def _filler_tokens(tokenizer, length: int, key: str) -> int:
    """Document tokens in a needle sample of `length` tokens (as `needle_sample` counts them)."""
    return length - sum(len(piece) for piece in _needle_pieces(tokenizer, key))


# --------------------------------------------------------------------------------------------
# byte-exact samples (pretraining the bundled model)


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
