#!/usr/bin/env bash
# Issue 7: SmolLM2-135M (trained at 8192) through the progressive pipeline to 2048k: a search at
# 64k, a short fine-tune at 64k, a search at 256k, a 2-candidate search at 2048k (the 256k factors
# as they are and carried to the new scale), readjustment at 8k, export and a report at
# 8k/64k/256k (beside the base model at 8k); then perplexity at 1M and 2048k and passkey at 2048k,
# one GPU each, side by side.
# usage: bench/smollm2_extend.sh MODEL DATA OUT [NPROC] [extend|eval|all]
#   DATA: the folder written by bench/make_pipeline_data.py (+ tdavid_segments, see there)
#   NPROC: GPUs for the pipeline (torchrun; default 1). Re-running continues where it stopped;
#   MAX_STAGES=N in the environment stops the pipeline cleanly after N stages (time-limited jobs).
set -euo pipefail
MODEL=$1; DATA=$2; OUT=$3; N=${4:-1}; WHAT=${5:-all}
LR=(python3 -m longrope)
[[ $N -gt 1 ]] && LR=(torchrun --standalone --nproc-per-node "$N" -m longrope)
if [[ $WHAT != eval && ! -f $OUT/extend/extend.json ]]; then
  "${LR[@]}" extend --model "$MODEL" --data "$DATA/search" --eval-data "$DATA/eval" --target-length 2048k \
      --stages search:64k:32,finetune:64k:120,search:256k:8,search:2048k:2 --samples 2 \
      --population 16 --mutations 4 --crossovers 4 --parents 8 --readjust-evals 24 \
      --report-lengths 8k,64k,256k --report-docs 2 --passkey-trials 0 --out "$OUT/extend" --resume \
      ${MAX_STAGES:+--max-stages $MAX_STAGES}
fi
[[ $WHAT == extend ]] && exit 0
# 1M and 2048k: the extended model as exported (its own scaling), on documents the pipeline never saw
CUDA_VISIBLE_DEVICES=0 python3 -m longrope eval ppl --model "$OUT/extend/model" --data "$DATA/eval" --docs 1 \
    --lengths 1m,2048k --out "$OUT/ppl-1m-2048k" --force &
PPL=$!
CUDA_VISIBLE_DEVICES=$(( N > 1 ? 1 : 0 )) python3 -m longrope eval passkey --model "$OUT/extend/model" \
    --lengths 2048k --depths 0.5 --trials 1 --out "$OUT/passkey-2048k" --force &
PASSKEY=$!
wait $PPL; wait $PASSKEY
