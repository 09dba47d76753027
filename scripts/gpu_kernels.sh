#!/usr/bin/env bash
# Device script for adaq's kernels: build the sm_89 (+PTX) extension, check its SASS, run the GPU tests, time the
# kernels. Writes JSON and logs under $OUT (default ./out). Usage: scripts/gpu_kernels.sh [quick]
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
    gemm = [l for l in sass.splitlines() if "nvfp4_gemm_kernelILi1E" in l or "HMMA" in l][:5]
    # The M <= 16 decode GEMMs in use (variant 2: ring of 4; variant 3: ring of 3, <= 80 registers).
    with open(os.path.join(os.environ["OUT"], "gemm_m16.sass"), "w") as f:
        for fun in ("_ZN4adaq20nvfp4_gemm_v2_kernelILi1ELi2ELi4ELi2EEEvNS_10GemmParamsE",
                    "_ZN4adaq20nvfp4_gemm_v2_kernelILi1ELi2ELi3ELi3EEEvNS_10GemmParamsE"):
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
from adaq.kernels import microbench
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
    timeout 120 ncu --clock-control none -k regex:nvfp4_gemm_v2 --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      python3 scripts/profile_gemm.py $shape 2>&1 | grep -vE "^==PROF==|^\s*$" | tail -n 70 | tee -a "$OUT/ncu.txt"
  done
fi
log "done"
