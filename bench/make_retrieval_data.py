"""The documents of the retrieval-aware SmolLM2 searches (docs/BENCHMARKS.md, issue 15), three
disjoint files cut from ../shared/corpus/:

- search.jsonl.gz: what the search sees (fitness and validation documents are drawn from it, seeded
  and disjoint): The Treasury of David in 8 segments and CPython's top-level modules in 6 segments;
- report_prose.jsonl.gz: the six Austen novels and Moby-Dick, never searched on;
- report_code.jsonl.gz: the CPython packages encodings, pydoc_data, distutils and asyncio, never searched on;
- train_short.jsonl.gz: the other CPython packages (shorter documents), a second fine-tuning source;
- needle_valid.jsonl.gz: the Metamath databases iset.mm and nf.mm, the fine-tune's needle validation.

usage: python3 bench/make_retrieval_data.py ../shared/corpus OUT_FOLDER"""

import gzip
import json
import sys
from pathlib import Path


def read(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def segments(doc, n):
    """`doc` cut into n pieces at blank lines (paragraphs, or between code blocks)."""
    text, start, out = doc["text"], 0, []
    size = len(text) // n
    for i in range(n):
        end = len(text) if i == n - 1 else text.find("\n\n", start + size)
        out.append({"id": f"{doc['id']}/segment-{i}", "title": f"{doc.get('title', doc['id'])}, segment {i + 1}/{n}",
                    "text": text[start:end]})
        start = end
    return out


def write(path, docs):
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same inputs give the same bytes
        for d in docs:
            f.write((json.dumps(d) + "\n").encode())
    print(f"{path}: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters")


corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
books = {d["id"]: d for d in read(corpus / "books.jsonl.gz")}
code = {d["id"]: d for d in read(corpus / "python_stdlib.jsonl.gz")}
write(out / "search.jsonl.gz", segments(books["tdavid/full"], 8) + segments(code["cpython-3.11/_toplevel"], 6))
write(out / "report_prose.jsonl.gz", [d for k, d in books.items() if k != "tdavid/full"])
REPORT_CODE = [f"cpython-3.11/{name}" for name in ("encodings", "pydoc_data", "distutils", "asyncio")]
write(out / "report_code.jsonl.gz", [code[k] for k in REPORT_CODE])
write(out / "train_short.jsonl.gz", [d for k, d in code.items() if k not in REPORT_CODE + ["cpython-3.11/_toplevel"]])
formal = {d["id"]: d for d in read(corpus / "formal.jsonl.gz")}
write(out / "needle_valid.jsonl.gz", [formal["metamath/iset.mm"], formal["metamath/nf.mm"]])
