#!/usr/bin/env bash
# Issue 5: LongRoPE2's search (needle-driven fitness + critical dimension + searched attention
# factor) against the plain perplexity search, SmolLM2-135M at 64k or 128k, no fine-tuning. The
# plain search's result is the shipped preset smollm2-135m-TARGET (bench/smollm2_search.sh); both
# are measured beside YaRN on documents neither search saw: perplexity on 4 documents and passkey
# at the target length, 2 keys at each of the standard depths 0, 0.25, 0.5, 0.75, 1 and at 0.9
# (SmolLM2 misses depth 1.0 at every length, even 512 tokens, by copying the question: see
# docs/BENCHMARKS.md; 0.9 shows retrieval from just before the question).
# usage: bench/smollm2_needle_vs_plain.sh MODEL SEARCH_DATA EVAL_DATA OUT [TARGET] [MINUTES]
#   SEARCH_DATA: tdavid_segments.jsonl.gz (bench/make_search_data.py); EVAL_DATA: the Austen novels
#   and Moby-Dick. TARGET: 64k or 128k (default 128k). MINUTES: the search's wall-time budget,
#   resumed sessions included (default 8); re-running continues the search and redoes the evaluation.
set -euo pipefail
MODEL=$1; SEARCH=$2; EVAL=$3; OUT=$4; TARGET=${5:-128k}; MINUTES=${6:-8}
LR="python3 -m longrope"
$LR search --model "$MODEL" --data "$SEARCH" --target-length "$TARGET" --samples 2 --population 32 \
    --mutations 8 --crossovers 8 --parents 16 --generations 40 --max-evals 150 --max-minutes "$MINUTES" \
    --seed 0 --fitness needle --algorithm critical-dim --search-attention --out "$OUT/needle-$TARGET" --resume
METHODS=yarn,smollm2-135m-$TARGET,$OUT/needle-$TARGET/scaling.json
$LR eval ppl --model "$MODEL" --data "$EVAL" --docs 4 --lengths "$TARGET" --compare "$METHODS" \
    --out "$OUT/ppl-$TARGET" --force
$LR eval passkey --model "$MODEL" --lengths "$TARGET" --depths 0,0.25,0.5,0.75,0.9,1 --trials 2 \
    --compare "$METHODS" --out "$OUT/passkey-$TARGET" --force
