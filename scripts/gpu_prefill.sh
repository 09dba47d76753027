#!/usr/bin/env bash
# Device script for the FP8 prefill path (issue 8): build the FP8 extension (CUTLASS-generated sm_89 GEMM + operand
# kernels, 8.9+PTX), run its GPU tests, time it against the FP8 mma.sync ceiling. JSON and logs under $OUT.
# Needs CUTLASS's headers: the device image lacks nvidia-cutlass, so carry its wheel (pure Python, 6.4 MB):
#   here, once: echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
#   run with carry [".whl"]. Expected time on a fresh H100: build ~4-6 min (three CUTLASS tiles), tests ~2 min,
#   microbenchmark ~1 min.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="8.9+PTX"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/prefill.log"; }

if ! python3 -c "import cutlass_library" 2>/dev/null; then
  ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 || { log "no nvidia-cutlass: carry .whl (see the header)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cutlass-site \
    .whl/nvidia_cutlass-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/cutlass-site
fi

log "device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/prefill.log"

log "build"
start=$(date +%s)
python3 -c "from adaq.kernels import prefill_fp8 as p; e = p.ext(); print('built', p.source_hash(), \
[e.fp8_gemm_shared_bytes(i) for i in range(e.fp8_gemm_tiles())], 'shared bytes per tile')" \
  2>&1 | tail -n 40 | tee -a "$OUT/prefill.log" || { log "BUILD FAILED"; exit 1; }
log "build took $(( $(date +%s) - start )) s"

log "SASS of the generated GEMM (FP8 HMMA present, no local memory)"
python3 - <<'PY' 2>&1 | tee -a "$OUT/prefill.log"
import glob, json, os, subprocess
from adaq.kernels import build, prefill_fp8
so = glob.glob(str(build.cache_root() / f"fp8-{prefill_fp8.source_hash()}" / "*.so"))
sass = subprocess.run(["cuobjdump", "-sass", so[0]], capture_output=True, text=True).stdout if so else ""
report = {"sm_89 present": "arch = sm_89" in sass, "HMMA lines with E4M3": sum("HMMA" in l and "E4M3" in l for l in sass.splitlines()),
          "LDL/STL (local memory)": sass.count("LDL") + sass.count("STL"), "HGMMA": sass.count("HGMMA")}
json.dump(report, open(os.path.join(os.environ["OUT"], "prefill_sass.json"), "w"), indent=1)
print(report)
PY

log "gpu tests"
timeout 420 python3 -m pytest tests/test_prefill_fp8.py -m gpu -q -rs --tb=short -p no:cacheprovider \
  --junitxml="$OUT/prefill_pytest.xml" 2>&1 | tail -n 60 | tee -a "$OUT/prefill.log"

log "microbenchmark"
timeout 300 python3 - <<'PY' 2>&1 | tee -a "$OUT/prefill.log"
import json, os
from adaq.kernels import prefill_bench
results = prefill_bench.run_all()
json.dump(results, open(os.path.join(os.environ["OUT"], "prefill_bench.json"), "w"), indent=1)
print("\n".join(prefill_bench.summary_lines(results)))
PY
log "done"
