#!/usr/bin/env bash
# GPU correctness subset + step-cost benchmarks on one NVIDIA GPU (H100/H200), all under `timeout`, < 8 minutes.
#
#   bash scripts/gpu_bench.sh                       # on the GPU machine, from the repository root
#   GPU_BENCH_ALLOW_CPU=1 bash scripts/gpu_bench.sh # dry run on CPU: no CUDA install, reduced sizes
#
# Step timeouts sum to 470 s (install 120, tests 2 x 80, costs 90 + 60, train step 40). 1. installs the CUDA build
#    of jax pinned to pyproject's jax (jax[cuda12]==0.10.2) into .venv (package registry only); 2. runs a handful of
#    TiDAR-vs-AR, spec-decode and kernel-vs-reference tests (the cuDNN hybrid attention against the dense reference
#    included) in float32 and bfloat16 (TIDAR_TEST_DTYPE, read by tests/conftest.py); 3. `infer.bench --cost-only`
#    for qwen2.5-1.5b (K=16) and smollm2-135m (K=4) with --time-steps (random-init weights, no checkpoint); 4. the
#    real train step (small preset, 2 layers, bf16, S = 2048) with attention_impl xla (dense), blockwise and
#    cudnn_hybrid: time, temp memory and first-step loss side by side (benchmarks/train_step_speed.py). Output:
#    docs/results/gpu/*.json and *.log (OUT_DIR overrides). A failing step is recorded in summary.txt and the script
#    goes on.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-docs/results/gpu}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS CMD...: runs CMD under timeout, logs to OUT_DIR/NAME.log, records the exit status
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s): $*" | tee -a "$SUMMARY"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$SUMMARY"
  tail -n 12 "$OUT_DIR/$name.log"
}

if [ "${GPU_BENCH_ALLOW_CPU:-0}" = "1" ]; then
  export JAX_PLATFORMS=cpu
  QWEN_CACHE=512; SMOL_CACHE=256; REPEATS=2; BUCKET=64; QWEN_TIME=()  # no 1.5B random init on a small CPU
  TESTS=(tests/test_ops_attention.py::test_equals_dot_product_attention)
  TRAIN_IMPLS=(xla blockwise); TRAIN_SEQ=128  # cudnn_hybrid needs a GPU
else
  JAX_VERSION=$("$PY" -c "import jax; print(jax.__version__)")
  step install_cuda_jax 120 "$PY" -m pip install --quiet "jax[cuda12]==${JAX_VERSION}"
  if ! "$PY" -c "import jax; d = jax.devices(); print(d); assert d[0].platform == 'gpu', 'no GPU'" >> "$SUMMARY"; then
    echo "no GPU visible to jax: stop (set GPU_BENCH_ALLOW_CPU=1 for a CPU dry run)" | tee -a "$SUMMARY"; exit 1
  fi
  export JAX_PLATFORMS=cuda
  QWEN_CACHE=4096; SMOL_CACHE=4096; REPEATS=5; BUCKET=128; QWEN_TIME=(--time-steps)
  TESTS=(tests/test_ops_attention.py tests/test_decode.py::test_cached_ar_equals_full_recompute
         tests/test_decode.py::test_greedy_tidar_is_lossless
         tests/test_spec_decode.py::test_greedy_equals_target_ar_greedy
         tests/test_ops_hybrid.py::test_cudnn_kernel_equals_dense_reference_on_gpu)
  TRAIN_IMPLS=(xla blockwise cudnn_hybrid); TRAIN_SEQ=2048
fi
"$PY" -c "from tidar_jax.evals.benchmark import device_info; import json; print(json.dumps(device_info()))" \
  > "$OUT_DIR/device.json" 2>/dev/null

for dtype in float32 bfloat16; do
  TIDAR_TEST_DTYPE=$dtype step "tests_$dtype" 80 "$PY" -m pytest -q -x -p no:cacheprovider \
    --junitxml="$OUT_DIR/tests_$dtype.xml" "${TESTS[@]}"
done

step cost_qwen2.5-1.5b_k16 90 "$PY" -m infer.bench --cost-only "${QWEN_TIME[@]}" --repeats "$REPEATS" \
  --config configs/qwen2.5-1.5b.yaml --block-size 16 --cache-len "$QWEN_CACHE" --prompt-bucket "$BUCKET" \
  --batch-size 1 --json "$OUT_DIR/cost_qwen2.5-1.5b_k16.json"
step cost_smollm2-135m_k4 60 "$PY" -m infer.bench --cost-only --time-steps --repeats "$REPEATS" \
  --config configs/smollm2-135m.yaml --block-size 4 --cache-len "$SMOL_CACHE" --prompt-bucket "$BUCKET" \
  --batch-size 1 --json "$OUT_DIR/cost_smollm2-135m_k4.json"
step train_step_attention 40 "$PY" benchmarks/train_step_speed.py --config configs/small.yaml \
  --impls "${TRAIN_IMPLS[@]}" --repeats "$REPEATS" model.n_layers=2 model.compute_dtype=bfloat16 \
  data.seq_len="$TRAIN_SEQ" data.global_batch_size=4
echo "done: $OUT_DIR" | tee -a "$SUMMARY"
