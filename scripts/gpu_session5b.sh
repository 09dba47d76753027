#!/usr/bin/env bash
# Device script, session 5 second call: the Gated DeltaNet kernels and hybrid decode graphs (issue 15), the MoE
# router rewrite and NVFP4 KV tiles (issues 17, 18) under their GPU tests, then the hybrid bench shapes and the NVFP4
# KV microbenchmark. Carry .whl (nvidia-cutlass, fla-core, einops). At most 8 files under $OUT.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/session5b.log"
log() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
. scripts/gpu_setup.sh
log "build"
build_both
[ "$MAIN_RC" -ne 0 ] && { grep -m 20 -B2 -A6 error /tmp/build_main.log | tee -a "$LOG"; exit 1; }
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1 | tee -a "$LOG"
log "gpu tests"
timeout "${TEST_BUDGET:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rfE \
  tests/test_gdn_gpu.py tests/test_hybrid_engine.py tests/test_decode_graphs_gpu.py tests/test_kernels_gpu_kv_nvfp4.py \
  "tests/test_kernels_gpu.py" -k "${TESTS:-not long_prompts}" > "$OUT/gpu_tests.log" 2>&1
grep -E "^FAILED|^ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -n 30 | tee -a "$LOG"
log "NVFP4 KV decode attention microbenchmark"
timeout 100 python3 -c "
import json, torch
from adaq.bench import microbench
rows = microbench.kv_nvfp4_suite()
json.dump({'device': torch.cuda.get_device_name(), 'rows': rows}, open('$OUT/kv_nvfp4_attention.json', 'w'), indent=1)
for r in rows:
    print(f\"{r['kv_dtype']:6} batch {r['batch']:3} ctx {r['context']:6} {r['us']:9.1f} us {r.get('pct_of_copy', 0):5.1f} % of copy, splits {r['splits']}\")
" 2>&1 | tail -n 10 | tee -a "$LOG"
for spec in ${BENCHES:-qwen3.6-35b-a3b:bf16 qwen3-next-80b-a3b:none qwen3.5-27b:bf16}; do
  model=${spec%%:*}; base=${spec##*:}
  log "bench $model (baselines $base)"
  timeout ${BENCH_LIMIT:-110} python3 -m adaq bench --synthetic $model --batch 1,16 --output-len 128 --repeats 2 \
    --baselines $base --backend cuda --strict --json "$OUT/$model.json" 2>&1 | grep -E "│ (nvfp4|bf16)|FALLBACK|error|failed" \
    | head -12 | tee -a "$LOG"
done
log "done"
