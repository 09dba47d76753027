#!/usr/bin/env bash
# Device script (session 4), one H100 call: build both extensions, every GPU test (strict where the tests ask), the
# serve load run on a synthetic gemma3-4b behind the real Gemma 3 tokenizer, and gemma3-27b at batch 64 with decode
# steps of 64 rows kept on the decode kernels (ADAQ_PREFILL_FP8_MIN_TOKENS=65, ADAQ_PREFILL_EXACT_MIN_TOKENS=97)
# beside the default routing's figure. Carry .whl (nvidia-cutlass, adaq serve's packages) and .tok (the tokenizer:
# python -m adaq.bench.serve_load --export-tokenizer .tok/gemma3). Usage: OUT=$OUT bash scripts/gpu_session4.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/session4.log"; }
source scripts/gpu_setup.sh
build_both
[ "$MAIN_RC" -ne 0 ] && { log "kernels did not build"; grep -m 20 -B2 -A6 error /tmp/build_main.log | tee -a "$OUT/session4.log"; exit 1; }
log "gpu tests"
timeout "${TEST_BUDGET:-260}" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rfE tests \
  --junitxml="$OUT/pytest.xml" > "$OUT/gpu_tests.log" 2>&1
tail -n 40 "$OUT/gpu_tests.log" | grep -E "^FAILED|^ERROR|passed|failed" | tee -a "$OUT/session4.log"
log "gemma3-27b batch 64, decode rows on the decode kernels"
ADAQ_PREFILL_FP8_MIN_TOKENS=65 ADAQ_PREFILL_EXACT_MIN_TOKENS=97 timeout 150 python3 -m adaq bench --synthetic gemma3-27b \
  --batch 64 --baselines none --backend cuda --strict --json "$OUT/gemma3-27b-b64-decode-kernels.json" 2>&1 \
  | grep -E "│ nvfp4" | head -3 | tee -a "$OUT/session4.log"
log "serve load"
OUT=$OUT BENCH_JSON=bench/results/session4/gemma3-4b.json TIME_LIMIT=${SERVE_LIMIT:-200} bash scripts/serve_load_gpu.sh \
  > "$OUT/serve_load_run.log" 2>&1
tail -n 25 "$OUT/serve_load_run.log" | tee -a "$OUT/session4.log"
log "done"
