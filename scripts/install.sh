#!/usr/bin/env bash
# Creates .venv and installs adaq with every extra. On a machine without a GPU the CPU torch wheel goes in
# first (a bare torch requirement would pull a multi-GB CUDA build); a machine with a GPU keeps its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# compat: the editable install is one .pth line naming this folder, so a folder called adaq/ where Python starts (the
# clone itself, seen from its parent) cannot shadow the package, as it does setuptools' default finder ("cannot
# import name 'LLM' from 'adaq' (unknown location)"); tests/test_install.py checks it.
EDITABLE_MODE=compat
python -m pip install -q -e ".[dev]" --config-settings editable_mode=$EDITABLE_MODE
echo "adaq installed in $(pwd)/.venv"
