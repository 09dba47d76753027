#!/usr/bin/env bash
# Device script for a whole-project check on one GPU machine inside one call: build both extensions in parallel,
# the GPU tests (TESTS, bounded by TEST_BUDGET seconds), the decode-step profile (PROFILE=1), the main `adaq bench`
# (random-weight Qwen3-8B: NVFP4 against the bf16 engine; DECODE=0 skips it), with PREFILL=1 2048-token prefill
# (auto, exact, bf16 engine; then FP8 on every projection) and with ATTENTION=1 the prefill attention kernels (flash
# in both block sizes, v3) against SDPA. At most 8 files under $OUT. Carry .whl (nvidia-cutlass). Usage: OUT=$OUT bash scripts/gpu_final.sh
set -uo pipefail
OUT=${OUT:-out}
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/final.log"; }
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
if [ "${DECODE:-1}" = 1 ]; then
  log "bench"
  timeout $(( ${TIME_LIMIT:-575} - SECONDS )) python3 -m adaq bench --synthetic qwen3-8b --batch ${BATCHES:-1,4,16} \
    --baselines bf16 --output-len ${OUTPUT_LEN:-128} --repeats 2 --backend cuda --json "$OUT/qwen3-8b.json" \
    --plot "$OUT/qwen3-8b.png" 2>&1 | grep -v Warn | tail -n 40 > "$OUT/qwen3-8b.txt"
  cat "$OUT/qwen3-8b.txt"
fi
if [ "${PREFILL:-0}" = 1 ]; then  # the default path (auto), the exact path and the bf16 engine; then FP8 everywhere
  log "prefill bench"
  timeout $(( ${TIME_LIMIT:-575} - SECONDS )) python3 -m adaq bench --synthetic qwen3-8b --input-len 2048 \
    --output-len 2 --batch 1,4 --repeats 3 --baselines bf16 --prefill-path auto,exact --backend cuda \
    --json "$OUT/prefill2048.json" --plot "$OUT/prefill2048.png" 2>&1 | grep -A 12 "^Prefill" | tee -a "$OUT/final.log"
  ADAQ_PREFILL_FP8_EXCLUDE= timeout $(( ${TIME_LIMIT:-575} - SECONDS )) python3 -m adaq bench --synthetic qwen3-8b \
    --input-len 2048 --output-len 2 --batch 1,4 --repeats 3 --baselines none --prefill-path fp8 --backend cuda \
    --json "$OUT/prefill2048_allfp8.json" 2>&1 | grep -A 8 "^Prefill" | tee -a "$OUT/final.log"
fi
if [ "${ATTENTION:-0}" = 1 ]; then  # prefill attention: the flash kernel (v0), v3's prefill kernel (v4), SDPA
  timeout 120 python3 -c "from adaq.bench import microbench as m; print(chr(10).join(m.attention_lines(
    [m.prefill_attention(s, 2048, kv_dtype=d, variant=v) for s in (1, 4) for d in ('fp8', 'bf16') for v in (0, 5, 4)])))" \
    2>&1 | grep prefill | tee "$OUT/attention.txt"
fi
log "done"
