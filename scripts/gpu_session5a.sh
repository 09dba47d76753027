#!/usr/bin/env bash
# Device script, session 5 first call: issue 18's speed figures (decode attention at 8k/32k, FP8 vs NVFP4 KV;
# Qwen3-8B at batch 16 x 8k context with each cache), issue 17's MoE decode-step profile, and where Gemma 4 stands on
# the cuda backend before its head_dim-512 kernels (fallbacks listed, not strict). At most 8 files under $OUT.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/session5a.log"
log() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
. scripts/gpu_setup.sh  # environment, nvidia-cutlass from the carried wheel, build_both
ADAQ="python3 -m adaq"
log "build"
build_both
[ "${SKIP_KV:-0}" = 1 ] || OUT=$OUT bash scripts/gpu_kv_nvfp4.sh bench 2>&1 | tail -n 12 | tee -a "$LOG"
for dtype in fp8 nvfp4; do
  log "qwen3-8b batch 16 x 8k context, $dtype KV"
  timeout 150 $ADAQ bench --synthetic qwen3-8b --batch 16 --input-len 8192 --output-len 128 --repeats 2 --baselines none \
    --backend cuda --strict --kv-cache-dtype $dtype --json "$OUT/qwen3-8b-b16-ctx8k-$dtype.json" 2>&1 | tail -n 14 | tee -a "$LOG"
done
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
log "qwen3-30b-a3b decode step profile"
timeout 150 python3 scripts/profile_decode_step.py --model qwen3-30b-a3b --batch 1,16 --out "$OUT" 2>&1 | grep -v Warning | tail -n 8 | tee -a "$LOG"
fi
for model in ${GEMMA4:-gemma4-31b gemma4-26b-a4b}; do
  log "$model batch 1 (not strict: fallbacks listed)"
  timeout 120 $ADAQ bench --synthetic $model --batch 1 --output-len 64 --repeats 1 --baselines none --backend cuda 2>&1 \
    | tail -n 14 | tee -a "$LOG"
done
log "done"
