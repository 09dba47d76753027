#!/usr/bin/env bash
# Device script: the engine-side GPU tests, where a decode step's time goes (scripts/profile_decode_step.py, Qwen3-8B
# NVFP4), then the MoE end-to-end bench (Qwen3-30B-A3B). At most 8 files under $OUT (the device tool's limit).
# Usage: OUT=$OUT bash scripts/gpu_profile.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} COLUMNS=${COLUMNS:-200} TOKENIZERS_PARALLELISM=false
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/profile.log"; }
log "build"
python3 -c "from adaq.kernels import build; build.load(); print('kernels', build.source_hash())" > "$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; exit 1; }
log "built"
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_engine.py \
  tests/test_kernels_gpu.py -k "${TESTS:-rms_norm or end_to_end or graph or gpu_cache}" 2>&1 | tail -n 25 | tee -a "$OUT/profile.log"
for variant in ${VARIANTS:-nvfp4}; do
  timeout 200 python3 scripts/profile_decode_step.py --model qwen3-8b --variant $variant --batch 1,16 --out "$OUT" 2>&1 \
    | grep -v Warning | tee -a "$OUT/profile.log"
done
if [ "${MOE:-1}" = 1 ]; then
  log "moe bench"
  timeout $(( ${TIME_LIMIT:-570} - SECONDS )) python3 -c "from adaq.cli import main; main()" bench --synthetic qwen3-30b-a3b \
    --batch ${MOE_BATCH:-1,16} --baselines bf16 --repeats 2 --output-len 128 --backend cuda --json "$OUT/qwen3-30b-a3b.json" \
    2>&1 | tail -n 30 | tee -a "$OUT/profile.log"
fi
log "done"
