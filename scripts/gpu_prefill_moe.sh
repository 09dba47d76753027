#!/usr/bin/env bash
# Device script for the FP8 ceiling and MoE prefill (issue 8, session 2): build adaq's kernels and the FP8 extension
# (CUTLASS-generated sm_89 GEMM, dense + grouped, 8.9+PTX) in parallel, with the ptxas report of the generated GEMM's
# sm_89 machine code beside them; count the sm_89 e4m3 MMA (QMMA) in the built extension's SASS; GPU tests of the
# MoE path and of the Ada GEMM; the FP8 mma.sync ceiling and the Ada GEMM at M = 2048 (prefill_bench); MoE prefill
# on Qwen3-30B-A3B experts against the bf16 path and the NVFP4 decode kernels. JSON and logs under $OUT.
# Needs nvidia-cutlass's wheel carried in .whl (see scripts/gpu_prefill.sh). About 6 minutes on a fresh H100.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="8.9+PTX"
LOG="$OUT/moe.log"
log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

if ! python3 -c "import cutlass_library" 2>/dev/null; then
  ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 || { log "no nvidia-cutlass: carry .whl"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cutlass-site \
    .whl/nvidia_cutlass-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/cutlass-site
fi
log "device"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

log "build (kernels + fp8 in parallel; ptxas report beside)"
start=$(date +%s)
python3 -c "from adaq.kernels import build; build.load(); print('kernels built')" > /tmp/b_main.log 2>&1 &
main_pid=$!
python3 -c "from adaq.kernels import fp8_gemm as p; p.ext(); print('fp8 built', p.source_hash())" > /tmp/b_fp8.log 2>&1 &
fp8_pid=$!
python3 -c "import json, os; from adaq.bench import prefill_bench as b; \
json.dump(b.ptxas_report(), open(os.environ['OUT'] + '/ptxas_sm89.json', 'w'), indent=1)" > /tmp/b_ptxas.log 2>&1 &
ptxas_pid=$!
wait $fp8_pid; fp8_rc=$?; wait $main_pid; main_rc=$?
tail -n 5 /tmp/b_main.log /tmp/b_fp8.log | tee -a "$LOG"
log "build took $(( $(date +%s) - start )) s (rc kernels $main_rc, fp8 $fp8_rc)"
[ $fp8_rc -eq 0 ] || { log "FP8 BUILD FAILED"; tail -n 60 /tmp/b_fp8.log | tee -a "$LOG"; exit 1; }

log "SASS of the built FP8 extension (sm_89 e4m3 mma.sync = QMMA.16832.F32.E4M3.E4M3)"
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, os, re, subprocess
from adaq.kernels import build, prefill_fp8
so = glob.glob(str(build.cache_root() / f"fp8-{fp8_gemm.source_hash()}" / "*.so"))
sass = subprocess.run(["cuobjdump", "-sass", so[0]], capture_output=True, text=True).stdout if so else ""
gemm = [block for block in sass.split("Function : ")[1:] if "gemm" in block.split("\n", 1)[0]]
report = {"sm_89 present": "arch = sm_89" in sass, "GEMM kernels": len(gemm),
          "QMMA.16832.F32.E4M3.E4M3 in GEMM kernels": sum(b.count("QMMA.16832.F32.E4M3.E4M3") for b in gemm),
          "HMMA in GEMM kernels": sum(b.count("HMMA") for b in gemm),
          "LDL/STL (local memory) in GEMM kernels": sum(len(re.findall(r"\b(LDL|STL)\b", b)) for b in gemm),
          "HGMMA": sass.count("HGMMA")}
json.dump(report, open(os.path.join(os.environ["OUT"], "moe_sass.json"), "w"), indent=1)
print(report)
PY

wait $ptxas_pid
log "FP8 mma.sync ceiling and the Ada GEMM (M = 2048)"
timeout 120 python3 - <<'PY' 2>&1 | tee -a "$LOG"
import json, os
from adaq.bench import prefill_bench
ptxas = json.load(open(os.environ["OUT"] + "/ptxas_sm89.json")) if os.path.exists(os.environ["OUT"] + "/ptxas_sm89.json") else None
results = prefill_bench.run_all(ptxas=ptxas)
json.dump(results, open(os.path.join(os.environ["OUT"], "prefill_bench.json"), "w"), indent=1)
print("\n".join(prefill_bench.summary_lines(results)))
for run in results["fp8_mma_sync_ceiling"]["runs"]:
    print(f"  ceiling run: {run['threads']} threads x {run['blocks']} blocks ({run['blocks_per_sm']}/SM): {run['TFLOP/s']:.0f} TFLOP/s")
PY

log "gpu tests: MoE prefill"
timeout 150 python3 -m pytest tests/test_prefill_fp8_moe.py -m gpu -q -rs --tb=short -p no:cacheprovider \
  --junitxml="$OUT/moe_pytest.xml" 2>&1 | tail -n 40 | tee -a "$LOG"

log "MoE prefill (Qwen3-30B-A3B experts)"
timeout 120 python3 - <<'PY' 2>&1 | tee -a "$LOG"
import json, os
from adaq.kernels import prefill_moe_bench
bench = json.load(open(os.environ["OUT"] + "/prefill_bench.json")) if os.path.exists(os.environ["OUT"] + "/prefill_bench.json") else {}
ceiling = bench.get("fp8_mma_sync_ceiling", {}).get("TFLOP/s")
results = prefill_moe_bench.run(ceiling=ceiling)
json.dump(results, open(os.path.join(os.environ["OUT"], "moe_bench.json"), "w"), indent=1)
print("\n".join(prefill_moe_bench.summary_lines(results)))
PY
log "gpu tests: Ada GEMM and operands (regression)"
timeout 60 python3 -m pytest tests/test_prefill_fp8.py -m gpu -q --tb=short -p no:cacheprovider \
  -k "ada_gemm or fp8_linear_matches_reference_backend" 2>&1 | tail -n 15 | tee -a "$LOG"
log "done"
