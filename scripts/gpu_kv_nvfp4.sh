#!/usr/bin/env bash
# Device script for issue 18 (NVFP4 KV cache): build the sm_89 (+PTX) extension, run the NVFP4 KV GPU tests and the
# existing attention/store tests (no regression), then the decode-attention microbenchmark at 8k and 32k beside FP8.
# Writes logs and JSON under $OUT (default ./out). Usage: scripts/gpu_kv_nvfp4.sh [tests|bench|all]
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="8.9+PTX"
MODE=${1:-all}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/kv_nvfp4.log"; }

log "device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/kv_nvfp4.log"
log "build"
start=$(date +%s)
python3 -c "from adaq.kernels import build; build.load(verbose=False); print('built', build.source_hash())" \
  2>&1 | tail -n 30 | tee -a "$OUT/kv_nvfp4.log"
log "build took $(( $(date +%s) - start )) s"
if [ "$MODE" != bench ]; then
  log "NVFP4 KV tests"
  timeout 420 python3 -m pytest tests/test_kernels_gpu_kv_nvfp4.py -q -rs --tb=short -p no:cacheprovider \
    2>&1 | tail -n 60 | tee -a "$OUT/kv_nvfp4.log"
  log "existing attention / store tests"
  timeout 200 python3 -m pytest tests/test_kernels_gpu.py -q --tb=line -p no:cacheprovider \
    -k "(attention or store_kv) and not long_prompts" 2>&1 | tail -n 15 | tee -a "$OUT/kv_nvfp4.log"
fi
if [ "$MODE" != tests ]; then
  log "decode attention microbenchmark: FP8 vs NVFP4 (default and variant 2 tiling), Qwen3-8B heads, 8k / 32k, batch 1 / 16"
  timeout 200 python3 -c "
import json
from adaq.bench import microbench
rows = microbench.kv_nvfp4_suite(nvfp4_variants=(None, 2))
json.dump({'device': __import__('torch').cuda.get_device_name(), 'rows': rows}, open('$OUT/kv_nvfp4_attention.json', 'w'), indent=1)
for r in rows:
    print(f\"{r['kv_dtype']:6} v{r['variant']} batch {r['batch']:3} ctx {r['context']:6} {r['us']:9.1f} us {r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f} % of copy, splits {r['splits']}\")
" 2>&1 | tail -n 20 | tee -a "$OUT/kv_nvfp4.log"
fi
