#!/usr/bin/env bash
# Device script, session 5 third call: every GPU test (three pytest processes side by side on the one GPU), then the
# figures of issues 15-18: NVFP4 KV decode attention (8k/32k) and Qwen3-8B at batch 16 x 8k per KV dtype, the hybrid
# and Gemma 4 bench shapes (strict), the prefill sweep (thresholds). Carry .whl (nvidia-cutlass, fla-core, einops).
# Bench JSON go into one tarball, rewritten after every bench (the device tool returns at most 8 files, and a call cut
# at its 10-minute limit keeps what is under $OUT). Knobs: SKIP_TESTS=1, TEST_BUDGET, BENCHES, BENCH_LIMIT,
# BASELINES (bf16 for the side by side), PREFILL_MODELS, SWEEP=0. Usage: OUT=$OUT bash scripts/gpu_session5c.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/bench
LOG="$OUT/session5c.log"
log() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
. scripts/gpu_setup.sh
log "build"
build_both
[ "$MAIN_RC" -ne 0 ] && { grep -m 20 -B2 -A6 error /tmp/build_main.log | tee -a "$LOG"; exit 1; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  log "gpu tests, three processes"
  BIG="tests/test_kernels_gpu.py"
  MID="tests/test_kernels_gpu_kv_nvfp4.py tests/test_gemma4_gpu.py tests/test_gdn_gpu.py"
  PT="python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rfE"
  timeout ${TEST_BUDGET:-300} $PT $BIG > /tmp/g1.log 2>&1 &
  timeout ${TEST_BUDGET:-300} $PT $MID > /tmp/g2.log 2>&1 &
  timeout ${TEST_BUDGET:-300} $PT tests $(for f in $BIG $MID; do echo --ignore=$f; done) > /tmp/g3.log 2>&1 &
  wait
  for g in 1 2 3; do echo "##### group $g"; cat /tmp/g$g.log; done > "$OUT/gpu_tests.log"
  grep -hE "^FAILED|^ERROR|passed|failed" /tmp/g1.log /tmp/g2.log /tmp/g3.log | tail -n 40 | tee -a "$LOG"
fi
bench() {  # name limit args...
  local name=$1 limit=$2; shift 2
  log "bench $name"
  timeout $limit python3 -m adaq bench "$@" --backend cuda --strict --json "/tmp/bench/$name.json" 2>&1 \
    | grep -E "│ (nvfp4|bf16)|FALLBACK|rror|failed" | head -12 | tee -a "$LOG"
  tar -czf "$OUT/bench.tgz" -C /tmp bench  # after every bench: a call cut at its limit keeps what it measured
}
log "NVFP4 KV decode attention microbenchmark"
timeout 120 python3 -c "
import json, torch
from adaq.bench import microbench
rows = microbench.kv_nvfp4_suite(nvfp4_variants=(None, 2))
json.dump({'device': torch.cuda.get_device_name(), 'rows': rows}, open('/tmp/bench/kv_nvfp4_attention.json', 'w'), indent=1)
for r in rows:
    print(f\"{r['kv_dtype']:6} v{r.get('variant')} batch {r['batch']:3} ctx {r['context']:6} {r['us']:9.1f} us {r.get('pct_of_copy', 0):5.1f} % of copy, splits {r['splits']}\")
" 2>&1 | tail -n 14 | tee -a "$LOG"
for dtype in fp8 nvfp4; do
  bench qwen3-8b-b16-ctx8k-$dtype 100 --synthetic qwen3-8b --batch 16 --input-len 8192 --output-len 128 --repeats 2 \
    --baselines none --kv-cache-dtype $dtype
done
for model in ${BENCHES:-gemma4-31b gemma4-26b-a4b qwen3.6-35b-a3b qwen3-next-80b-a3b}; do
  bench $model ${BENCH_LIMIT:-110} --synthetic $model --batch 1,16 --output-len 128 --repeats 2 --baselines ${BASELINES:-none}
done
for model in ${PREFILL_MODELS:-qwen3.6-35b-a3b qwen3-8b}; do
  bench $model-prefill2048 100 --synthetic $model --batch 1 --input-len 2048 --output-len 8 --repeats 2 --baselines none
done
if [ "${SWEEP:-1}" = 1 ]; then
  log "prefill sweep"
  timeout ${SWEEP_LIMIT:-150} python3 -m adaq.bench.prefill_sweep --json "$OUT/prefill_sweep.json" --write-thresholds \
    2>&1 | tail -n 30 | tee -a "$LOG"
  cp adaq/backends/prefill_thresholds.json "$OUT/"
fi
tar -czf "$OUT/bench.tgz" -C /tmp bench
log "done"
