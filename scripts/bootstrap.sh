#!/usr/bin/env bash
# Set up .venv with everything hf_vpt, its recipes and its tests need. Safe to run again.
# torch comes first: TORCH_SPEC (default torch==2.13.0) is installed before anything that depends on torch, so pip
# never pulls another build as a dependency. Which build pip finds depends on its indexes: PyPI's Linux wheel needs the
# CUDA packages; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build (this project's machines
# find it in their local wheel folder). Set TORCH_SPEC to keep another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
if [ "${HF_VPT_UNLOCKED:-0}" = 1 ]; then
  .venv/bin/pip install -q -e ".[test]"
else
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
fi
