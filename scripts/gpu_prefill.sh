#!/usr/bin/env bash
# Device script for the prefill paths (issue 8): build adaq's kernels (decode GEMM, the layout's dequantization) and
# the FP8 extension (CUTLASS-generated sm_89 GEMM + operand kernels), both for 8.9+PTX and in parallel; run the GPU
# tests of tests/test_prefill_fp8.py; sweep M for the decode-kernels -> exact-path threshold; split cuBLASLt FP8's
# difference from the reference (accumulation vs epilogue); then `adaq bench` 2048-token prefill of random-weight
# Qwen3-8B: NVFP4 exact path, NVFP4 FP8 path, bf16 engine, with the threshold just measured. JSON/PNG/logs in $OUT.
# Needs CUTLASS's headers: the device image lacks nvidia-cutlass, so carry its wheel (pure Python, 6.4 MB):
#   here, once: python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl   (/.whl/ is git-ignored)
#   run with carry [".whl"]. About 4-6 minutes on a fresh H100 (builds ~1-2 min in parallel); TEST_BUDGET bounds it.
# Usage: scripts/gpu_prefill.sh [all|bench]   (bench: skip tests, sweep, profile and accuracy split; PROFILE=0: no
# prefill profile (scripts/profile_prefill_step.py); BENCH=0: no bench)
set -uo pipefail
OUT=${OUT:-out}
MODE=${1:-all}
script_start=$(date +%s)
BENCH_BATCHES=${BENCH_BATCHES:-1,4}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/prefill.log"; }
source scripts/gpu_setup.sh

log "device"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 \
  | tee -a "$OUT/prefill.log"
build_both
main_rc=$MAIN_RC
if [ $main_rc -ne 0 ]; then  # adaq's kernels (decode GEMM, the layout's dequantization) did not build
  log "MAIN KERNELS FAILED TO BUILD: tests of the FP8 GEMMs only"; grep -m 5 "error" /tmp/build_main.log
  timeout 300 python3 -m pytest tests/test_prefill_fp8.py -m gpu -q -rs --tb=short -p no:cacheprovider \
    -k "not exact and not dequantize and not routes" 2>&1 | tail -n 45 | tee -a "$OUT/prefill.log"
  timeout 40 python3 -c "import json, os; from adaq.bench import prefill_bench as b; r = b.hopper_accuracy(); \
json.dump(r, open(os.environ['OUT'] + '/hopper_accuracy.json', 'w'), indent=1); print(chr(10).join(b.hopper_lines(r)))" \
    2>&1 | tee -a "$OUT/prefill.log"
  exit 1
fi

THRESHOLD=""
if [ "$MODE" = all ]; then
  log "threshold sweep (decode kernels vs exact path vs FP8 vs bf16, one Qwen3-8B layer)"
  timeout 90 python3 - <<'PY' 2>&1 | tee -a "$OUT/prefill.log"
import json, os
from adaq.bench import prefill_bench
sweep = prefill_bench.threshold_sweep()
json.dump(sweep, open(os.path.join(os.environ["OUT"], "prefill_sweep.json"), "w"), indent=1)
print("\n".join(prefill_bench.sweep_lines(sweep)))
open("/tmp/adaq_threshold", "w").write(str(sweep["threshold"] or ""))
PY
  THRESHOLD=$(cat /tmp/adaq_threshold 2>/dev/null)

  log "prefill attention: flash kernel (v0), v3's prefill kernel (v4), torch SDPA"
  timeout 90 python3 - <<'PY' 2>&1 | grep -v Warn | tee -a "$OUT/prefill.log"
from adaq.bench import microbench as m
r = [m.prefill_attention(s, 2048, kv_dtype=d, variant=v) for s in (1, 4) for d in ("fp8", "bf16") for v in (0, 4)]
print("\n".join(m.attention_lines(r)))
PY

  if [ "${PROFILE:-1}" = 1 ]; then
    log "where a 2048-token prefill's GPU time goes (bf16 engine, exact path, FP8 path)"
    timeout 240 python3 scripts/profile_prefill_step.py --model qwen3-8b --input-len 2048 --batch 1 --out "$OUT" \
      2>&1 | grep -v -e Warning -e USDT | tee -a "$OUT/prefill.log"
  fi

  [ "${HOPPER_ACCURACY:-1}" = 1 ] && log "cuBLASLt FP8 accuracy split (accumulation vs epilogue)" && timeout 40 python3 - <<'PY' 2>&1 | tee -a "$OUT/prefill.log"
import json, os
from adaq.bench import prefill_bench
report = prefill_bench.hopper_accuracy()
json.dump(report, open(os.path.join(os.environ["OUT"], "hopper_accuracy.json"), "w"), indent=1)
print("\n".join(prefill_bench.hopper_lines(report)))
PY
fi

[ -n "$THRESHOLD" ] && export ADAQ_PREFILL_EXACT_MIN_TOKENS=$THRESHOLD
[ "${BENCH:-1}" = 1 ] && log "adaq bench: 2048-token prefill, Qwen3-8B random weights (exact threshold ${ADAQ_PREFILL_EXACT_MIN_TOKENS:-default})"
[ "${BENCH:-1}" = 1 ] && { timeout ${BENCH_TIMEOUT:-200} python3 -c "from adaq.cli import main; main()" bench --synthetic qwen3-8b \
  --input-len 2048 --output-len 2 --batch "$BENCH_BATCHES" --repeats 3 --baselines bf16 --prefill-path auto,fp8 \
  --backend cuda --json "$OUT/prefill_e2e.json" --plot "$OUT/prefill_e2e.png" > "$OUT/prefill_e2e.log" 2>&1 \
  || log "bench FAILED or timed out"; }
unset ADAQ_PREFILL_EXACT_MIN_TOKENS

if [ "$MODE" = all ]; then  # last, with the time that is left (TEST_BUDGET: seconds from the script's start)
  left=$(( ${TEST_BUDGET:-440} - ( $(date +%s) - script_start ) ))
  log "gpu tests (${left} s left)"
  [ $left -gt 20 ] && timeout $left python3 -m pytest ${TESTS:-tests/test_prefill_fp8.py} -m gpu -q -rs --tb=short \
    -k "${TESTS_K:-}" -p no:cacheprovider 2>&1 | tail -n 45 | tee -a "$OUT/prefill.log"
fi

python3 - <<'PY' 2>&1 | tee -a "$OUT/prefill.log"
import json, os
path = os.path.join(os.environ["OUT"], "prefill_e2e.json")
if os.path.exists(path):
    report = json.load(open(path))
    print(f"{'variant':<14}{'batch':>6}{'tokens':>8}{'TTFT ms':>10}{'prefill tok/s':>15}{'vs bf16':>9}")
    for variant in report["variants"]:
        for r in variant["results"]:
            ratio = (r.get("prefill_speedup") or {}).get("bf16")
            print(f"{variant['variant']:<14}{r['batch']:>6}{r['batch'] * r['input_len']:>8}{r['ttft_s'] * 1e3:>10.1f}"
                  f"{r['prefill_tokens_per_s']:>15,.0f}{'' if ratio is None else f'{ratio:.2f}x':>9}")
        if variant.get("error") or variant.get("skipped"):
            print(variant["variant"], "FAILED/SKIPPED:", variant.get("error") or variant.get("skipped"))
    for variant in report["variants"]:
        print(f"  {variant['variant']}: {variant['label']}")
else:
    print(open(os.path.join(os.environ["OUT"], "prefill_e2e.log")).read()[-3000:])
PY
log "done"
