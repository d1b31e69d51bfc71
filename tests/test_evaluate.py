"""The lean forward, perplexity modes and passkey pieces, against independent references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import ORIGINAL, tiny_model
from longrope import data, evaluate, models, passkey
from longrope import scaling as sc
from longrope.tokenization import byte_tokenizer


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g)


def reference_token_nll(model, ids):
    """float64 NLL of every target 1..n-1 from the full logits of a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return -logp.gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_nll_equals_unchunked_reference(arch, chunk):
    model = tiny_model(arch)
    ids = _ids(150)
    total, n = evaluate.nll_sum(model, ids, chunk_size=chunk)
    ref = reference_token_nll(model, ids)
    assert n == 149
    assert total == pytest.approx(ref.sum().item(), rel=1e-6)
    whole, _ = evaluate.nll_sum(model, ids, chunk_size=10_000)
    assert total == pytest.approx(whole, rel=1e-6)


def test_score_from_scores_only_later_targets(llama):
    ids = _ids(80, seed=1)
    ref = reference_token_nll(llama, ids)  # ref[i] is target i+1
    for k in (0, 1, 2, 40, 79):
        total, n = evaluate.nll_sum(llama, ids, chunk_size=16, score_from=k)
        first = max(1, k)
        assert n == 80 - first
        assert total == pytest.approx(ref[first - 1:].sum().item(), rel=1e-6)
    assert evaluate.nll_sum(llama, ids, score_from=80) == (0.0, 0)


def test_lean_forward_never_builds_full_logits_or_mask(llama):
    seen_rows, kwargs_seen = [], []
    h1 = llama.lm_head.register_forward_hook(lambda m, inp, out: seen_rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    h2 = llama.model.register_forward_pre_hook(lambda m, a, kw: kwargs_seen.append(dict(kw)), with_kwargs=True)
    try:
        evaluate.nll_sum(llama, _ids(200), chunk_size=32)
    finally:
        h1.remove()
        h2.remove()
    assert max(seen_rows) <= 32 and sum(seen_rows) == 199
    assert kwargs_seen[0].get("attention_mask") is None and kwargs_seen[0]["use_cache"] is False


def test_stock_nll_matches_lean(llama):
    ids = _ids(120, seed=2)
    lean = evaluate.nll_sum(llama, ids)
    stock = evaluate.stock_nll(llama, ids)
    assert stock[1] == lean[1] == 119
    assert stock[0] == pytest.approx(lean[0], rel=1e-5)
    part = evaluate.stock_nll(llama, ids, score_from=60)
    assert part[1] == 60
    assert part[0] == pytest.approx(evaluate.nll_sum(llama, ids, score_from=60)[0], rel=1e-5)


def test_scaled_model_nll_matches_reference():
    model = tiny_model("llama")
    models.attach(model, sc.make("yarn", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0))
    ids = _ids(200, seed=3)
    assert evaluate.nll_sum(model, ids, chunk_size=50)[0] == pytest.approx(reference_token_nll(model, ids).sum().item(), rel=1e-6)


def _hand_sliding_ppl(model, ids, length, stride):
    """Hand-written: windows end at length, then every `stride` tokens, each `length` long;
    a window scores the targets after the previous window's end."""
    nll, count, prev_end = 0.0, 0, 1
    ends = list(range(length, len(ids), stride)) + [len(ids)]
    for end in ends:
        start = max(0, end - length)
        window_nll = reference_token_nll(model, ids[start:end])  # targets start+1 .. end-1
        for t in range(prev_end, end):
            nll += window_nll[t - start - 1].item()
            count += 1
        prev_end = end
    return math.exp(nll / count), count


@pytest.mark.parametrize("length, stride", [(64, 16), (48, 48), (100, 30)])
def test_sliding_perplexity_matches_hand_reference(llama, length, stride):
    ids = _ids(230, seed=4)
    spans = data.windows(len(ids), length, "sliding", stride)
    windows = evaluate.document_windows(ids, spans)
    total, count = evaluate.nll_windows(llama, windows, chunk_size=16)
    ref_ppl, ref_count = _hand_sliding_ppl(llama, ids, length, min(stride, length - 1))
    assert count == ref_count == 229
    assert evaluate.perplexity(llama, windows, chunk_size=16) == pytest.approx(ref_ppl, rel=1e-6)


def test_truncate_perplexity_is_token_weighted_over_documents(llama):
    docs = [_ids(90, seed=5), _ids(130, seed=6)]
    windows = [w for d in docs for w in evaluate.document_windows(d, data.windows(len(d), 64, "truncate"))]
    nll = [reference_token_nll(llama, d[:64]) for d in docs]
    expected = math.exp(torch.cat(nll).mean().item())
    assert evaluate.perplexity(llama, windows) == pytest.approx(expected, rel=1e-6)
    # sliding with a window covering the whole document equals truncate at that length
    d = docs[0]
    assert evaluate.perplexity(llama, evaluate.document_windows(d, data.windows(90, 90, "sliding", 10))) == \
        pytest.approx(evaluate.perplexity(llama, evaluate.document_windows(d, data.windows(90, 90, "truncate"))), rel=1e-9)


def test_peak_memory_on_cpu_is_none():
    with evaluate.peak_memory("cpu") as peak:
        torch.ones(10)
    assert peak.bytes is None


# --- passkey ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, ok", [(" 12345. Remember", True), ("12345", True), (" 1234", False),
                                         (" 123456", False), (" none", False), (" 54321 12345", False),
                                         ("", False)])
def test_passkey_scoring(answer, ok):
    assert passkey.passkey_correct(answer, "12345") is ok
    assert passkey.passkey_correct(answer, 12345) is ok


def _needle_fraction(prompt):
    """Position of the needle within the haystack, as a fraction of the haystack's characters."""
    text = prompt.text
    start = len(passkey.PASSKEY_INTRO) + 1
    needle = passkey.PASSKEY_NEEDLE.format(key=prompt.key)
    stop = len(text) - len(passkey.PASSKEY_QUESTION) - 1
    haystack_len = (stop - start) - len(needle) - 1
    return (prompt.needle_char - start) / haystack_len


@pytest.mark.parametrize("length", [400, 1000, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_filler_prompt_construction(tok, length, depth):
    p = passkey.passkey_prompt(tok, length, depth, "40413")
    assert p.text.startswith(passkey.PASSKEY_INTRO + " ")
    assert p.text.endswith(" " + passkey.PASSKEY_QUESTION)
    assert p.text.count("The pass key is 40413. Remember it. 40413 is the pass key.") == 1
    assert p.input_ids == tok(p.text)["input_ids"] and p.input_ids[0] == tok.bos_token_id
    per_rep = len(passkey.PASSKEY_FILLER) + 1  # byte-level: one token per character
    assert length - per_rep < p.actual_length <= length == p.nominal_length
    between = p.text[len(passkey.PASSKEY_INTRO) + 1:p.needle_char]
    assert between.replace(passkey.PASSKEY_FILLER, "").strip() == ""  # only whole filler sentences
    assert _needle_fraction(p) == pytest.approx(depth, abs=per_rep / (length - 250) + 0.01)


@pytest.mark.parametrize("depth", [0.0, 0.5, 0.75, 1.0])
def test_data_haystack_prompt(tok, depth):
    text = data.read_documents("bundled")[0].text
    p = passkey.passkey_prompt(tok, 2000, depth, 77777, haystack=text)
    assert 2000 - 3 <= p.actual_length <= 2000  # character granularity: within the tolerance
    haystack = p.text[len(passkey.PASSKEY_INTRO) + 1:-len(passkey.PASSKEY_QUESTION) - 1]
    before, after = haystack.split(passkey.PASSKEY_NEEDLE.format(key="77777"))
    assert text.startswith(before.strip()[:100])
    assert (before.strip() + " " + after.strip()).strip()[:50] in text or depth in (0.0, 1.0)
    assert _needle_fraction(p) == pytest.approx(depth, abs=0.1)  # snapped to a sentence end


def test_prompt_too_short_raises(tok):
    with pytest.raises(ValueError, match="shorter than the passkey prompt"):
        passkey.passkey_prompt(tok, 100, 0.5, 12345)


def test_random_keys_are_five_digits():
    rng = random.Random(0)
    keys = [passkey.random_key(rng) for _ in range(200)]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) > 150


@pytest.mark.parametrize("scaling, prompt_len", [
    (None, 40),
    (sc.make("yarn", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0), 150),
    (sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0), 150),
    (sc.make("longrope", ORIGINAL, 4 * ORIGINAL, dim=16, base=10000.0).replace(
        short_factor=tuple([1.5] * 8)), ORIGINAL - 3),  # crosses from short to long factors
])
def test_greedy_generate_matches_transformers_generate(scaling, prompt_len):
    model = tiny_model("llama")
    if scaling is not None:
        models.attach(model, scaling)
    ids = _ids(prompt_len, seed=7)
    ours = evaluate.greedy_generate(model, ids, max_new_tokens=6)
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0,
                             eos_token_id=None)[0, prompt_len:].tolist()
    assert ours == ref


def test_passkey_trial_decodes_and_scores(tok, monkeypatch, llama):
    prompt = passkey.passkey_prompt(tok, 400, 0.5, "31415")
    monkeypatch.setattr(evaluate.generation, "greedy_generate",
                        lambda model, ids, n, eos_token_id=None: tok(" 31415. Rem", add_special_tokens=False)["input_ids"])
    trial = evaluate.passkey_trial(llama, tok, prompt)
    assert trial.correct and trial.answer == " 31415. Rem"
    assert (trial.nominal_length, trial.actual_length) == (400, prompt.actual_length)
    monkeypatch.undo()
    trial = evaluate.passkey_trial(llama, tok, prompt, max_new_tokens=3)  # a random model: real decoding
    assert trial.answer == tok.decode(evaluate.greedy_generate(llama, prompt.input_ids, 3), skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
    assert trial.correct is passkey.passkey_correct(trial.answer, "31415")
