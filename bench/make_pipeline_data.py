"""Data of the SmolLM2 progressive-extension run (issue 7, docs/BENCHMARKS.md), from ../shared/corpus:

  OUT/search/tdavid_full.jsonl.gz   The Treasury of David, one document (2.88M SmolLM2 tokens: the
                                    only one long enough for a 2048k search)
  OUT/eval/austen_moby.jsonl.gz     the six Austen novels and Moby-Dick (held apart)
  OUT/eval/setmm_head.jsonl.gz      the first 5.5M characters of Metamath's set.mm (about 2.36M
                                    tokens: held apart, long enough for perplexity at 1M and 2048k)

Then `python3 bench/make_search_data.py OUT/search/tdavid_full.jsonl.gz OUT/search/tdavid_segments.jsonl.gz`
adds the same text in 8 segments, so shorter searches draw several documents.
usage: python3 bench/make_pipeline_data.py ../shared/corpus OUT"""

import gzip
import json
import os
import sys

corpus, out = sys.argv[1], sys.argv[2]
for sub in ("search", "eval"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)


def lines(name):
    with gzip.open(os.path.join(corpus, name), "rt") as f:
        for line in f:
            yield json.loads(line)


def write(path, docs):
    with gzip.open(path, "wt") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")


books = list(lines("books.jsonl.gz"))
write(os.path.join(out, "search", "tdavid_full.jsonl.gz"), [d for d in books if d["id"] == "tdavid/full"])
write(os.path.join(out, "eval", "austen_moby.jsonl.gz"), [d for d in books if not d["id"].startswith("tdavid")])
setmm = next(d for d in lines("formal.jsonl.gz") if d["id"] == "metamath/set.mm")
write(os.path.join(out, "eval", "setmm_head.jsonl.gz"),
      [{**setmm, "id": "metamath/set.mm-head", "title": setmm["title"] + " (first 5.5M characters)",
        "text": setmm["text"][:5_500_000]}])
