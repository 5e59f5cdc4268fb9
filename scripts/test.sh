#!/usr/bin/env bash
# The test command: sets up .venv, then runs the default suite (slow tests excluded; `scripts/test.sh -m slow` runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
