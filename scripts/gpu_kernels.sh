#!/usr/bin/env bash
# Device script for adaq's kernels: build the sm_89 (+PTX) extension, check its SASS, run the GPU tests, time the
# kernels. Writes JSON and logs under $OUT (default ./out). Usage: scripts/gpu_kernels.sh [quick|attention]
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16}
MODE=${1:-full}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/kernels.log"; }

log "device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/kernels.log"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" 2>&1 | tee -a "$OUT/kernels.log"

log "build"
start=$(date +%s)
python3 -c "from adaq.kernels import build; build.load(verbose=False); print('built', build.source_hash())" \
  2>&1 | tee -a "$OUT/kernels.log" || { log "BUILD FAILED"; exit 1; }
log "build took $(( $(date +%s) - start )) s"

if [ "$MODE" = attention ]; then  # focused: attention tests and timings only (docs/KERNELS.md "Attention v3")
  # The tree is shared with engineers mid-edit: if the GEMM's layout module does not import in this copy, use the
  # last committed one here (attention needs only its names), and say so.
  if ! python3 -c "import adaq.kernels.layout" 2>/dev/null; then
    log "adaq.kernels.layout does not import in this tree; using HEAD's copy for this run"
    git show HEAD:adaq/kernels/layout.py > adaq/kernels/layout.py
  fi
  log "attention gpu tests"
  timeout 200 python3 -m pytest tests/test_kernels_gpu.py -m gpu -q -rs --tb=short -p no:cacheprovider \
    -k "attention or store_kv" --junitxml="$OUT/pytest_attention.xml" 2>&1 | tail -n 40 | tee -a "$OUT/kernels.log"
  log "attention microbench"
  timeout 200 python3 - <<'PY' 2>&1 | tee -a "$OUT/kernels.log"
import json, os
import torch
from adaq.bench import microbench
copy = microbench.copy_bandwidth()
gbs = copy["GB/s"]
results = {"device": torch.cuda.get_device_name(), "copy": copy, "attention": []}
variants = tuple(int(v) for v in os.environ.get("ATTN_VARIANTS", "0,1,2,3").split(","))
results["attention"] = microbench.attention_suite(variants=variants, copy_gbs=gbs)
prefill = []
for kv in ("fp8", "bf16"):
    for seqs, n in ((16, 128), (1, 2048)):
        try:
            prefill.append(microbench.prefill_attention(seqs, n, kv_dtype=kv))
        except Exception as error:  # report, keep the decode figures
            print("prefill", kv, seqs, n, "failed:", repr(error)[:300])
results["prefill"] = prefill
json.dump(results, open(os.path.join(os.environ["OUT"], "attention.json"), "w"), indent=1)
print(f"copy: {gbs:.0f} GB/s (read+write)")
print("\n".join(microbench.attention_lines(results["attention"] + prefill)))
PY
  log "done"
  exit 0
fi

if [ "$MODE" = gemm ]; then
  # Decode GEMM + MoE only: their GPU tests, then every GEMM variant on the Qwen3-8B shapes at M = 1 and 16 and the
  # Qwen3-30B-A3B MoE layer at 1 and 16 tokens (docs/KERNELS.md, "GEMM v5"). Table last.
  log "gpu tests (gemm, moe)"
  timeout ${GEMM_TEST_TIMEOUT:-200} python3 -m pytest tests/test_kernels_gpu.py -m gpu -q -rs --tb=short -p no:cacheprovider \
    -k "gemm or moe or grouped or router or dequantize or graph_capture" --junitxml="$OUT/pytest_gemm.xml" 2>&1 | tail -n 40 | tee -a "$OUT/kernels.log"
  log "gemm microbench"
  timeout ${GEMM_BENCH_TIMEOUT:-170} python3 - <<'PY' 2>&1 | tee -a "$OUT/kernels.log"
import json, os
from adaq.bench import microbench
report = microbench.gemm_report()
json.dump(report, open(os.path.join(os.environ["OUT"], "gemm.json"), "w"), indent=1)
print("\n".join(microbench.gemm_report_lines(report)))
PY
  log "done"
  exit 0
fi

log "compile check (PTX + SASS) and SASS of the built extension"
python3 - <<'PY' 2>&1 | tee -a "$OUT/kernels.log"
import json, os, subprocess, glob
from adaq.kernels import build
report = build.compile_check("sm_89", sass=True)
so = glob.glob(str(build.cache_root() / build.source_hash() / "*.so"))
if so:
    sass = subprocess.run(["cuobjdump", "-sass", so[0]], capture_output=True, text=True).stdout
    report["extension_sass"] = {"sm_89 present": "arch = sm_89" in sass,
                                "HMMA.16816.F32.BF16": sass.count("HMMA.16816.F32.BF16"),
                                "LDSM": sass.count("LDSM"), "LDG.E.128": sass.count("LDG.E.128"),
                                "LDL/STL (local memory)": sass.count("LDL") + sass.count("STL"),
                                "wgmma/HGMMA": sass.count("HGMMA")}
    # The M <= 8 decode GEMMs of the default's variants 4 (ring of 2, <= 64 registers) and 2 (ring of 3, <= 80).
    with open(os.path.join(os.environ["OUT"], "gemm_m16.sass"), "w") as f:
        for fun in ("_ZN4adaq17nvfp4_gemm_kernelILi1ELi2ELi4ELi1EEEvNS_10GemmParamsE",
                    "_ZN4adaq17nvfp4_gemm_kernelILi1ELi3ELi3ELi1EEEvNS_10GemmParamsE"):
            f.write(subprocess.run(["cuobjdump", "-sass", "-fun", fun, so[0]], capture_output=True, text=True).stdout)
json.dump(report, open(os.path.join(os.environ["OUT"], "compile.json"), "w"), indent=1)
print("compile ok:", report["ok"], report.get("error", ""), report.get("extension_sass"))
PY

log "gpu tests"
SEL=(); [ "$MODE" = quick ] && SEL=(-k "not end_to_end")
timeout 330 python3 -m pytest tests/test_kernels_gpu.py -m gpu -q -rs --tb=short -p no:cacheprovider "${SEL[@]}" \
  --junitxml="$OUT/pytest.xml" -s 2>&1 | tail -n 60 | tee -a "$OUT/kernels.log"

log "microbench"
MODE=$MODE timeout 300 python3 - <<'PY' 2>&1 | tee -a "$OUT/kernels.log"
import json, os, sys
from adaq.bench import microbench
results = microbench.run_all(quick=os.environ.get('MODE') == 'quick', compare_v1=False)
json.dump(results, open(os.path.join(os.environ["OUT"], "microbench.json"), "w"), indent=1)
print("\n".join(microbench.summary_lines(results)))
if os.environ.get("SWEEP", "1") == "1":
    sweep = microbench.gemm_sweep(copy_gbs=results["copy"]["GB/s"], splits=(0,) if os.environ.get("SWEEP_SPLITS", "0") == "0" else (0, 1, 2, 4, 8))
    json.dump(sweep, open(os.path.join(os.environ["OUT"], "sweep.json"), "w"), indent=1)
    best = {}
    for r in sweep:
        key = (r["name"], r["M"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for r in sweep:
        if r["splits"] == 0:
            b = best[(r["name"], r["M"])]
            print(f"sweep {r['name']:>12} M={r['M']:<3} v{r['variant']} auto {r['us']:7.1f} us | best v{b['variant']} "
                  f"splits={b['splits']} {b['us']:7.1f} us {b['pct_of_copy']:5.1f}% copy")
PY
if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  log "ncu: gate_up M=1 and o_proj M=1 (one launch each)"
  for shape in "24576 4096 1" "4096 4096 1"; do
    timeout 120 ncu --clock-control none -k regex:nvfp4_gemm_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      python3 scripts/profile_gemm.py $shape 2>&1 | grep -vE "^==PROF==|^\s*$" | tail -n 70 | tee -a "$OUT/ncu.txt"
  done
fi
log "done"
