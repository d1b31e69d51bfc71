"""Data: documents from files or the bundled sample, a tokenisation cache, reproducible selection.

`--data` accepts a .txt/.md file (one document), .jsonl/.jsonl.gz with a `text` field, .parquet
with a `text` column (needs pyarrow), a folder (its .txt/.md files at any depth and its
.jsonl(.gz)/.parquet files at the top, in name order), or the name `bundled`.

Tokenised documents are cached under $XDG_CACHE_HOME/longrope (default ~/.cache/longrope), keyed
by a hash of the tokenizer (its serialized form and the special tokens it adds) and of the
source's bytes, so a second run does not tokenise again and any change to either invalidates it.

Nothing here knows about models: a tokenizer is anything with the transformers call interface.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import runs
from .errors import UsageError

BUNDLED = Path(__file__).parent / "bundled" / "bundled.jsonl.gz"
TEXT_SUFFIXES = (".txt", ".md")
DOCUMENT_FILES = TEXT_SUFFIXES + (".jsonl", ".jsonl.gz", ".json.gz", ".parquet")  # what a --data folder may hold
CACHE_VERSION = 1
PIECE_CHARS = 200_000  # long documents are tokenised in pieces of about this many characters
_CHECK_CHARS = 256  # characters either side of a cut that are re-tokenised to verify it


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class TokenizedDocument:
    id: str
    tokens: np.ndarray  # int64 token ids, with the special tokens the tokenizer adds (BOS)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of a document, scoring targets at window positions >= score_from."""

    start: int
    end: int
    score_from: int = 1

    @property
    def n_scored(self) -> int:
        return self.end - self.start - max(1, self.score_from)


# --------------------------------------------------------------------------------------------
# reading documents


def _source_path(source: str | os.PathLike) -> Path:
    if str(source) == "bundled":
        return BUNDLED
    path = Path(source)
    if not path.exists():
        raise UsageError(f"--data {source}: no such file or folder; give a .txt/.md file, a folder of them, "
                         ".jsonl(.gz), .parquet or 'bundled'")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--data {path}: cannot read it ({exc.strerror}); check the path and permissions") from None


def _folder_files(path: Path) -> list[Path]:
    # .txt/.md anywhere below; .jsonl/.parquet only at the top, so that outputs written inside a
    # data folder (a search's history.jsonl, say) are not taken for documents
    files = sorted({p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES}
                   | {p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DOCUMENT_FILES)})
    if not files:
        raise UsageError(f"--data {path}: folder holds no .txt, .md, .jsonl(.gz) or .parquet files")
    return files


def _decode(path: Path, raw: bytes, what: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--data {path}{what}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None


def _jsonl_documents(path: Path, raw: bytes) -> list[Document]:
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UsageError(f"--data {path}: not a valid gzip file ({exc})") from None
    docs = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"--data {path}: line {lineno} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"--data {path}: line {lineno} has no \"text\" string field; every line needs one")
        doc_id = record.get("id")
        docs.append(Document(str(doc_id) if doc_id is not None else f"{path.name}:{lineno}", record["text"]))
    return docs


def _parquet_documents(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq  # optional: only .parquet data needs it
    except ImportError:
        raise UsageError(f"--data {path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own exception types
        raise UsageError(f"--data {path}: cannot read parquet ({exc})") from None
    if "text" not in table.column_names:
        raise UsageError(f"--data {path}: no 'text' column (columns: {', '.join(table.column_names)})")
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else list(range(len(texts)))
    docs = []
    for row, (doc_id, text) in enumerate(zip(ids, texts)):
        if not isinstance(text, str):
            raise UsageError(f"--data {path}: row {row} has no text")
        docs.append(Document(str(doc_id), text))
    return docs


def _parse(path: Path, raw: bytes, name: str | None = None) -> list[Document]:
    lower = path.name.lower()
    if lower.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return _jsonl_documents(path, raw)
    if lower.endswith(".parquet"):
        return _parquet_documents(path)
    if lower.endswith(TEXT_SUFFIXES):
        return [Document(name or path.name, _decode(path, raw))]
    raise UsageError(f"--data {path}: unknown file type; use .txt, .md, .jsonl, .jsonl.gz or .parquet")


def _check_nonempty(source, docs: list[Document]) -> list[Document]:
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UsageError(f"--data {source}: no text found (empty file or documents); give a file with text")
    return docs


def read_documents(source: str | os.PathLike) -> list[Document]:
    """All non-empty documents of `source`, in file order."""
    path = _source_path(source)
    if path.is_dir():
        docs = []
        for f in _folder_files(path):
            docs += _parse(f, _read_bytes(f), name=str(f.relative_to(path)))
        return _check_nonempty(source, docs)
    return _check_nonempty(source, _parse(path, _read_bytes(path)))


def load_documents(sources: str | os.PathLike | Sequence[str | os.PathLike], ids: Iterable[str] | None = None,
                   exclude_ids: Iterable[str] | None = None) -> list[Document]:
    """The documents of one or several sources (`read_documents` each), filtered by id
    (`select_documents`)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return select_documents([d for source in sources for d in read_documents(source)], ids, exclude_ids)


def select_documents(docs: Sequence[Document], ids: Iterable[str] | None = None,
                     exclude_ids: Iterable[str] | None = None, what: str = "--data-ids") -> list[Document]:
    """Keep the documents named in `ids` (in that order; all must exist), drop `exclude_ids` and
    empty ones. Raises UsageError (naming the option `what`) if nothing is left."""
    docs = list(docs)
    if ids is not None:
        wanted = list(dict.fromkeys(ids))
        by_id = {d.id: d for d in docs}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            known = ", ".join(list(by_id)[:8]) + (" ..." if len(by_id) > 8 else "")
            raise UsageError(f"{what}: no document with id {', '.join(missing)} (ids: {known})")
        docs = [by_id[i] for i in wanted]
    if exclude_ids is not None:
        drop = set(exclude_ids)
        docs = [d for d in docs if d.id not in drop]
    docs = [d for d in docs if d.text]
    if not docs:
        raise UsageError(f"{what}: no non-empty documents left")
    return docs


def split_bundled(docs: Sequence[TokenizedDocument], n_search: int,
                  seed: int = 0) -> tuple[list[TokenizedDocument], list[TokenizedDocument]]:
    """(search pool, evaluation pool) of the bundled sample, kept apart: `n_search` of its psalms
    by a seeded shuffle, and the rest with the Austen novels, which are for evaluation only."""
    psalms = sorted((d for d in docs if d.id.startswith("tdavid/")), key=lambda d: d.id)
    random.Random(seed).shuffle(psalms)
    held = {d.id for d in psalms[:n_search]}
    return psalms[:n_search], [d for d in docs if d.id not in held]


def training_documents(sources: Sequence[str | os.PathLike], ids: Sequence[str] | None = None,
                       exclude_ids: Sequence[str] | None = None, exclude_sources: Sequence[str | os.PathLike] = (),
                       validation_ids: Sequence[str] | None = None) -> tuple[list[Document], list[Document] | None]:
    """(training documents, validation documents or None): the documents of `sources` named in
    `ids` (all by default) less `exclude_ids`, every document of `exclude_sources` and the
    validation ones, which `validation_ids` picks from `sources` or `exclude_sources`."""
    if validation_ids and ids and set(validation_ids) & set(ids):
        raise UsageError(f"--val-ids and --data-ids share {', '.join(sorted(set(validation_ids) & set(ids)))}")
    everything = load_documents(sources)
    held_out = load_documents(exclude_sources) if exclude_sources else []
    pool = list({d.id: d for d in [*held_out, *everything]}.values())
    validation = select_documents(pool, validation_ids, what="--val-ids") if validation_ids else None
    excluded = [*(exclude_ids or []), *(validation_ids or []), *(d.id for d in held_out)]
    return select_documents(everything, ids, excluded or None), validation


def source_digest(source: str | os.PathLike) -> str:
    """sha256 of the source's content (for a folder: of its files' names and contents)."""
    path = _source_path(source)
    h = hashlib.sha256()
    files = [(str(f.relative_to(path)), f) for f in _folder_files(path)] if path.is_dir() else [("", path)]
    for name, f in files:
        data = _read_bytes(f)
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# tokenisation


def special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the token ids the tokenizer adds around a text by default (e.g. [BOS], [])."""
    probe = "Hello world, this is a probe."
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what determines the token ids: the serialized tokenizer (or its vocabulary) and
    the special tokens it adds."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    prefix, suffix = special_tokens_added(tokenizer)
    h.update(json.dumps({"prefix": prefix, "suffix": suffix}).encode())
    return h.hexdigest()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def cut_points(text: str, piece_chars: int) -> list[int]:
    """Candidate cuts, about every `piece_chars` characters, just before a ' word' (a space between
    a non-space and a letter): where pre-tokenizers split anyway."""
    cuts = []
    pos = piece_chars
    pattern = re.compile(r"(?<=\S) (?=[A-Za-z])")
    while pos < len(text) - _CHECK_CHARS:
        m = pattern.search(text, pos, min(len(text) - _CHECK_CHARS, pos + 10_000))
        if m is None:
            pos += piece_chars
            continue
        cuts.append(m.start())
        pos = m.start() + piece_chars
    return cuts


def tokenize_text(tokenizer, text: str, piece_chars: int = PIECE_CHARS, specials=None) -> list[int]:
    """The ids `tokenizer(text)` gives (special tokens included), computed in pieces for long texts.

    A long text is cut before ' word' boundaries; each cut is kept only if re-tokenising the
    text around it gives the same ids as the two sides separately (tokenizers that treat the
    start of a text specially, like SentencePiece's dummy prefix, fail this and are tokenised
    whole). The pieces are encoded as one batch (in parallel by fast tokenizers).
    """
    prefix, suffix = specials if specials is not None else special_tokens_added(tokenizer)
    cuts = []
    for cut in cut_points(text, piece_chars):
        left, right = text[cut - _CHECK_CHARS:cut], text[cut:cut + _CHECK_CHARS]
        whole, (a, b) = _encode(tokenizer, [left + right])[0], _encode(tokenizer, [left, right])
        if whole == a + b:
            cuts.append(cut)
    bounds = [0] + cuts + [len(text)]
    pieces = [text[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    ids = [t for piece in _encode(tokenizer, pieces) for t in piece]
    return list(prefix) + ids + list(suffix)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longrope"


def _write_cache(path: Path, docs: list[TokenizedDocument]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate([d.tokens for d in docs]) if docs else np.zeros(0, dtype=np.int64)
    dtype = np.uint32 if tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2 ** 32) else np.int64
    with runs.atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, tokens=tokens.astype(dtype), lengths=lengths,
                 ids=np.array([d.id for d in docs], dtype=str), version=np.array(CACHE_VERSION))


def _read_cache(path: Path) -> list[TokenizedDocument] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION:
                return None
            tokens, lengths, ids = z["tokens"].astype(np.int64), z["lengths"], z["ids"]
    except Exception:  # a damaged or foreign file: tokenise again
        return None
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [TokenizedDocument(str(ids[i]), tokens[offsets[i]:offsets[i + 1]]) for i in range(len(ids))]


def cache_path(source: str | os.PathLike, tokenizer, root: str | os.PathLike | None = None) -> Path:
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{source_digest(source)}".encode()).hexdigest()
    return Path(root or cache_dir()) / "tokens" / f"{key[:32]}.npz"


def load_tokenized(source: str | os.PathLike, tokenizer, cache: bool = True,
                   root: str | os.PathLike | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[TokenizedDocument]:
    """Tokenised documents of `source` (with the tokenizer's BOS/EOS), from the cache when present.
    `progress(done, total)` is called as documents are tokenised (`progress.Counter` shows it)."""
    path = cache_path(source, tokenizer, root) if cache else None
    if path is not None and path.is_file():
        docs = _read_cache(path)
        if docs is not None:
            return docs
    texts = read_documents(source)
    specials = special_tokens_added(tokenizer)
    docs = []
    for d in texts:
        ids = tokenize_text(tokenizer, d.text, specials=specials)
        docs.append(TokenizedDocument(d.id, np.asarray(ids, dtype=np.int64)))
        if progress is not None:
            progress(len(docs), len(texts))
    if path is not None:
        try:
            _write_cache(path, docs)
        except OSError as exc:
            print(f"note: could not write the token cache {path}: {exc.strerror}")
    return docs


# --------------------------------------------------------------------------------------------
# selection and windows


def _priority(seed: int, index: int, doc_id: str) -> tuple[str, int]:
    return hashlib.sha256(f"{seed}\0{doc_id}".encode()).hexdigest(), index


def select(docs: Sequence[TokenizedDocument], min_tokens: int, n: int, seed: int = 0) -> list[TokenizedDocument]:
    """Up to `n` documents with at least `min_tokens` tokens, chosen reproducibly for `seed`.

    Each document gets a seeded pseudo-random rank from its id; the n best-ranked long-enough
    documents are returned in rank order. So the choice does not depend on the file order and,
    across lengths, the same documents are chosen where they are long enough.
    """
    if not docs:
        raise UsageError("no documents to choose from")
    eligible = [(i, d) for i, d in enumerate(docs) if len(d) >= min_tokens]
    if not eligible:
        longest = max(docs, key=len)
        raise UsageError(f"no document has {min_tokens} tokens: the longest ({longest.id}) has {len(longest)}; "
                         f"use a length of at most {len(longest)} or longer documents")
    eligible.sort(key=lambda item: _priority(seed, item[0], item[1].id))
    return [d for _, d in eligible[:n]]


def source_of(doc_id: str) -> str:
    """The source a document comes from: its id up to the first "/" (the corpus and the bundled
    sample name documents "tdavid/...", "cpython-3.11/...", "austen/...")."""
    return doc_id.split("/", 1)[0]


def interleave_sources(docs: Sequence[TokenizedDocument]) -> list[TokenizedDocument]:
    """`docs` taken in turn from each source (sources in order of first appearance, each source's
    documents in their given order), so that any leading slice mixes the sources: a search's
    fitness and validation documents are not all prose when the data holds code too."""
    by_source: dict[str, list[TokenizedDocument]] = {}
    for d in docs:
        by_source.setdefault(source_of(d.id), []).append(d)
    queues = list(by_source.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def truncate_window(n_tokens: int, length: int) -> list[Window]:
    """The first `length` tokens as one window (LongRoPE's search protocol, YaRN's --truncate)."""
    return [Window(0, min(length, n_tokens), 1)]


def sliding_windows(n_tokens: int, length: int, stride: int) -> list[Window]:
    """Windows of `length` tokens, each scoring the next `stride` tokens that no earlier window
    scored (the first scores tokens 1..length-1); every window ends at its last scored token, so
    each scored token sees at least length-stride tokens of context (or all before it). Every
    token 1..n-1 is scored exactly once. A stride of `length` or more is taken as length-1
    (adjacent windows overlap by the one token that gives the first target its context)."""
    if stride < 1:
        raise UsageError(f"--stride {stride}: must be at least 1")
    if length < 2:
        raise UsageError(f"length {length}: a window needs at least 2 tokens")
    stride = min(stride, length - 1)
    end = min(length, n_tokens)
    windows = [Window(0, end, 1)]
    while end < n_tokens:
        prev_end, end = end, min(end + stride, n_tokens)
        start = max(0, end - length)
        windows.append(Window(start, end, prev_end - start))
    return windows


def windows(n_tokens: int, length: int, mode: str = "truncate", stride: int | None = None,
            max_tokens: int | None = None) -> list[Window]:
    """Evaluation windows over a document of `n_tokens` (capped at `max_tokens` in sliding mode)."""
    if mode == "truncate":
        return truncate_window(n_tokens, length)
    if mode == "sliding":
        return sliding_windows(min(n_tokens, max_tokens or n_tokens), length, stride or length)
    raise UsageError(f"--mode {mode}: choose truncate or sliding")


def haystack_text(documents: Sequence[Document], n_chars: int, seed: int = 0) -> str:
    """About `n_chars` characters of real text: documents in a seeded order, joined by blank lines,
    starting at a seeded offset of the first."""
    if not documents:
        raise UsageError("no documents for a data haystack")
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    parts, total = [], 0
    first = documents[order[0]].text
    start = rng.randrange(max(1, len(first) - n_chars)) if len(first) > n_chars else 0
    i = 0
    while total < n_chars:
        text = documents[order[i % len(order)]].text
        if i == 0:
            text = text[start:]
        parts.append(text)
        total += len(text) + 2
        i += 1
    return "\n\n".join(parts)[:n_chars]
