#!/usr/bin/env bash
# Reproduces docs/RESULTS.md: trains the AR baseline, TiDAR K=4 and K=8 and a small AR draft model on the embedded
# corpus (equal token budgets), evaluates and benchmarks them, writes docs/results/*.json and docs/*.png, and renders
# the tables into docs/RESULTS.md. `--quick` is a smoke test (a few steps, outputs under runs/reproduce-quick).
# Other flags: see `python -m infer.reproduce --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m infer.reproduce "$@"
