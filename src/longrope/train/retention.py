"""What keeps a long-context fine-tune from losing the base model's short-context skills and its
retrieval (issue 16), as pieces of the one fine-tuning loop:

- mixed context windows (LongRoPE2 §3.3): a seeded share of the micro-batches are sequences of
  the model's original length, which the attached rotary runs with the short factors;
- distillation toward the base model on those short sequences (the frozen model as loaded);
- document-masked packing: positions restart at every document, so transformers' packed-sequence
  mask keeps attention inside each document;
- needle-driven validation: the mean NLL of passkey answers in held-apart documents;
- passkey checks: greedy passkey accuracy at the training length, the curve of retrieval against
  steps (the standard filler prompt, nothing from the training data);
- retrieval sequences: a seeded share of the micro-batches carry key-value facts at random depths
  of their documents and, at the end, questions whose answers are scored with extra weight. Their
  wording is our own, neither the passkey prompt's nor RULER's, so what they teach is measured on
  prompts the model never trained on.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import evaluate
from ..errors import UsageError
from ..passkey import encode_plain

NEEDLE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where needle validation places the passkey in its windows
PASSKEY_DEPTHS = (0.05, 0.275, 0.5, 0.725, 0.95)  # interior depths, as the passkey tables report
PASSKEY_KEYS = 2  # keys per depth

# retrieval sequences: the facts' and questions' wording (neither the passkey prompt's "pass key"
# nor RULER's "special magic number"), how many facts a sequence carries, the codes' digits
RETRIEVAL_FACT = "\nThe access code for {name} is {code}.\n"
RETRIEVAL_QUESTION = "\nQ: What is the access code for {name}? A: The access code for {name} is"
RETRIEVAL_ANSWER = " {code}"
RETRIEVAL_FACTS = 4
RETRIEVAL_DIGITS = 6
_SYLLABLES = ("ka", "lo", "mi", "re", "su", "ta", "vo", "ne", "di", "ra", "po", "ze", "bu", "fi", "go", "he")


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


def _drawn(share: float, seed: int, step: int, micro: int, salt: int) -> bool:
    """True with probability `share`, a pure function of (seed, step, micro): a resumed run draws
    what an uninterrupted one does. Each kind of draw has its own `salt`, so they are independent."""
    return share > 0 and np.random.default_rng([seed, step, micro, salt]).random() < share


def is_short_micro_batch(seed: int, share: float, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of step `step` is a short one (a micro-batch's sequences share
    one length)."""
    return _drawn(share, seed, step, micro, 0x5407)


def is_retrieval_micro_batch(seed: int, share: float, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of step `step` carries retrieval facts (`retrieval_sequence`),
    independently of its length."""
    return _drawn(share, seed, step, micro, 0x2E7)


def check_retrieval_fits(tokenizer, length: int) -> None:
    """UsageError (naming --retrieval-share) unless a `length`-token sequence holds the retrieval
    facts and their questions with some of its documents left."""
    try:
        retrieval_sequence(np.zeros(length, dtype=np.int64), tokenizer, [0])
    except ValueError as exc:
        raise UsageError(f"--retrieval-share: {exc}") from None


@dataclass(frozen=True)
class RetrievalSequence:
    ids: np.ndarray  # (n,) int64: the documents with the facts inserted, then the questions and answers
    answers: np.ndarray  # (n,) bool: the answer tokens (each scored from the position before it)
    fact_starts: tuple[int, ...]  # where each fact's tokens start in `ids`, in the order of `codes`
    names: tuple[str, ...]
    codes: tuple[str, ...]


def retrieval_sequence(row: np.ndarray, tokenizer, seed: Sequence[int],
                       facts: int = RETRIEVAL_FACTS) -> RetrievalSequence:
    """The packed sequence `row` as a retrieval exercise of the same length: `facts` facts ("The
    access code for NAME is CODE.", distinct names, random codes) inserted at uniformly random
    token offsets of its first part (after its first token), and at its end, one question per fact
    in a random order, each followed by its answer " CODE". Pieces are tokenised apart, so the
    answer tokens are exactly those of " CODE". A pure function of `seed` (e.g. [seed, step, micro,
    row]): a resumed run builds the same sequences. Raises ValueError if `row` is too short."""
    rng = np.random.default_rng(list(seed))
    names: list[str] = []
    while len(names) < facts:  # two or three syllables, capitalised, distinct within the sequence
        name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
        if name not in names:
            names.append(name)
    codes = [str(int(rng.integers(10 ** (RETRIEVAL_DIGITS - 1), 10 ** RETRIEVAL_DIGITS))) for _ in names]

    fact_ids = [encode_plain(tokenizer, RETRIEVAL_FACT.format(name=n, code=c)) for n, c in zip(names, codes)]
    tail, answer = [], []
    for i in rng.permutation(facts):
        question = encode_plain(tokenizer, RETRIEVAL_QUESTION.format(name=names[i]))
        code = encode_plain(tokenizer, RETRIEVAL_ANSWER.format(code=codes[i]))
        tail += question + code
        answer += [False] * len(question) + [True] * len(code)
    body_len = len(row) - len(tail) - sum(map(len, fact_ids))
    if body_len < 1:
        raise ValueError(f"a sequence of {len(row)} tokens is too short for {facts} retrieval facts and their "
                         f"questions ({len(row) - body_len} tokens)")
    body = [int(t) for t in row[:body_len]]
    offsets = np.sort(rng.integers(1, body_len + 1, size=facts))  # token 0 (BOS) stays first
    order = rng.permutation(facts)  # which fact goes at which offset
    ids, starts, previous = [], [0] * facts, 0
    for offset, i in zip(offsets.tolist(), order.tolist()):
        ids += body[previous:offset]
        starts[i] = len(ids)
        ids += fact_ids[i]
        previous = offset
    ids += body[previous:]
    answers = np.zeros(len(row), dtype=bool)
    answers[len(ids):] = answer
    ids += tail
    return RetrievalSequence(np.asarray(ids, dtype=np.int64), answers, tuple(starts), tuple(names), tuple(codes))


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


def needle_loss(model, samples: Sequence, chunk: int) -> tuple[float, dict[str, float]]:
    """The mean NLL of the answer tokens of `samples` (`passkey.needle_samples`), in eval mode, and
    each sample's own, keyed by its needle's depth (where its needle starts, as a share of the
    tokens before the question): the far needles are the ones a long context loses first."""
    with evaluating(model):
        per_sample = [evaluate.needle_nll(model, [s], chunk) for s in samples]
    return summarise_needles(samples, per_sample)


def summarise_needles(samples: Sequence, per_sample: Sequence[tuple[float, int]]) -> tuple[float, dict[str, float]]:
    """(the mean answer NLL over all samples, each sample's keyed by its needle's depth) from each
    sample's (summed answer NLL, answer tokens)."""
    by_depth = {f"{s.needle_start / s.answer_start:.2f}": round(total / count, 5)
                for s, (total, count) in zip(samples, per_sample)}
    return sum(t for t, _ in per_sample) / sum(c for _, c in per_sample), by_depth


def passkey_prompts(tokenizer, length: int, seed: int) -> list:
    """The passkey prompts of `--passkey-every`: PASSKEY_KEYS random keys at each PASSKEY_DEPTHS,
    `length` tokens each, the same as `longrope eval passkey --depths ... --trials 2` draws."""
    prompts = evaluate.passkey_prompts(tokenizer, [length], PASSKEY_DEPTHS, PASSKEY_KEYS, seed)
    return [prompts[key] for key in sorted(prompts)]


def passkey_accuracy(model, tokenizer, prompts: Sequence) -> tuple[float, dict[str, float]]:
    """The share of `prompts` whose key the model decodes greedily, in eval mode, and that share
    at each depth of the prompts."""
    with evaluating(model):
        trials = [evaluate.passkey_trial(model, tokenizer, p) for p in prompts]
    depths = sorted({t.depth for t in trials})
    return evaluate.passkey_accuracy(trials), {
        f"{d:g}": evaluate.passkey_accuracy([t for t in trials if t.depth == d]) for d in depths}
