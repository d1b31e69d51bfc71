"""Documents, the tokenisation cache, piecewise tokenisation, selection and windows."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from longrope import data
from longrope.errors import UsageError
from longrope.tokenization import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root / "longrope"


class CountingTokenizer:
    """Wraps a tokenizer and counts the calls that tokenise document text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.backend_tokenizer = inner.backend_tokenizer

    def __call__(self, text, **kw):
        self.calls += 1
        return self.inner(text, **kw)


def _write_jsonl(path, records, gz=False):
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(lines) if gz else lines)
    return path


# --- reading ---------------------------------------------------------------------------------


def test_reads_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "x.md").write_text("markdown doc")
    (folder / "sub" / "y.txt").write_text("nested doc")
    (folder / "ignored.bin").write_bytes(b"\0\1")
    _write_jsonl(tmp_path / "d.jsonl", [{"id": "one", "text": "alpha"}, {"text": "beta"}])
    _write_jsonl(tmp_path / "d.jsonl.gz", [{"id": "g", "text": "gamma"}], gz=True)

    assert data.read_documents(tmp_path / "a.txt") == [data.Document("a.txt", "first document")]
    assert [(d.id, d.text) for d in data.read_documents(folder)] == [("sub/y.txt", "nested doc"), ("x.md", "markdown doc")]
    assert [(d.id, d.text) for d in data.read_documents(tmp_path / "d.jsonl")] == [("one", "alpha"), ("d.jsonl:2", "beta")]
    assert [(d.id, d.text) for d in data.read_documents(tmp_path / "d.jsonl.gz")] == [("g", "gamma")]


def test_bundled_sample():
    docs = data.read_documents("bundled")
    ids = [d.id for d in docs]
    assert len(docs) >= 50 and len(set(ids)) == len(ids)
    assert "austen/persuasion" in ids and "tdavid/psalm-001" in ids
    assert min(len(d.text) for d in docs) >= 8192
    assert sum(len(d.text.encode()) for d in docs) <= 3_200_000


def test_jsonl_line_without_text_names_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"id": 3}])
    with pytest.raises(UsageError, match="line 2"):
        data.read_documents(path)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        data.read_documents(tmp_path / "broken.jsonl")


@pytest.mark.parametrize("setup, message", [
    (lambda p: (p / "e.txt").write_text("") and None or p / "e.txt", "no text"),
    (lambda p: p / "missing.txt", "no such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .txt, .md, .jsonl"),
    (lambda p: (p / "x.csv").write_text("a,b") and None or p / "x.csv", "unknown file type"),
    (lambda p: (p / "latin.txt").write_bytes(b"caf\xe9") and None or p / "latin.txt", "not UTF-8"),
])
def test_bad_sources(tmp_path, setup, message):
    with pytest.raises(UsageError, match=message):
        data.read_documents(setup(tmp_path))


def test_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(UsageError, match="pip install pyarrow"):
            data.read_documents(tmp_path / "d.parquet")
        return
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), tmp_path / "d.parquet")
    assert [(d.id, d.text) for d in data.read_documents(tmp_path / "d.parquet")] == [("a", "one"), ("b", "two")]


# --- tokenisation ----------------------------------------------------------------------------


def test_special_tokens_follow_the_tokenizer(tok):
    assert data.special_tokens_added(tok) == ([1], [])
    text = "Hello there"
    assert data.tokenize_text(tok, text) == list(tok(text)["input_ids"])


def _gpt2_style_tokenizer():
    """A byte-level BPE with merges and GPT-2's regex pre-tokenizer, trained here on a little text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = [d.text[:20000] for d in data.read_documents("bundled")[:5]]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=t)


def _prepend_tokenizer():
    """A Llama-2-style normalizer that prepends '▁' to every text: cuts are never safe."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "▁▁": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:'\n")}}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "▁")], unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


@pytest.mark.parametrize("make", [byte_tokenizer, _gpt2_style_tokenizer, _prepend_tokenizer])
def test_piecewise_tokenisation_equals_whole(make):
    tokenizer = make()
    text = data.read_documents("bundled")[-1].text[:60_000]
    whole = list(tokenizer(text)["input_ids"])
    pieces = data.tokenize_text(tokenizer, text, piece_chars=3000)
    assert pieces == whole


def test_piecewise_cuts_happen():
    # the cut candidates exist and verify for a tokenizer where they are safe
    tokenizer = _gpt2_style_tokenizer()
    text = data.read_documents("bundled")[0].text[:20_000]
    cuts = data.cut_points(text, 3000)
    assert len(cuts) >= 5
    assert all(text[c] == " " and text[c + 1].isalpha() for c in cuts)


def test_cache_reuses_and_invalidates(tmp_path, tok, cache_root):
    source = tmp_path / "d.jsonl"
    _write_jsonl(source, [{"id": "a", "text": "abc " * 50}, {"id": "b", "text": "xyz"}])
    counting = CountingTokenizer(tok)
    first = data.load_tokenized(source, counting)
    assert counting.calls > 0
    assert [d.id for d in first] == ["a", "b"]
    assert first[0].tokens.tolist() == tok("abc " * 50)["input_ids"]
    assert len(list(cache_root.rglob("*.npz"))) == 1

    counting.calls = 0
    second = data.load_tokenized(source, counting)
    # only the fingerprint probe runs (special_tokens_added): no document text is tokenised
    texts_seen = counting.calls
    assert texts_seen <= 2
    assert [(d.id, d.tokens.tolist()) for d in second] == [(d.id, d.tokens.tolist()) for d in first]

    # the file changes: re-tokenised, new cache entry
    _write_jsonl(source, [{"id": "a", "text": "changed"}])
    counting.calls = 0
    third = data.load_tokenized(source, counting)
    assert counting.calls > texts_seen
    assert [d.id for d in third] == ["a"] and third[0].tokens.tolist() == tok("changed")["input_ids"]

    # the tokenizer changes (no BOS): re-tokenised with the new behaviour
    other = byte_tokenizer()
    from tokenizers import processors

    other.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(tok)
    counting_other = CountingTokenizer(other)
    fourth = data.load_tokenized(source, counting_other)
    assert counting_other.calls > 2
    assert fourth[0].tokens.tolist() == tok("changed", add_special_tokens=False)["input_ids"]
    assert len(list(cache_root.rglob("*.npz"))) == 3
    assert not list(cache_root.rglob("*.tmp"))


def test_folder_mixes_text_and_jsonl_files(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("plain text")
    (folder / "sub" / "c.md").write_text("nested text")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "x", "text": "first"}) + "\n" + json.dumps({"id": "y", "text": "second"}) + "\n")
    (folder / "sub" / "history.jsonl").write_text('{"not": "a document"}\n')  # below the top: not read
    (folder / "notes.csv").write_text("ignored")
    docs = data.read_documents(folder)
    assert [(d.id, d.text) for d in docs] == [("a.txt", "plain text"), ("x", "first"), ("y", "second"),
                                              ("sub/c.md", "nested text")]
    for name in ("a.txt", "b.jsonl.gz", "sub/c.md"):
        (folder / name).unlink()
    with pytest.raises(UsageError, match="folder holds no .txt, .md, .jsonl"):
        data.read_documents(folder)


def test_cache_key_covers_folder_contents(tmp_path, tok):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    before = data.source_digest(folder)
    (folder / "b.txt").write_text("two")
    assert data.source_digest(folder) != before


def test_damaged_cache_is_rebuilt(tmp_path, tok, cache_root):
    source = tmp_path / "a.txt"
    source.write_text("hello world")
    data.load_tokenized(source, tok)
    (path,) = cache_root.rglob("*.npz")
    path.write_bytes(b"garbage")
    docs = data.load_tokenized(source, tok)
    assert docs[0].tokens.tolist() == tok("hello world")["input_ids"]


# --- selection and windows -------------------------------------------------------------------


def _docs(lengths):
    return [data.TokenizedDocument(f"d{i}", np.arange(n)) for i, n in enumerate(lengths)]


def test_selection_is_seeded_and_filters_by_length():
    docs = _docs([10, 50, 60, 70, 80, 90, 100, 5, 55])
    a = data.select(docs, 50, 3, seed=1)
    assert [d.id for d in a] == [d.id for d in data.select(docs, 50, 3, seed=1)]
    assert all(len(d) >= 50 for d in a) and len({d.id for d in a}) == 3
    seeds = {tuple(d.id for d in data.select(docs, 50, 3, seed=s)) for s in range(10)}
    assert len(seeds) > 1  # the seed matters
    # independent of file order
    assert {d.id for d in data.select(list(reversed(docs)), 50, 3, seed=1)} == {d.id for d in a}
    # asking for more than exist returns all that qualify
    assert len(data.select(docs, 50, 100)) == 7


def test_interleave_sources_by_hand():
    docs = [data.TokenizedDocument(i, np.arange(3)) for i in ("a/1", "a/2", "a/3", "b/1", "c/x/1", "b/2")]
    assert [d.id for d in data.interleave_sources(docs)] == ["a/1", "b/1", "c/x/1", "a/2", "b/2", "a/3"]
    assert data.interleave_sources([]) == []
    assert data.source_of("cpython-3.11/_toplevel/segment-3") == "cpython-3.11" and data.source_of("doc0") == "doc0"


def test_selection_error_states_longest():
    with pytest.raises(UsageError, match=r"longest \(d6\) has 100"):
        data.select(_docs([10, 20, 30, 40, 50, 60, 100]), 101, 2)


@pytest.mark.parametrize("n, length, stride, expected", [
    # (window start, end, targets scored), written out by hand
    (10, 4, 2, [(0, 4, [1, 2, 3]), (2, 6, [4, 5]), (4, 8, [6, 7]), (6, 10, [8, 9])]),
    (10, 4, 4, [(0, 4, [1, 2, 3]), (3, 7, [4, 5, 6]), (6, 10, [7, 8, 9])]),  # stride clamped to 3
    (9, 4, 3, [(0, 4, [1, 2, 3]), (3, 7, [4, 5, 6]), (5, 9, [7, 8])]),  # the last window is full length
    (3, 4, 2, [(0, 3, [1, 2])]),  # shorter than a window
])
def test_sliding_windows_by_hand(n, length, stride, expected):
    got = data.sliding_windows(n, length, stride)
    assert [(w.start, w.end, list(range(w.start + w.score_from, w.end))) for w in got] == expected


@pytest.mark.parametrize("n, length, stride", [(100, 32, 8), (100, 32, 32), (31, 32, 8), (65, 16, 5), (33, 32, 1)])
def test_sliding_windows_score_each_token_once(n, length, stride):
    scored = []
    for w in data.sliding_windows(n, length, stride):
        assert 0 <= w.start < w.end <= n and w.end - w.start <= length
        targets = list(range(w.start + max(1, w.score_from), w.end))
        assert all(t - w.start >= min(t, length - min(stride, length - 1)) for t in targets)  # context
        scored += targets
    assert scored == list(range(1, n))


def test_truncate_window():
    (w,) = data.windows(1000, 64, "truncate")
    assert (w.start, w.end, w.n_scored) == (0, 64, 63)


def test_haystack_text_is_seeded():
    docs = data.read_documents("bundled")[:5]
    a = data.haystack_text(docs, 5000, seed=3)
    assert len(a) == 5000 and a == data.haystack_text(docs, 5000, seed=3)
    assert a != data.haystack_text(docs, 5000, seed=4)
    assert any(a[:200] in d.text for d in docs)
