#!/usr/bin/env bash
# Installs adaq (if needed) and runs the whole test suite; GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
. .venv/bin/activate
python -m pytest -q "$@"
