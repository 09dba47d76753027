#!/usr/bin/env bash
# Device script for a whole-project check on one GPU machine inside one call: build both extensions in parallel,
# the GPU tests (TESTS, bounded by TEST_BUDGET seconds), the decode-step profile (PROFILE=1), the main `adaq bench`
# (random-weight Qwen3-8B: NVFP4 against the bf16 engine) and, with PREFILL=1, 2048-token prefill through both NVFP4
# prefill paths. At most 8 files under $OUT. Carry .whl (nvidia-cutlass). Usage: OUT=$OUT bash scripts/gpu_final.sh
set -uo pipefail
OUT=${OUT:-out}
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/final.log"; }
adaq() { python3 -c "from adaq.cli import main; main()" "$@"; }
source scripts/gpu_setup.sh
build_both
[ $MAIN_RC -ne 0 ] && exit 1
log "gpu tests"
timeout "${TEST_BUDGET:-200}" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=line -rf ${TESTS:-tests} \
  --junitxml="$OUT/pytest.xml" 2>&1 | tail -n 30 | tee -a "$OUT/final.log"
if [ "${PROFILE:-0}" = 1 ]; then
  log "profile"
  timeout 90 python3 scripts/profile_decode_step.py --model qwen3-8b --variant nvfp4 --batch 1,16 --out /tmp/profile \
    2>&1 | grep "ms/step" | tee -a "$OUT/final.log"
fi
log "bench"
timeout $(( ${TIME_LIMIT:-575} - SECONDS )) adaq bench --synthetic qwen3-8b --batch ${BATCHES:-1,4,16} \
  --baselines bf16 --output-len ${OUTPUT_LEN:-128} --repeats 2 --backend cuda --json "$OUT/qwen3-8b.json" \
  --plot "$OUT/qwen3-8b.png" 2>&1 | grep -v Warn | tail -n 40 > "$OUT/qwen3-8b.txt"
cat "$OUT/qwen3-8b.txt"
if [ "${PREFILL:-0}" = 1 ]; then
  log "prefill bench"
  timeout $(( ${TIME_LIMIT:-575} - SECONDS )) adaq bench --synthetic qwen3-8b --input-len 2048 --output-len 2 \
    --batch 1,4 --repeats 2 --baselines bf16 --prefill-path auto,fp8 --backend cuda --json "$OUT/prefill2048.json" \
    2>&1 | grep -A 12 "^Prefill"
fi
log "done"
