"""RULER-style synthetic long-context tasks (Hsieh et al. 2024), generated offline from a seed.

Pure text in, text out: for a tokenizer, a target length in tokens, a depth and a seed, each task
returns a `RulerSample` whose prompt (template, haystack, query, answer prefix, as RULER writes
them) has at most `length` tokens and close to it. Running a model on it is someone else's job;
`score` grades the model's continuation as RULER does (string_match_all / string_match_part).

Tasks, named as RULER names them: niah_single (haystacks "filler", "essay", "noise"),
niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe. Words, keys and noise are
pseudo-words drawn from the seed, so nothing is downloaded; every random choice comes from
`random.Random` seeded by (task, seed), so the same inputs give the identical sample.

Every task takes `chat=True` to put its text into the tokenizer's chat template as the user's
message, the answer prefix opening the assistant's reply (the length counts the template too);
niah_single takes `wording="passkey"`, the compact wording of `longrope.passkey`.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from ..passkey import PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION

# --------------------------------------------------------------------------------------------
# templates, as RULER's synthetic/constants.py writes them (needle type "numbers")

NIAH_TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n{context}\n"
                 "What are all the special magic numbers for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic numbers for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."

VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the {num_cw} most common words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"

FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_NOISE_WORD = "...."  # RULER's most frequent "word", which the question says to ignore

# niah_single in longrope.passkey's wording, which the bundled byte-level model is trained on:
# RULER's template alone (~400 bytes with the needle) exceeds its 256-token context. The passkey
# intro is left out too: with it, 256 tokens would leave no room for a haystack.
_question, _answer = PASSKEY_QUESTION.split("? ", 1)  # "What is the pass key", "The pass key is"
PASSKEY_QUERY, PASSKEY_ANSWER_PREFIX = _question + "?", " " + _answer
PASSKEY_VALUE_DIGITS = 5  # as longrope.passkey's keys

NIAH_HAYSTACKS = ("filler", "essay", "noise")
NIAH_WORDINGS = ("ruler", "passkey")
FILLER_SENTENCES = [s.strip() + "." for s in PASSKEY_FILLER.split(".") if s.strip()]  # finer fitting unit

# Pseudo-words of a fixed number of syllables all have the same length, so no word is a substring
# of another: the substring scorer cannot credit an answer found inside a distractor.
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class RulerSample:
    task: str  # RULER's name: niah_single, niah_multikey, ..., vt, cwe, fwe
    prompt: str  # template with the haystack, then the query, then the answer prefix
    answers: list[str]  # every expected string (scored with `metric`)
    length: int  # the length asked for, in tokens
    depth: float | None  # requested depth of the (first) needle; None where it does not apply
    seed: int
    input_ids: list[int]  # the whole prompt tokenised as one text, special tokens included
    metric: str = "string_match_all"
    haystack: str | None = None  # niah: filler / essay / noise

    @property
    def actual_length(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------------------------
# fitting a prompt to a length


def fit_to_length(tokenizer, length: int, build: Callable[[int], str], max_units: int,
                  add_special_tokens: bool = True) -> tuple[int, str, list[int]]:
    """The largest n in [0, max_units] whose `build(n)` has at most `length` tokens, with its
    text and ids (the text tokenised whole, special tokens included unless `add_special_tokens`
    is False, as a model would see it: a chat template writes its own).

    `build(n)` must grow with n (n haystack units: sentences, words, list entries). The idea of
    `passkey_prompt`'s loop, made generic: estimate tokens per unit from two probes, jump to the
    estimate, then gallop and bisect, since tokens per unit vary along real text. passkey_prompt
    could call this with its own build (repetitions or characters) instead of its loop.
    """
    def count(n: int) -> tuple[str, list[int]]:
        text = build(n)
        return text, list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    fits: dict[int, tuple[str, list[int]]] = {0: count(0)}  # the fitting builds seen, by n
    base = len(fits[0][1])
    if base > length:
        raise ValueError(f"length {length}: shorter than the prompt without haystack ({base} tokens)")

    def fit(n: int) -> bool:
        built = count(n)
        if len(built[1]) <= length:
            fits[n] = built
            return True
        return False

    probe = min(max_units, 8)
    rate = max(1e-3, (len(count(probe)[1]) - base) / probe) if probe else 1.0  # tokens per unit
    guess = min(max_units, max(0, int((length - base) / rate)))
    low, high = 0, max_units + 1  # build(low) fits; build(high) does not, or is beyond max_units
    step = max(1, guess // 64)
    if fit(guess):  # gallop up from the estimate until an overshoot brackets the answer
        low = guess
        while low < max_units:
            n = min(max_units, low + step)
            if not fit(n):
                high = n
                break
            low, step = n, step * 2
    else:  # gallop down
        high = guess
        while True:
            n = max(0, high - step)
            if fit(n):
                low = n
                break
            high, step = n, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if fit(middle):
            low = middle
        else:
            high = middle
    best_n = low
    best_text, best_ids = fits[best_n]
    return best_n, best_text, best_ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def framed(tokenizer, body: str, answer_prefix: str, chat: bool) -> str:
    """The prompt text: the task's text then its answer prefix, or (`chat`) the text as the user's
    message in the tokenizer's chat template and the prefix opening the assistant's reply."""
    if not chat:
        return body + answer_prefix
    if not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template")
    turn = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                         add_generation_prompt=True)
    return turn + answer_prefix.lstrip()  # RULER's prefixes start with a space: they follow the question


def _fit(tokenizer, length: int, build: Callable[[int], str], max_units: int, chat: bool):
    # a chat template writes its own special tokens (BOS), so the tokenizer must not add them again
    return fit_to_length(tokenizer, length, build, max_units, add_special_tokens=not chat)


# --------------------------------------------------------------------------------------------
# seeded words and haystacks


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def distinct_words(rng: random.Random, count: int, syllables: int = 3, avoid: set[str] = frozenset()) -> list[str]:
    words: list[str] = []
    seen = set(avoid)
    while len(words) < count:
        word = pseudo_word(rng, syllables)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def random_keys(rng: random.Random, count: int, key_kind: str) -> list[str]:
    """Needle keys: "words" (two pseudo-words, RULER's adjective-noun shape) or "uuids"."""
    if key_kind == "uuids":
        keys = {str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)}
        while len(keys) < count:
            keys.add(str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        return sorted(keys, key=lambda k: rng.random())
    if key_kind == "words":
        words = distinct_words(rng, 2 * count)
        return [f"{a}-{b}" for a, b in zip(words[::2], words[1::2])]
    raise ValueError(f"key_kind must be 'words' or 'uuids', got {key_kind!r}")


def random_values(rng: random.Random, count: int, digits: int = 7, avoid: Sequence[str] = ()) -> list[str]:
    """Distinct numbers of `digits` digits (same width: none is a substring of another) that occur
    in none of the `avoid` texts (a uuid key may hold a run of digits)."""
    values: list[str] = []
    while len(values) < count:
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if value not in values and not any(value in text for text in avoid):
            values.append(value)
    return values


class NoiseSentences:
    """An endless stream of word-like noise sentences drawn from a seed, extended on demand so the
    fitting loop's probes see the same prefix whatever order they ask in."""

    def __init__(self, seed: int):
        self.rng = random.Random(f"noise/{seed}")
        self.sentences: list[str] = []

    def __getitem__(self, index: int) -> str:
        while len(self.sentences) <= index:
            words = [pseudo_word(self.rng, self.rng.randint(1, 3)) for _ in range(self.rng.randint(4, 8))]
            self.sentences.append(" ".join(words).capitalize() + ".")
        return self.sentences[index]


def haystack_units(kind: str, essay: str | None, seed: int) -> Callable[[int], str]:
    """The i-th unit (sentence or word) of a haystack: filler and noise go on for ever; an essay's
    words are its own (`essay_words`), never repeated."""
    if kind == "filler":
        return lambda i: FILLER_SENTENCES[i % len(FILLER_SENTENCES)]
    if kind == "essay":
        return essay_words(essay).__getitem__
    if kind == "noise":
        return NoiseSentences(seed).__getitem__
    raise ValueError(f"haystack must be one of {NIAH_HAYSTACKS}, got {kind!r}")


def essay_words(essay: str | None) -> list[str]:
    words = (essay or "").split()
    if not words:
        raise ValueError("haystack 'essay' needs the essay text")
    return words


def with_inserts(unit: Callable[[int], str], n_units: int, inserts: Sequence[tuple[float, str]],
                 snap_to_sentence: bool = False) -> str:
    """The first `n_units` haystack units with each (depth, text) inserted before unit
    round(depth·n_units); inserts at the same place keep their order. With `snap_to_sentence`
    (word units of real text) the place moves to the nearest sentence end within 40 words, so a
    needle does not cut a sentence."""
    units = [unit(i) for i in range(n_units)]

    def place(depth: float) -> int:
        target = int(round(depth * n_units))
        if not snap_to_sentence or target in (0, n_units):
            return target
        ends = [k for k in range(max(1, target - 40), min(n_units, target + 40) + 1) if units[k - 1][-1:] in ".!?"]
        return min(ends, key=lambda k: abs(k - target)) if ends else target

    by_place: dict[int, list[str]] = {}
    for depth, text in inserts:
        by_place.setdefault(place(depth), []).append(text)
    pieces: list[str] = []
    for k in range(n_units + 1):
        pieces.extend(by_place.get(k, []))
        if k < n_units:
            pieces.append(units[k])
    return " ".join(pieces)


def _check_depth(depth: float) -> float:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return float(depth)


# --------------------------------------------------------------------------------------------
# needle in a haystack


def niah(tokenizer, length: int, depth: float, seed: int, *, task: str = "niah_single", haystack: str = "filler",
         essay: str | None = None, key_kind: str = "words", num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1, wording: str = "ruler", chat: bool = False) -> RulerSample:
    """RULER's NIAH family. `num_keys` needles with distinct keys, the first `num_queries` asked;
    each asked key has `num_values` needles (values all asked). The first asked needle sits at
    `depth`; the others at depths drawn from the seed, as RULER scatters them.

    `wording="passkey"` (a single needle only): "The pass key is V. Remember it. V is the pass
    key." in the haystack, "What is the pass key? The pass key is" after it, V a 5-digit number.
    An essay haystack is never repeated: one too short for `length` raises ValueError."""
    depth = _check_depth(depth)
    if wording not in NIAH_WORDINGS:
        raise ValueError(f"wording must be one of {NIAH_WORDINGS}, got {wording!r}")
    if wording == "passkey" and num_keys * num_values > 1:
        raise ValueError(f"{task}: the passkey wording has a single needle (niah_single)")
    rng = random.Random(f"{task}/{haystack}/{key_kind}/{seed}")
    keys = random_keys(rng, num_keys, key_kind)
    values_per_key = num_values if num_queries == 1 else 1
    digits = PASSKEY_VALUE_DIGITS if wording == "passkey" else 7
    values = random_values(rng, num_keys * values_per_key, digits=digits, avoid=keys)
    needles = [(keys[i // values_per_key], values[i]) for i in range(len(values))]
    asked_keys = keys[:num_queries]
    answers = [v for k, v in needles if k in asked_keys]
    depths = [depth] + [rng.random() for _ in needles[1:]]
    if wording == "passkey":
        texts = [PASSKEY_NEEDLE.format(key=v) for _, v in needles]
    else:
        texts = [NIAH_NEEDLE.format(key=k, value=v) for k, v in needles]
    inserts = list(zip(depths, texts))
    query = asked_keys[0] if num_queries == 1 else ", ".join(asked_keys[:-1]) + ", and " + asked_keys[-1]
    unit = haystack_units(haystack, essay, seed)
    available = len(essay_words(essay)) if haystack == "essay" else length  # at most a unit per token

    def build(n: int) -> str:
        context = with_inserts(unit, n, inserts, snap_to_sentence=(haystack == "essay"))
        if wording == "passkey":
            return framed(tokenizer, f"{context} {PASSKEY_QUERY}", PASSKEY_ANSWER_PREFIX, chat)
        return framed(tokenizer, NIAH_TEMPLATE.format(context=context, query=query),
                      NIAH_ANSWER_PREFIX.format(query=query), chat)

    n, text, ids = _fit(tokenizer, length, build, min(length, available), chat)
    if n == available < length:
        raise ValueError(f"the essay ({available} words) is too short for a haystack of {length} tokens; "
                         "give more text")
    return RulerSample(task, text, answers, int(length), depth, int(seed), ids, haystack=haystack)


def niah_single(tokenizer, length: int, depth: float, seed: int, **options) -> RulerSample:
    """One needle (`niah` takes the options: haystack, essay, key_kind, wording, chat)."""
    return niah(tokenizer, length, depth, seed, **options)


def niah_multikey(tokenizer, length: int, depth: float, seed: int, num_keys: int = 4, **options) -> RulerSample:
    return niah(tokenizer, length, depth, seed, task="niah_multikey", num_keys=num_keys, **options)


def niah_multivalue(tokenizer, length: int, depth: float, seed: int, num_values: int = 4,
                    **options) -> RulerSample:
    return niah(tokenizer, length, depth, seed, task="niah_multivalue", num_values=num_values, **options)


def niah_multiquery(tokenizer, length: int, depth: float, seed: int, num_queries: int = 4,
                    **options) -> RulerSample:
    return niah(tokenizer, length, depth, seed, task="niah_multiquery", num_keys=num_queries,
                num_queries=num_queries, **options)


# --------------------------------------------------------------------------------------------
# variable tracking


def vt(tokenizer, length: int, depth: float, seed: int, num_hops: int = 4,
       num_distractor_chains: int = 1, chat: bool = False) -> RulerSample:
    """Chains `VAR A = 12345. VAR B = VAR A. ...` in filler text; the asked chain starts at `depth`
    and its hops follow in order (tracking needs them in order), distractor chains anywhere."""
    depth = _check_depth(depth)
    rng = random.Random(f"vt/{seed}")
    num_chains = 1 + num_distractor_chains
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):  # same width: no name is a substring of another
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    chain_values = random_values(rng, num_chains, digits=5)
    inserts: list[tuple[float, str]] = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        start = depth if c == 0 else rng.random()
        places = [start] + sorted(start + (1 - start) * rng.random() for _ in range(num_hops))
        statements = [f"VAR {chain[0]} = {chain_values[c]}."] + [
            f"VAR {chain[h]} = VAR {chain[h - 1]}." for h in range(1, num_hops + 1)]
        inserts.extend(zip(places, statements))
    answers = names[:num_hops + 1]
    query = chain_values[0]
    filler = haystack_units("filler", None, seed)

    def build(n: int) -> str:
        context = with_inserts(filler, n, inserts)
        prefix = VT_ANSWER_PREFIX.format(num_v=len(answers), query=query)
        return framed(tokenizer, VT_TEMPLATE.format(context=context, query=query), prefix, chat)

    _, text, ids = _fit(tokenizer, length, build, length, chat)
    return RulerSample("vt", text, answers, int(length), depth, int(seed), ids)


# --------------------------------------------------------------------------------------------
# common and frequent words extraction


def cwe(tokenizer, length: int, seed: int, num_common: int = 10, common_freq: int | None = None,
        uncommon_freq: int | None = None, chat: bool = False) -> RulerSample:
    """A numbered list of `num_common` words `common_freq` times each among uncommon words
    `uncommon_freq` times each (RULER: 30 and 3, or 2 and 1 below 4096 tokens, where 300 common
    entries would not fit); the uncommon words fill the length."""
    common_freq = common_freq or (30 if length >= 4096 else 2)
    uncommon_freq = uncommon_freq or (3 if length >= 4096 else 1)
    if common_freq <= uncommon_freq:
        raise ValueError("common words must be more frequent than the uncommon ones")
    rng = random.Random(f"cwe/{seed}")
    common = distinct_words(rng, num_common)
    uncommon = distinct_words(rng, length, avoid=set(common))  # more than can fit: each entry is ≥ 1 token

    def build(n: int) -> str:
        entries = common * common_freq + uncommon[:n] * uncommon_freq
        random.Random(f"cwe/{seed}/{n}").shuffle(entries)
        context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
        return framed(tokenizer, CWE_TEMPLATE.format(context=context, num_cw=num_common),
                      CWE_ANSWER_PREFIX.format(num_cw=num_common), chat)

    _, text, ids = _fit(tokenizer, length, build, len(uncommon), chat)
    return RulerSample("cwe", text, common, int(length), None, int(seed), ids)


def fwe_counts(scale: int, vocab_size: int, alpha: float = 2.0) -> list[int]:
    """Zipf-like counts by rank, rank 0 (the dots) `scale` times. Deterministic rather than
    sampled, so the top three are certain and the prompt grows smoothly with `scale`."""
    return [max(1, int(scale / (rank + 1) ** alpha)) for rank in range(vocab_size)]


def fwe(tokenizer, length: int, seed: int, alpha: float = 2.0, vocab_size: int | None = None,
        chat: bool = False) -> RulerSample:
    """RULER's coded text: words of a Zipf-like profile, the most frequent being '....' (ignored),
    shuffled; the answer is the next three by frequency."""
    vocab_size = vocab_size or max(8, length // 50)
    rng = random.Random(f"fwe/{seed}")
    vocab = [FWE_NOISE_WORD] + distinct_words(rng, vocab_size - 1)

    def build(scale: int) -> str:
        stream = [word for word, count in zip(vocab, fwe_counts(scale, vocab_size, alpha)) for _ in range(count)]
        random.Random(f"fwe/{seed}/{scale}").shuffle(stream)
        return framed(tokenizer, FWE_TEMPLATE.format(context=" ".join(stream)), FWE_ANSWER_PREFIX, chat)

    scale, text, ids = _fit(tokenizer, length, build, length, chat)
    counts = fwe_counts(scale, vocab_size, alpha)
    if not counts[3] > max(counts[4:], default=0):
        raise ValueError(f"fwe: length {length} too short for a clear top three (vocabulary {vocab_size})")
    return RulerSample("fwe", text, vocab[1:4], int(length), None, int(seed), ids)


# --------------------------------------------------------------------------------------------
# scoring, as RULER's eval/synthetic/constants.py


def string_match_all(output_text: str, answers: Sequence[str]) -> float:
    """Share of the expected strings found in the output (case-insensitive)."""
    output = output_text.lower()
    return sum(answer.lower() in output for answer in answers) / len(answers) if answers else 0.0


def string_match_part(output_text: str, answers: Sequence[str]) -> float:
    """1 if any expected string is in the output (qa tasks: any reference answer will do)."""
    output = output_text.lower()
    return max((float(answer.lower() in output) for answer in answers), default=0.0)


METRIC_OF_TASK = {"niah": string_match_all, "vt": string_match_all, "cwe": string_match_all,
                  "fwe": string_match_all, "qa": string_match_part}


def score(task_kind: str, output_text: str, answers: Sequence[str]) -> float:
    """RULER's score of one output for a task (`niah_multikey`, `vt`, `qa_1`, ...): its family's metric."""
    family = task_kind.split("_")[0]
    if family not in METRIC_OF_TASK:
        raise ValueError(f"unknown task {task_kind!r}: expected one of {sorted(METRIC_OF_TASK)} (or names starting so)")
    return METRIC_OF_TASK[family](output_text, answers)


TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")


def make_sample(task: str, tokenizer, length: int, depth: float, seed: int, **options) -> RulerSample:
    """Any task by its RULER name, for a suite that loops over names; cwe and fwe have no needle,
    so they take no depth."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: expected one of {TASKS}")
    make = globals()[task]
    if task in ("cwe", "fwe"):
        return make(tokenizer, length, seed, **options)
    return make(tokenizer, length, depth, seed, **options)
