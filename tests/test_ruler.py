"""RULER-style tasks: prompts parsed back independently of the generator, lengths, depths,
determinism, and the scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from longrope.evaluate import ruler
from longrope.tokenization import byte_tokenizer

ESSAY = " ".join(
    f"Paragraph {i} talks about building things that people want. Startups grow fast when founders "
    f"listen to users! Do they? Most ideas look bad at first, and that is why they are open." for i in range(60))

NEEDLE_RE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def n_tokens(tok, text):
    return len(tok(text)["input_ids"])


def niah_cases():
    for haystack in ruler.NIAH_HAYSTACKS:
        for key_kind in ("words", "uuids"):
            yield "niah_single", dict(haystack=haystack, key_kind=key_kind)
    for task in ("niah_multikey", "niah_multivalue", "niah_multiquery"):
        for haystack in ruler.NIAH_HAYSTACKS:
            yield task, dict(haystack=haystack)


def make_niah(tok, task, kw, length=1024, depth=0.4, seed=3):
    return getattr(ruler, task)(tok, length, depth, seed, essay=ESSAY, **kw)


def asked_keys(prompt):
    query = re.search(r"What are all the special magic numbers for (.+) mentioned in the provided text\?",
                      prompt).group(1)
    return [k for k in re.split(r", and |, ", query)]


@pytest.mark.parametrize("task,kw", list(niah_cases()))
def test_niah_answers_are_the_asked_needles(tok, task, kw):
    sample = make_niah(tok, task, kw)
    assert sample.task == task and sample.metric == "string_match_all"
    needles = NEEDLE_RE.findall(sample.prompt)
    keys = asked_keys(sample.prompt)
    expected = [value for key, value in needles if key in keys]
    assert sorted(sample.answers) == sorted(expected) and expected
    distractors = [value for key, value in needles if key not in keys]
    assert not set(distractors) & set(sample.answers)
    # each answer occurs in the prompt only in its own needle: a distractor cannot be credited
    for answer in sample.answers:
        assert sample.prompt.count(answer) == 1
    assert ruler.score(task, " ".join(sample.answers), sample.answers) == 1.0
    expected_needles = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}[task]
    assert len(needles) == expected_needles
    assert len({k for k, _ in needles}) == {"niah_multivalue": 1}.get(task, expected_needles)
    assert sample.prompt.endswith(ruler.NIAH_ANSWER_PREFIX.format(query=", and ".join(keys) if len(keys) < 3
                                                                 else ", ".join(keys[:-1]) + ", and " + keys[-1]))
    if kw.get("key_kind") == "uuids":
        uuid_shape = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
        assert all(re.fullmatch(uuid_shape, k) for k in keys)
    assert all(re.fullmatch(r"\d{7}", v) for _, v in needles)


@pytest.mark.parametrize("length", [512, 1024, 2048])
@pytest.mark.parametrize("task,kw", list(niah_cases())[::2])
def test_niah_length(tok, task, kw, length):
    if task != "niah_single" and length == 512:  # four needles and the template alone pass 512 bytes
        with pytest.raises(ValueError, match="shorter than the prompt"):
            make_niah(tok, task, kw, length=length)
        return
    sample = make_niah(tok, task, kw, length=length)
    count = n_tokens(tok, sample.prompt)
    assert count == sample.actual_length <= length
    assert length - count <= 64  # one haystack unit (a sentence at most)


@pytest.mark.parametrize("haystack", ruler.NIAH_HAYSTACKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_niah_depth(tok, haystack, depth):
    sample = ruler.niah_multikey(tok, 2048, depth, 5, haystack=haystack, essay=ESSAY)
    context = sample.prompt.split("\n")[1]  # the template puts the haystack on its own line
    first_needle = ruler.NIAH_NEEDLE.format(key=asked_keys(sample.prompt)[0], value=sample.answers[0])
    before, after = context.split(first_needle)
    haystack_before = len(NEEDLE_RE.sub("", before).strip())
    haystack_all = haystack_before + len(NEEDLE_RE.sub("", after).strip())
    tolerance = 0.03 if haystack != "essay" else 0.15  # essays snap to the nearest sentence end
    assert abs(haystack_before / haystack_all - depth) <= tolerance


@pytest.mark.parametrize("make", [
    lambda tok, seed: ruler.niah_single(tok, 1024, 0.5, seed, haystack="noise"),
    lambda tok, seed: ruler.niah_multivalue(tok, 1024, 0.5, seed, haystack="essay", essay=ESSAY),
    lambda tok, seed: ruler.niah_multiquery(tok, 1024, 0.5, seed, key_kind="uuids"),
    lambda tok, seed: ruler.vt(tok, 1024, 0.3, seed),
    lambda tok, seed: ruler.cwe(tok, 1024, seed),
    lambda tok, seed: ruler.fwe(tok, 1024, seed),
])
def test_deterministic_by_seed(tok, make):
    first, again, other = make(tok, 7), make(tok, 7), make(tok, 8)
    assert first == again
    assert first.prompt != other.prompt and first.answers != other.answers


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.8])
def test_vt(tok, length, depth):
    sample = ruler.vt(tok, length, depth, 11, num_hops=4, num_distractor_chains=2)
    prompt = sample.prompt
    assert n_tokens(tok, prompt) <= length and length - n_tokens(tok, prompt) <= 64
    query = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
    # follow the chains from the statements, in text order
    value_of: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", prompt):
        assert name not in value_of
        value_of[name] = value_of[rhs[4:]] if rhs.startswith("VAR ") else rhs  # KeyError if out of order
    expected = sorted(name for name, value in value_of.items() if value == query)
    assert sorted(sample.answers) == expected and len(expected) == 5
    distractors = [name for name, value in value_of.items() if value != query]
    assert len(distractors) == 10 and not set(distractors) & set(sample.answers)
    assert f"{len(expected)} variables are assigned the value {query}" in prompt
    # the asked chain starts at about `depth` of the filler
    context = prompt.split("\n\n")[1].split("\nQuestion:")[0]
    before = context.split(f"VAR {sample.answers[0]} = {query}.")[0]
    filler = lambda text: len(re.sub(r"VAR [A-Z]+ = (VAR [A-Z]+|\d+)\.", "", text).replace(" ", ""))
    assert abs(filler(before) / filler(context) - depth) <= 0.05
    assert ruler.score("vt", ", ".join(sample.answers), sample.answers) == 1.0


@pytest.mark.parametrize("length", [512, 1024, 2048, 4096])
def test_cwe(tok, length):
    sample = ruler.cwe(tok, length, 13)
    count = n_tokens(tok, sample.prompt)
    assert count <= length and length - count <= 40  # a unit: an uncommon word's 1 (3 from 4096) entries
    listed = sample.prompt.split("\n")[1]
    entries = re.findall(r"(\d+)\. ([a-z]+)", listed)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(word for _, word in entries)
    ranked = counts.most_common()
    top = {word for word, _ in ranked[:10]}
    assert top == set(sample.answers) and len(sample.answers) == 10
    assert ranked[9][1] > ranked[10][1]  # a strict top ten: no distractor ties an answer
    assert "What are the 10 most common words" in sample.prompt
    assert ruler.score("cwe", " ".join(sample.answers), sample.answers) == 1.0


@pytest.mark.parametrize("length", [1024, 2048, 4096])
def test_fwe(tok, length):
    sample = ruler.fwe(tok, length, 17)
    count = n_tokens(tok, sample.prompt)
    assert count <= length and length - count <= 16
    coded = sample.prompt.split("coded words. ")[1].split("\nQuestion:")[0].split()
    counts = Counter(word for word in coded if word != ruler.FWE_NOISE_WORD)
    ranked = counts.most_common()
    assert {word for word, _ in ranked[:3]} == set(sample.answers)
    assert ranked[2][1] > ranked[3][1]
    assert Counter(coded).most_common(1)[0][0] == ruler.FWE_NOISE_WORD  # the dots are the most frequent, as RULER's
    assert ruler.score("fwe", " ".join(sample.answers), sample.answers) == 1.0


def test_too_short_raises(tok):
    with pytest.raises(ValueError):
        ruler.niah_single(tok, 100, 0.5, 0)
    with pytest.raises(ValueError):
        ruler.niah_single(tok, 1024, 1.5, 0)


def test_fit_to_length_is_the_largest_fit(tok):
    build = lambda n: "x" * (3 * n) + ("y" * (n % 7))  # not linear: the estimate alone is off
    n, text, ids = ruler.fit_to_length(tok, 1000, build, max_units=10_000)
    assert len(ids) <= 1000 < n_tokens(tok, build(n + 1)) and text == build(n)
    n, _, _ = ruler.fit_to_length(tok, 1000, lambda n: "x" * n, max_units=50)
    assert n == 50  # capped by the units available


def test_scorer():
    answers = ["1234567", "7654321", "1111111", "2222222"]
    assert ruler.score("niah_multivalue", "1234567, 7654321, 1111111 and 2222222", answers) == 1.0
    assert ruler.score("niah_multivalue", "9999999", answers) == 0.0
    assert ruler.score("niah_multivalue", "1234567 and 2222222", answers) == 0.5
    assert ruler.score("cwe", "APPLE pear", ["apple", "pear", "plum", "fig"]) == 0.5  # case-insensitive
    assert ruler.score("vt", "X", ["X", "Y", "Z"]) == pytest.approx(1 / 3)
    assert ruler.score("qa_1", "it was Paris", ["London", "Paris"]) == 1.0  # string_match_part
    assert ruler.score("qa_2", "Rome", ["London", "Paris"]) == 0.0
    assert ruler.string_match_part("London", ["London", "Paris"]) == 1.0
    with pytest.raises(ValueError):
        ruler.score("unknown", "", ["a"])


def test_sample_by_name(tok):
    from longrope.evaluate import RULER_TASKS, ruler_sample, ruler_score
    for task in RULER_TASKS:
        sample = ruler_sample(task, tok, 2048, 0.5, 1)
        assert sample.task == task and sample.actual_length <= 2048
        assert ruler_score(task, " ".join(sample.answers), sample.answers) == 1.0
        assert ruler_score(task, "nothing here", sample.answers) == 0.0
    assert ruler_sample("niah_single", tok, 1024, 0.5, 1) == ruler.niah_single(tok, 1024, 0.5, 1)
    with pytest.raises(ValueError):
        ruler_sample("qa_1", tok, 1024, 0.5, 1)


PASSKEY_NEEDLE_RE = re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.")


@pytest.mark.parametrize("haystack", ruler.NIAH_HAYSTACKS)
@pytest.mark.parametrize("length, depth", [(256, 0.1), (256, 0.9), (1024, 0.5)])
def test_niah_single_in_the_passkey_wording(tok, haystack, length, depth):
    """Parsed back: one needle in longrope.passkey's words, its number the answer, the passkey
    question last; the haystack around it at about `depth`."""
    from longrope import passkey

    sample = ruler.niah_single(tok, length, depth, 4, haystack=haystack, essay=ESSAY, wording="passkey")
    needles = PASSKEY_NEEDLE_RE.findall(sample.prompt)
    assert len(needles) == 1 and needles[0][0] == needles[0][1] and sample.answers == [needles[0][0]]
    assert re.fullmatch(r"\d{5}", sample.answers[0]) and sample.prompt.count(sample.answers[0]) == 2
    assert sample.prompt.endswith(" " + passkey.PASSKEY_QUESTION) and not NEEDLE_RE.search(sample.prompt)
    assert passkey.PASSKEY_INTRO not in sample.prompt  # left out: at 256 tokens it leaves no room for a haystack
    count = n_tokens(tok, sample.prompt)
    assert count == sample.actual_length <= length and length - count <= 64
    haystack_text = sample.prompt[:-len(passkey.PASSKEY_QUESTION)]
    before, after = haystack_text.split(passkey.PASSKEY_NEEDLE.format(key=sample.answers[0]))
    assert len(before) + len(after) > 100  # a haystack, even at 256 tokens
    if haystack != "essay" or length > 256:  # 256 tokens hold ~30 essay words: a needle snaps to a sentence end
        tolerance = 0.15 if haystack == "essay" else 0.1
        assert abs(len(before.strip()) / (len(before.strip()) + len(after.strip())) - depth) <= tolerance
    assert ruler.score("niah_single", f" {sample.answers[0]}. Remember it.", sample.answers) == 1.0
    with pytest.raises(ValueError, match="single needle"):
        ruler.niah_multikey(tok, 1024, depth, 4, wording="passkey")


def test_essay_haystack_is_not_repeated(tok):
    short = " ".join(ESSAY.split()[:200])
    sample = ruler.niah_single(tok, 1024, 0.5, 1, haystack="essay", essay=short)
    assert sample.actual_length <= 1024
    with pytest.raises(ValueError, match="too short"):
        ruler.niah_single(tok, 4096, 0.5, 1, haystack="essay", essay=short)


def test_chat_frames_every_task(tok):
    from longrope.tokenization import byte_tokenizer

    chat_tok = byte_tokenizer()
    chat_tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
                              "{% if add_generation_prompt %}[assistant]{% endif %}")
    for task in ruler.TASKS:
        plain = ruler.make_sample(task, tok, 2048, 0.5, 2)
        framed = ruler.make_sample(task, chat_tok, 2048, 0.5, 2, chat=True)
        assert framed.prompt.startswith("<s>[user]") and "[/][assistant]" in framed.prompt
        body, reply = framed.prompt[len("<s>[user]"):].split("[/][assistant]")
        assert plain.prompt.endswith(" " + reply) and body.startswith(plain.prompt[:40])  # the prefix opens the reply
        assert framed.input_ids[0] == 1 != framed.input_ids[1]  # one BOS, the template's
        assert 2048 - 64 <= framed.actual_length <= 2048 and plain.answers == framed.answers
    with pytest.raises(ValueError, match="no chat template"):
        ruler.niah_single(tok, 1024, 0.5, 0, chat=True)
