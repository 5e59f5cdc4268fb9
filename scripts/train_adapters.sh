#!/usr/bin/env bash
# The recipe of the shipped adapters (adapters/smollm2-135m-k4), from the imported SmolLM2-135M-Instruct:
#   1. import the base model (runs/smollm2);
#   2. self-distillation data: the base model's own greedy answers to 192 template chat requests and continuations
#      of 64 news openings (DISTILL_ARGS; e.g. DISTILL_ARGS="--mix chat=1600,ask=1000,news=1500,code=400,
#      continue-news=800,continue-prose=400,continue-code=800" DATA=runs/smollm2-distill/mix.jsonl for the broad
#      mix of tidar_jax/data/prompt_mix.py);
#   3. adapter training (configs/smollm2-tidar.yaml, STEPS steps, default 150; bfloat16 compute where the CPU has
#      bf16 matrix instructions, as the shipped pack was trained) -> runs/smollm2-adapters;
#   4. the adapters exported as a pack (bfloat16) -> OUT (default runs/smollm2-adapters/pack).
# Seeded throughout (data order, init): the same command on the same kind of CPU gives the same pack. Every stage
# resumes: rerun the same command after an interruption (or with a larger STEPS) and it continues.
# STOP_AFTER=N trains on the first N records of DATA only (a copy, DATA with .first<N> in its name), so a long
# distillation can feed training before it ends; TRAIN_ARGS adds config overrides (e.g. train.draft_targets=soft).
#
#   bash scripts/train_adapters.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_smollm2_env.sh  # set-up; $PY, $GGUF
OUT="${1:-runs/smollm2-adapters/pack}"
BASE="${BASE:-runs/smollm2}"
RUN="${RUN:-runs/smollm2-adapters}"
DISTILL_ARGS="${DISTILL_ARGS:---chat 192 --corpus-prompts 64}"
DATA="${DATA:-runs/smollm2-distill/chat192-news64.jsonl}"   # with other DISTILL_ARGS, name another DATA file
DTYPE=float32
if grep -q -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then DTYPE=bfloat16; fi

echo "== 1/4 import $GGUF -> $BASE"
if [ -d "$BASE/checkpoints" ]; then echo "   (already imported)"; else
  $PY -m train.import_checkpoint --from gguf "$GGUF" --out "$BASE" --block-size 4; fi
echo "== 2/4 self-distillation ($DISTILL_ARGS) -> $DATA"
# shellcheck disable=SC2086  # DISTILL_ARGS is a list of flags
$PY -m train.distill --checkpoint "$BASE" --out "$DATA" $DISTILL_ARGS ${STOP_AFTER:+--stop-after "$STOP_AFTER"}
TRAIN_DATA="$DATA"
if [ -n "${STOP_AFTER:-}" ]; then
  TRAIN_DATA="${DATA%.jsonl}.first$STOP_AFTER.jsonl"
  if [ ! -f "$TRAIN_DATA" ]; then head -n "$STOP_AFTER" "$DATA" > "$TRAIN_DATA.tmp" && mv "$TRAIN_DATA.tmp" "$TRAIN_DATA"; fi
fi
echo "== 3/4 adapter training (configs/smollm2-tidar.yaml, compute $DTYPE) -> $RUN"
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of overrides
$PY -m train.train --config configs/smollm2-tidar.yaml --workdir "$RUN" "train.init_from=$BASE" \
    "data.paths=[$TRAIN_DATA]" "model.compute_dtype=$DTYPE" "train.steps=${STEPS:-150}" ${TRAIN_ARGS:-}
echo "== 4/4 export the adapters -> $OUT"
if [ -f "$OUT/adapters.json" ]; then echo "   ($OUT already holds a pack: move it away to export again)"; else
  $PY -m train.import_checkpoint --export-adapters "$OUT" --checkpoint "$RUN"; fi
