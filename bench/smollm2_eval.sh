#!/usr/bin/env bash
# SmolLM2-135M (trained at 8192) read at 8k..128k with no scaling, PI, NTK, YaRN and the
# YaRN-initialised LongRoPE individual; perplexity on the Austen novels and Moby-Dick, passkey,
# and peak memory of our lean forward against stock transformers (labels -> loss) at 128k.
# usage: bench/smollm2_eval.sh MODEL DATA OUTDIR     (MODEL: smollm2-135m or a .gguf path)
# DATA: the six Austen novels and Moby-Dick from ../shared/corpus/books.jsonl.gz (not tdavid/full)
set -euo pipefail
MODEL=${1:-smollm2-135m}; DATA=$2; OUT=$3
LR="python3 -m longrope"
$LR eval ppl --model "$MODEL" --data "$DATA" --docs 4 --lengths 8k,16k,32k,64k,128k \
    --compare none,linear,ntk,yarn,longrope --out "$OUT/ppl" --force
$LR eval ppl --model "$MODEL" --data "$DATA" --docs 1 --lengths 128k --compare none --stock \
    --out "$OUT/memory" --force
$LR eval passkey --model "$MODEL" --lengths 4k,8k --depths 0,0.25,0.5,0.75,1 --trials 2 \
    --compare none --out "$OUT/passkey-short" --force
$LR eval passkey --model "$MODEL" --lengths 16k,32k,64k,128k --depths 0,0.25,0.5,0.75,1 --trials 2 \
    --compare none,linear,ntk,yarn,longrope --out "$OUT/passkey-long" --force
