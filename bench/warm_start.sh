#!/usr/bin/env bash
# The warm-start evidence of docs/warm_start.md: a small causal Llama pretrained with
# transformers' Trainer, converted and adapted by grow, against the same shape grown from scratch
# (right to left) and trained jointly from scratch with the same step budget; held-out masked CE
# per level through the whole stack (grow eval --levels), and samples from the adapted export.
#   bash bench/warm_start.sh [OUT]        (~45 min on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/warm-start}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
grow() { "$PY" -m grow "$@"; }
STEPS='train.steps=[100,100,100,100]'   # 4 stages x 100 steps x 16 x 128 tokens, the same for every run
COMMON=(--set "$STEPS" --set curriculum.final_steps=0 --set train.log_every=50)

"$PY" bench/pretrain_causal.py --out "$OUT/causal-llama" --steps 1000
grow train configs/tiny-adapt.yaml --out "$OUT/convert-only" --set model.init_from="$OUT/causal-llama" \
  "${COMMON[@]}" --stop-after convert
grow train configs/tiny-adapt.yaml --out "$OUT/adapt" --set model.init_from="$OUT/causal-llama" "${COMMON[@]}"
# The same shape from scratch, with the adapted run's tokenizer (the checkpoint's plus <|mask|>).
SHAPE=(--set model.num_blocks=4 --set model.hidden_size=64 --set model.num_heads=4 --set model.num_kv_heads=2
       --set model.intermediate_size=192 --set model.max_position_embeddings=512 --set model.vocab_size=null
       --set data.tokenizer="$OUT/adapt/tokenizer" --set schedule.ratios=null --set schedule.kind=linear)
grow train configs/tiny.yaml --out "$OUT/scratch-r2l" "${SHAPE[@]}" "${COMMON[@]}"
grow train configs/tiny-joint.yaml --out "$OUT/scratch-joint" "${SHAPE[@]}" "${COMMON[@]}"
WARM=(--set model.init_from="$OUT/causal-llama" --set curriculum.kind=right_to_left --set curriculum.time=depth)
grow train configs/tiny-adapt.yaml --out "$OUT/warm-r2l-blocks" "${WARM[@]}" "${COMMON[@]}"
grow train configs/tiny-adapt.yaml --out "$OUT/warm-r2l-ends" "${WARM[@]}" --set model.init_blocks=false "${COMMON[@]}"
for order in ascending random; do
  grow train configs/tiny-adapt.yaml --out "$OUT/adapt-$order" --set model.init_from="$OUT/causal-llama" \
    "${COMMON[@]}" --set curriculum.order=$order
done
for run in convert-only adapt adapt-ascending adapt-random scratch-r2l scratch-joint warm-r2l-blocks warm-r2l-ends; do
  echo "== $run"; grow eval "$OUT/$run" --levels --json "$OUT/$run.eval.json"
done
grow export "$OUT/adapt" --out "$OUT/adapt-export" --overwrite
grow sample "$OUT/adapt-export" --mode iterative --length 48 --steps 48 --num-samples 3 --seed 0
grow sample "$OUT/scratch-joint" --mode iterative --length 48 --steps 48 --num-samples 3 --seed 0
