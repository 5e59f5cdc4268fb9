#!/usr/bin/env bash
# The test command: sets up .venv, then runs the default suite (slow tests excluded; `scripts/test.sh -m slow` runs
# them) on every core (pytest-xdist; TEST_WORKERS=1 runs it in one process). A test file runs in one worker, so
# its module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
