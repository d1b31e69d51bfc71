#!/usr/bin/env bash
# LongRoPE search for SmolLM2-135M (trained at 8192) at 64k and 128k, then evaluation of the
# searched scalings beside none, PI, NTK, YaRN and the YaRN-initialised individual on documents
# the search never saw.
# usage: bench/smollm2_search.sh MODEL SEARCH_DATA EVAL_DATA OUT [64k|128k|eval|128k-from-64k]
#   128k-from-64k: the paper's progressive step without fine-tuning: a 128k search started from the
#                  64k preset's factors (--init), evaluated beside YaRN and the YaRN-initialised
#                  individual (MINUTES in the environment: its budget, default 8; the shipped
#                  smollm2-135m-128k preset is this search's result with MINUTES=4.5)
#   SEARCH_DATA: the Treasury of David split into 8 segments (tdavid_segments.jsonl.gz, see
#                docs/BENCHMARKS.md); EVAL_DATA: the Austen novels and Moby-Dick (austen_moby.jsonl.gz)
set -euo pipefail
MODEL=$1; SEARCH=$2; EVAL=$3; OUT=$4; WHAT=${5:-all}
LR="python3 -m longrope"
if [[ $WHAT == 64k || $WHAT == all ]]; then
  $LR search --model "$MODEL" --data "$SEARCH" --target-length 64k --samples 3 --population 32 \
      --mutations 8 --crossovers 8 --parents 16 --generations 40 --max-evals 320 --max-minutes 8 \
      --seed 0 --out "$OUT/search-64k" --resume
fi
if [[ $WHAT == 128k || $WHAT == all ]]; then
  $LR search --model "$MODEL" --data "$SEARCH" --target-length 128k --samples 2 --population 32 \
      --mutations 8 --crossovers 8 --parents 16 --generations 40 --max-evals 150 --max-minutes 8 \
      --seed 0 --out "$OUT/search-128k" --resume
fi
if [[ $WHAT == eval || $WHAT == all ]]; then
  $LR eval ppl --model "$MODEL" --data "$EVAL" --docs 4 --lengths 8k,16k,32k,64k \
      --compare none,linear,ntk,yarn,longrope,"$OUT/search-64k/scaling.json" --out "$OUT/eval-64k" --force
  $LR eval ppl --model "$MODEL" --data "$EVAL" --docs 4 --lengths 128k \
      --compare none,linear,ntk,yarn,longrope,"$OUT/search-64k/scaling.json","$OUT/search-128k/scaling.json" \
      --out "$OUT/eval-128k" --force
  $LR eval passkey --model "$MODEL" --lengths 64k --depths 0,0.25,0.5,0.75,1 --trials 2 \
      --compare yarn,longrope,"$OUT/search-64k/scaling.json" --out "$OUT/passkey-64k" --force
fi
if [[ $WHAT == 128k-from-64k ]]; then
  $LR search --model "$MODEL" --data "$SEARCH" --target-length 128k --samples 2 --population 32 \
      --mutations 8 --crossovers 8 --parents 16 --generations 40 --max-evals 150 --max-minutes "${MINUTES:-8}" \
      --seed 0 --init smollm2-135m-64k --out "$OUT/search-128k-from-64k" --resume
  METHODS=yarn,longrope,"$OUT/search-128k-from-64k/scaling.json"
  $LR eval ppl --model "$MODEL" --data "$EVAL" --docs 4 --lengths 128k --compare "$METHODS" \
      --out "$OUT/eval-128k-from-64k" --force
  $LR eval passkey --model "$MODEL" --lengths 128k --depths 0,0.25,0.5,0.75,0.9,1 --trials 2 \
      --compare "$METHODS" --out "$OUT/passkey-128k-from-64k" --force
fi
