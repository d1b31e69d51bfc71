"""The needle-driven fitness (LongRoPE2): samples and answer-only scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from longrope import evaluate, passkey
from longrope.tokenization import byte_tokenizer

TOK = byte_tokenizer()


def document(n: int, seed: int = 0) -> np.ndarray:
    """A tokenised 'document': BOS then n-1 byte tokens of text-like noise."""
    rng = np.random.default_rng(seed)
    text = bytes(rng.choice(list(b"abcdefgh ijklmnop. "), n - 1)).decode()
    ids = TOK(text)["input_ids"]
    assert len(ids) >= n
    return np.asarray(ids[:n], dtype=np.int64)


def plain(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", [128, 300, 1000])
def test_sample_has_exactly_the_length_needle_at_start_question_and_answer_at_end(length):
    doc = document(length + 50)
    s = passkey.needle_sample(TOK, doc, length, "12345", offset=3)
    ids = s.input_ids.tolist()
    assert len(ids) == length and s.input_ids.dtype == torch.long
    needle = plain("\n" + passkey.PASSKEY_NEEDLE.format(key="12345") + "\n")
    assert ids[:3] == doc[:3].tolist() and ids[0] == TOK.bos_token_id  # the document's start, BOS kept
    assert (s.needle_start, s.needle_end) == (3, 3 + len(needle)) and ids[3:3 + len(needle)] == needle
    answer = plain(" 12345")
    assert s.answer_length == len(answer) and ids[s.answer_start:] == answer
    question = plain("\n" + passkey.PASSKEY_QUESTION)
    assert ids[s.answer_start - len(question):s.answer_start] == question
    middle = ids[s.needle_end:s.answer_start - len(question)]
    assert middle == doc[3:3 + len(middle)].tolist()  # the document goes on after the needle, unbroken
    assert s.window == (s.input_ids, s.answer_start)
    text = TOK.decode(ids)
    assert text.index("The pass key is 12345") < 10 and text.endswith("The pass key is 12345")


def test_samples_are_deterministic_for_a_seed_and_the_needle_is_near_the_start():
    docs = [document(2100, seed=i) for i in range(6)]
    a = passkey.needle_samples(TOK, docs, 2048, seed=7)
    b = passkey.needle_samples(TOK, docs, 2048, seed=7)
    c = passkey.needle_samples(TOK, docs, 2048, seed=8)
    assert [(s.key, s.needle_start) for s in a] == [(s.key, s.needle_start) for s in b]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert [s.key for s in a] != [s.key for s in c]
    assert all(len(s.key) == 5 and s.key.isdigit() for s in a) and len({s.key for s in a}) > 1
    assert all(1 <= s.needle_start <= 0.02 * 2048 for s in a) and len({s.needle_start for s in a}) > 1
    assert all(len(s.input_ids) == 2048 for s in a)


def test_too_short_is_refused():
    with pytest.raises(ValueError, match="too short for the needle"):
        passkey.needle_sample(TOK, document(200), 40, "12345")
    with pytest.raises(ValueError, match="document has 100 tokens"):
        passkey.needle_sample(TOK, document(100), 300, "12345")


def test_only_the_answer_tokens_are_scored():
    model = tiny_model("llama")
    samples = passkey.needle_samples(TOK, [document(140, 1), document(150, 2)], 128, seed=0)
    total, count = evaluate.needle_nll(model, samples, chunk_size=16)
    ref_total, ref_count = 0.0, 0
    with torch.no_grad():
        for s in samples:  # the hand-computed reference: full logits, log-softmax, answer positions
            logp = torch.log_softmax(model(input_ids=s.input_ids[None]).logits[0].double(), -1)
            for i in range(s.answer_start, len(s.input_ids)):
                ref_total -= float(logp[i - 1, s.input_ids[i]])
                ref_count += 1
    assert count == ref_count == sum(len(plain(" " + s.key)) for s in samples) == 12
    assert total == pytest.approx(ref_total, rel=1e-5)
    # changing a token outside the answer changes its context, not what is scored
    s = samples[0]
    other = passkey.NeedleSample(s.input_ids.clone(), s.key, s.needle_start, s.needle_end, s.answer_start)
    other.input_ids[s.answer_start - 1] = (int(s.input_ids[s.answer_start - 1]) + 1) % 259
    assert evaluate.needle_nll(model, [other])[1] == s.answer_length
    assert evaluate.perplexity(model, [s.window]) == pytest.approx(
        evaluate.perplexity_from(*evaluate.needle_nll(model, [s])))
