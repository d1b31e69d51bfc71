#!/usr/bin/env bash
# Issue 15 on one GPU: SmolLM2-135M (trained at 8192) searched at 64k and 128k with the
# retrieval-aware fitness and validation documents, then measured on documents neither search saw,
# beside YaRN, NTK, YaRN-shaped LongRoPE under sqrt(1 + ln s / ln L) and the best seed (the best
# reference of each search on its validation documents).
#
# usage: bench/smollm2_retrieval.sh PHASE MODEL DATA OUT
#   DATA: the folder bench/make_retrieval_data.py writes (search.jsonl.gz, report_prose.jsonl.gz,
#         report_code.jsonl.gz); MODEL: an HF folder or .gguf; OUT: where results go
#   PHASE search: both searches side by side on the one GPU (MINUTES each, default 8);
#         search1 / search2: one of them alone (a 10-minute device call each)
#   PHASE eval:   perplexity (prose, code), passkey (10 keys, depths 0.05-0.95) and RULER niah_single
#                 (10 needles, depths 0.05-0.95) at 64k and 128k
#   PHASE ruler:  the RULER table: 4k and 8k with no scaling, 16k-128k for YaRN, the best seed, the presets
# New tokens are capped (niah_single 32, the table 64; RULER decodes up to 128): the prompts end with
# the answer prefix, so the answers (one 7-digit number; at most ten words) start at once and fit.
# Every command resumes (search --resume, ruler --resume) or is quick to redo. The lengths can be
# changed for a smoke test on a CPU with the bundled model (L1=1k L2=2k SHORT=128,256 MID=512
# PRESET1= PRESET2=):
# L1, L2 the two targets (64k, 128k), SHORT the lengths without scaling, MID the lengths below L1.
set -euo pipefail
PHASE=$1; MODEL=$2; DATA=$3; OUT=$4
L1=${L1:-64k}; L2=${L2:-128k}; SHORT=${SHORT:-4k,8k}; MID=${MID:-16k,32k}
LR="python3 -m longrope"
S64=$OUT/search-$L1; S128=$OUT/search-$L2
FITNESS=ppl=1,needle=1,short=0.25
DEPTHS=0.05,0.275,0.5,0.725,0.95
mkdir -p "$OUT"
source "$(dirname "$0")/jobs.sh"  # bg, wait_all: a phase's commands side by side on the one GPU

# each search starts from the shipped preset of its length too (--init): the preset competes with the
# searched genomes, and is scored on validation when it is among the fittest
search() {  # search TARGET FITNESS_DOCS POPULATION CHILDREN PARENTS PRESET
  $LR search --model "$MODEL" --data "$DATA/search.jsonl.gz" --target-length "$1" --samples "$2" \
      --validation-samples 2 --fitness $FITNESS --population "$3" --mutations "$4" --crossovers "$4" --parents "$5" \
      --generations 40 --max-minutes "${MINUTES:-8}" --seed 0 ${6:+--init "$6"} --out "$OUT/search-$1" --resume
}
if [[ $PHASE == search ]]; then  # both side by side on one GPU (each gets about half of it)
  bg search-$L1 search $L1 2 24 8 12 ${PRESET1-smollm2-135m-64k}
  bg search-$L2 search $L2 1 16 6 8 ${PRESET2-smollm2-135m-128k}
  wait_all
fi
if [[ $PHASE == search1 ]]; then search $L1 2 24 8 12 ${PRESET1-smollm2-135m-64k} 2>&1 | tee "$S64.log"; fi
if [[ $PHASE == search2 ]]; then search $L2 1 16 6 8 ${PRESET2-smollm2-135m-128k} 2>&1 | tee "$S128.log"; fi

# the shipped presets beside the new results (PRESET1= PRESET2= for none, e.g. another model); `longrope`
# is the search's strongest seed whatever validation chose: YaRN's factors under sqrt(1 + ln s / ln L)
M64=yarn,ntk,longrope,$S64/best_reference.json,$S64/scaling.json${PRESET1-,smollm2-135m-64k}
M128=yarn,ntk,longrope,$S128/best_reference.json,$S128/scaling.json${PRESET2-,smollm2-135m-128k}
if [[ $PHASE == eval ]]; then
  for n in $L1 $L2; do
    [[ $n == $L1 ]] && M=$M64 || M=$M128
    bg ppl-$n bash -c "$LR eval ppl --model '$MODEL' --data '$DATA/report_prose.jsonl.gz' --docs 5 --lengths $n \
        --target-length $n --compare '$M' --out '$OUT/ppl-prose-$n' --force --no-progress && \
      $LR eval ppl --model '$MODEL' --data '$DATA/report_code.jsonl.gz' --docs 4 --lengths $n --target-length $n \
        --compare '$M' --out '$OUT/ppl-code-$n' --force --no-progress"
    bg passkey-$n $LR eval passkey --model "$MODEL" --lengths $n --target-length $n --depths $DEPTHS --trials 2 \
        --compare "$M" --out "$OUT/passkey-$n" --force --no-progress
    bg niah-$n $LR eval ruler --model "$MODEL" --tasks niah_single --lengths $n --target-length $n --depths $DEPTHS \
        --samples 2 --max-new-tokens 32 --compare "$M" --out "$OUT/niah-$n" --resume --no-progress
  done
  wait_all
fi

# RULER: the model's own ceiling inside its window, then one command per length beyond it
RULER="eval ruler --model $MODEL --depths 0.25,0.5,0.75 --samples 1 --max-new-tokens ${RULER_TOKENS:-64} --resume --no-progress"
if [[ $PHASE == ruler ]]; then
  bg ruler-short $LR $RULER --lengths $SHORT --method none --out "$OUT/ruler-short"
  for n in ${MID//,/ } $L1; do
    bg ruler-$n $LR $RULER --lengths $n --compare yarn,longrope,$S64/best_reference.json,$S128/best_reference.json,$S64/scaling.json,$S128/scaling.json \
        --out "$OUT/ruler-$n"
  done
  bg ruler-$L2 $LR $RULER --lengths $L2 --compare yarn,longrope,$S128/best_reference.json,$S128/scaling.json \
      --out "$OUT/ruler-$L2"
  wait_all
fi
