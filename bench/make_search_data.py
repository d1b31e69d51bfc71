"""Write tdavid_segments.jsonl.gz: The Treasury of David (one 11.8M-character document in
../shared/corpus/books.jsonl.gz) cut at paragraph breaks into 8 segments, the search data of the
SmolLM2 runs in docs/BENCHMARKS.md (evaluation uses the Austen novels and Moby-Dick instead).
usage: python3 bench/make_search_data.py ../shared/corpus/books.jsonl.gz tdavid_segments.jsonl.gz"""

import gzip
import json
import sys

source, target = sys.argv[1], sys.argv[2]
full = next(json.loads(line)["text"] for line in gzip.open(source, "rt") if '"tdavid/full"' in line)
n, start = 8, 0
size = len(full) // n
with gzip.open(target, "wt") as out:
    for i in range(n):
        end = len(full) if i == n - 1 else full.find("\n\n", start + size)
        out.write(json.dumps({"id": f"tdavid/segment-{i}", "title": f"Treasury of David, segment {i + 1}/{n}",
                              "text": full[start:end]}) + "\n")
        start = end
