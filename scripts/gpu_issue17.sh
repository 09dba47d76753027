#!/usr/bin/env bash
# Device script (issue 17): build both extensions; the new GPU tests (lm_head, exact MoE prefill, fused decode
# prologue) and the suites they touch; the prefill sweep (writes the route's thresholds into the package:
# review and commit adaq/backends/prefill_thresholds.json); Qwen3-30B-A3B 2048-token prefill under auto; Qwen3-8B
# decode with each --lm-head. Carry .whl (nvidia-cutlass). Usage: OUT=$OUT bash scripts/gpu_issue17.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/issue17.log"; }
source scripts/gpu_setup.sh
build_both
[ "$MAIN_RC" -ne 0 ] && { log "kernels did not build"; grep -m 20 -B2 -A6 error /tmp/build_main.log | tee -a "$OUT/issue17.log"; exit 1; }
log "gpu tests (new + touched)"
timeout "${TEST_BUDGET:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rfE \
  tests/test_lm_head.py tests/test_prefill_moe_exact.py tests/test_decode_prologue.py tests/test_prefill_fp8_moe.py \
  tests/test_prefill_fp8.py tests/test_kernels_gpu.py tests/test_kernels_gpu_kv_nvfp4.py tests/test_decode_graphs_gpu.py \
  --junitxml="$OUT/pytest.xml" > "$OUT/gpu_tests.log" 2>&1
tail -n 40 "$OUT/gpu_tests.log" | grep -E "^FAILED|^ERROR|passed|failed" | tee -a "$OUT/issue17.log"
log "prefill sweep (M = 16..4096, dense + MoE) -> adaq/backends/prefill_thresholds.json"
timeout 300 python3 -m adaq.bench.prefill_sweep --json "$OUT/prefill_sweep.json" --write-thresholds \
  2>&1 | tee -a "$OUT/issue17.log"
cp adaq/backends/prefill_thresholds.json "$OUT/"
log "Qwen3-30B-A3B, 2048-token prefill under auto (exact grouped MoE) vs --prefill-path nvfp4 (decode kernels)"
timeout 240 python3 -m adaq bench --synthetic qwen3-30b-a3b --batch 1 --input-len 2048 --output-len 16 --repeats 2 \
  --baselines bf16 --prefill-path auto,nvfp4 --json "$OUT/qwen3-30b-a3b-prefill2048.json" 2>&1 | tail -n 12 \
  | tee -a "$OUT/issue17.log"
log "Qwen3-8B decode by --lm-head"
for head in bf16 fp8 nvfp4; do
  timeout 150 python3 -m adaq bench --synthetic qwen3-8b --batch 1,16 --baselines none --lm-head $head --repeats 2 \
    --json "$OUT/qwen3-8b-lm-head-$head.json" 2>&1 | grep -E "│ nvfp4" | head -3 | tee -a "$OUT/issue17.log"
done
log "done"
