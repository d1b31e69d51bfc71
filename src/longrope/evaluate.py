"""Evaluation: the lean long-sequence forward, perplexity (truncate, sliding) and passkey retrieval.

The lean forward (`lean.py`) runs our own decoder loop over the model's modules: position-wise
ops over chunks of positions, causal flash SDPA with no mask, no KV cache; then the final hidden
states are projected through `lm_head` a chunk of positions at a time and scored in float32, so
neither (tokens × vocab) logits nor (tokens × intermediate) activations are ever materialised.
Architectures the lean loop does not cover fall back to transformers' own modules
(`final_hidden_states`: the base model with `use_cache=False` and no attention mask) with the same
chunked projection. Functions are pure: model and tensors in, numbers out; the search calls
`nll_sum` / `perplexity` many times.

Supported: causal LMs whose logits are `lm_head(final hidden states)` (Llama, Mistral, Qwen2/3,
Phi-3); `logits_scaling` and `final_logit_softcapping` in the config are applied if present.
"""

from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from . import lean, models, nll
from . import scaling as sc

DEFAULT_CHUNK = nll.DEFAULT_CHUNK
FORWARDS = ("auto", "lean", "modules")

# --------------------------------------------------------------------------------------------
# the lean forward and perplexity


def _as_batch(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one sequence (n,) or (1, n), got shape {tuple(ids.shape)}")
    return ids.long()


def final_hidden_states(model, input_ids) -> torch.Tensor:
    """(n, h) final hidden states of one sequence through transformers' own modules: base model,
    no cache, no mask (the fallback of the lean forward, and its reference)."""
    ids = _as_batch(input_ids).to(model.get_output_embeddings().weight.device)
    out = nll.decoder(model)(input_ids=ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0]


def hidden_states(model, input_ids, chunk_size: int | None = None, forward: str = "auto") -> torch.Tensor:
    """(n, h) final hidden states: `forward` "lean" (our decoder loop, `lean.py`), "modules"
    (transformers' own, `final_hidden_states`) or "auto" (lean where supported)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward: one of {', '.join(FORWARDS)}, got {forward!r}")
    ids = _as_batch(input_ids)
    if forward == "lean" or (forward == "auto" and lean.unsupported_reason(model, ids.shape[1]) is None):
        return lean.final_hidden_states(model, ids, chunk_size)
    return final_hidden_states(model, ids)


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
    ids = _as_batch(input_ids)
    n = ids.shape[1]
    first = max(1, int(score_from))
    if n <= first:
        return 0.0, 0
    hidden = hidden_states(model, ids, chunk_size, forward)
    return nll_of_hidden(model, hidden, ids, chunk_size or DEFAULT_CHUNK, first), n - first


@torch.inference_mode()
def nll_of_hidden(model, hidden: torch.Tensor, input_ids, chunk_size: int = DEFAULT_CHUNK, first: int = 1) -> float:
    """Summed NLL of tokens first.. of one sequence from its final hidden states (n, h) (`nll`)."""
    return nll.sequence_nll(model, hidden, _as_batch(input_ids), first, chunk_size)[0]


@torch.inference_mode()
def stock_nll(model, input_ids, score_from: int = 1) -> tuple[float, int]:
    """The plain transformers way, for side-by-side comparison: `model(input_ids, labels=...)`
    (full logits). Returns (sum NLL, tokens scored) like `nll_sum`."""
    ids = _as_batch(input_ids).to(model.get_output_embeddings().weight.device)
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
# passkey retrieval

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


def _split_at_depth(haystack: str, depth: float, filler: bool) -> tuple[str, str]:
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
        text = passkey_text(key, *_split_at_depth(stack, depth, filler))
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
    ids = _as_batch(input_ids).to(model.get_output_embeddings().weight.device)
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


# --------------------------------------------------------------------------------------------
# needle-driven perplexity (LongRoPE2's search fitness)

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


def _encode_plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def needle_sample(tokenizer, document_tokens, length: int, key: str | int, offset: int = 1) -> NeedleSample:
    """Exactly `length` tokens: the document's first `offset` tokens (its BOS, if tokenised with
    one), the needle, the document's next tokens, the question, the answer " {key}". Pieces are
    tokenised separately and concatenated, so the answer tokens are exactly those of " {key}"."""
    key = str(key)
    needle = _encode_plain(tokenizer, "\n" + PASSKEY_NEEDLE.format(key=key) + "\n")
    question = _encode_plain(tokenizer, "\n" + PASSKEY_QUESTION)
    answer = _encode_plain(tokenizer, " " + key)
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
                   max_depth: float = NEEDLE_MAX_DEPTH) -> list[NeedleSample]:
    """One sample per document (token sequences of at least `length` tokens): a random 5-digit key
    and a needle offset in [1, max(1, max_depth·length)], both drawn from `seed` (deterministic)."""
    rng = random.Random(seed)
    out = []
    for doc in documents:
        key = random_key(rng)
        offset = rng.randint(1, max(1, int(max_depth * length)))
        out.append(needle_sample(tokenizer, doc, length, key, offset))
    return out


def needle_nll(model, samples: Iterable[NeedleSample], chunk_size: int | None = None) -> tuple[float, int]:
    """(sum of the NLL of the answer tokens, number of answer tokens) over the samples; the
    needle-driven perplexity is perplexity_from(*needle_nll(...))."""
    return nll_windows(model, [s.window for s in samples], chunk_size)
