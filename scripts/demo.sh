#!/usr/bin/env bash
# The main job, end to end on a 2-core CPU: set-up, train the small TiDAR model (configs/small.yaml, K = 4) on the
# embedded BBC news corpus, save a checkpoint, generate the same prompt with TiDAR and with AR, and benchmark the
# two (greedy, batch 1, held-out prompts) to print the speed-up.
#
#   bash scripts/demo.sh                       # WORKDIR=runs/demo
#   WORKDIR=runs/d2 bash scripts/demo.sh train.steps=1000     # extra args are config overrides for training
#
# Re-running resumes (or, when finished, reuses) the run in WORKDIR; nothing saved there is overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
WORKDIR="${WORKDIR:-runs/demo}"
PROMPT="${PROMPT:-The government said on Monday that}"

echo "== 1/4 train: configs/small.yaml -> $WORKDIR"
$PY -m train.train --config configs/small.yaml --workdir "$WORKDIR" "$@"

echo "== 2/4 generate with TiDAR (beta = 1, greedy: must equal AR below)"
$PY -m infer.generate --checkpoint "$WORKDIR" --prompt "$PROMPT" --max-new-tokens 64 --mode tidar
echo "== 3/4 generate with AR"
$PY -m infer.generate --checkpoint "$WORKDIR" --prompt "$PROMPT" --max-new-tokens 64 --mode ar

echo "== 4/4 speed: TiDAR vs AR on held-out prompts (batch 1, medians of interleaved runs)"
$PY -m infer.bench --checkpoint "$WORKDIR" --batch-sizes 1 --skip-latency --repeats 3 --max-new-tokens 96 \
    --json "$WORKDIR/bench.json"
