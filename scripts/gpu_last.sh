#!/usr/bin/env bash
# Device script, a short final check inside one call: build both extensions, the end-to-end and engine GPU tests,
# the decode-step profile (scripts/profile_decode_step.py), `adaq bench` decode (batch 1, 16) and 2048-token prefill
# (both NVFP4 prefill paths against bf16). Carry .whl. Usage: OUT=$OUT bash scripts/gpu_last.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="8.9+PTX" COLUMNS=${COLUMNS:-180} TOKENIZERS_PARALLELISM=false
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/last.log"; }
python3 -c "import cutlass_library" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --target /tmp/cutlass-site .whl/nvidia_cutlass-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/cutlass-site; }
adaq() { python3 -c "from adaq.cli import main; main()" "$@" 2>&1 | grep -v Warn; }
log "build"
python3 -c "from adaq.kernels import build; build.load()" > /tmp/b1.log 2>&1 &
python3 -c "from adaq.kernels import prefill_fp8 as p; p.ext()" > /tmp/b2.log 2>&1 &
wait
log "tests"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=line tests/test_kernels_gpu.py tests/test_engine.py \
  -k "end_to_end or gpu_cache or graph" 2>&1 | tail -n 4 | tee -a "$OUT/last.log"
log "profile"
timeout 90 python3 scripts/profile_decode_step.py --model qwen3-8b --variant nvfp4 --batch 1,16 --out "$OUT" 2>&1 \
  | grep "ms/step" | tee -a "$OUT/last.log"
rm -f "$OUT"/profile_*_b*.txt
log "bench decode"
timeout 130 adaq bench --synthetic qwen3-8b --batch 1,16 --baselines bf16 --output-len 128 --repeats 2 --backend cuda \
  --json "$OUT/decode.json" | tail -n 22 | head -n 8 | tee -a "$OUT/last.log"
log "bench prefill"
timeout 130 adaq bench --synthetic qwen3-8b --input-len 2048 --output-len 2 --batch 1,4 --repeats 2 --baselines bf16 \
  --prefill-path auto,fp8 --backend cuda --json "$OUT/prefill.json" | grep -A 12 "^Prefill" | tee -a "$OUT/last.log"
log "done"
