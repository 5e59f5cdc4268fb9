#!/usr/bin/env bash
# Paper-style evaluation (docs/RESULTS.md, "Evaluate like the paper") of the imported SmolLM2-135M-Instruct and its
# TiDAR adaptation, both made by scripts/demo.sh: HumanEval pass@1 with TiDAR and AR (T/NFE, tokens/s) and lm-eval's
# AR likelihood on held-out BBC documents (a local task written at run time), rendered into docs/RESULTS.md.
#
#   bash scripts/paper_eval.sh                       # first 16 HumanEval problems, 192 new tokens, 16 documents
#   LIMIT=164 MAX_NEW=512 DOCS=44 bash scripts/paper_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
BASE="${BASE:-runs/smollm2}"
ADAPTED="${ADAPTED:-runs/smollm2-tidar}"
OUT="${OUT:-runs/paper-eval}"
LIMIT="${LIMIT:-16}"; MAX_NEW="${MAX_NEW:-192}"; DOCS="${DOCS:-16}"
mkdir -p "$OUT"
$PY -m tidar_jax.evals.local_tasks --out "$OUT/tasks" --docs "$DOCS"
for name in base adapted; do
  ckpt=$BASE; [ "$name" = adapted ] && ckpt=$ADAPTED
  $PY -m infer.humaneval --checkpoint "$ckpt" --mode both --limit "$LIMIT" --max-new-tokens "$MAX_NEW" \
      --batch-size 8 --json "$OUT/humaneval-$name.json"
  $PY -m tidar_jax.evals.lm_eval_cli --model tidar_jax --model_args "checkpoint=$ckpt,max_length=512,batch_size=4" \
      --include_path "$OUT/tasks" --tasks tidar_bbc_heldout --output_path "$OUT/lm-eval-$name"
done
$PY -m infer.paper_table --humaneval "base=$OUT/humaneval-base.json" --humaneval "adapted=$OUT/humaneval-adapted.json" \
    --lm-eval "base=$OUT/lm-eval-base" --lm-eval "adapted=$OUT/lm-eval-adapted" --results-md docs/RESULTS.md
