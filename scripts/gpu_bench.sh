#!/usr/bin/env bash
# Device script for `adaq bench` on a GPU machine (the device tool's H100): builds adaq's kernels (cached under
# $ADAQ_CACHE), then benchmarks synthetic models and writes JSON, PNG and logs under $OUT (default ./out), each
# JSON carrying the command that made it. Usage: scripts/gpu_bench.sh [main|smoke|kernels|models]
#   main    adaq bench --synthetic qwen3-8b --batch 1,4,16 (NVFP4, bf16 and transformers), then bench kernels
#   smoke   a short run (64 new tokens, one repeat) to check the pieces and time transformers' compilation
#   kernels adaq bench kernels only
#   models  the other bundled models at batch 1,16 (NVFP4 and bf16; no transformers baseline)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} COLUMNS=${COLUMNS:-200} TOKENIZERS_PARALLELISM=false
MODE=${1:-main}
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/bench.log"; }
bench() {  # bench NAME TIMEOUT ARGS...: one `adaq bench` run with its JSON, PNG and log
  local name=$1 limit=$2; shift 2
  log "adaq bench $* --json $OUT/$name.json --plot $OUT/$name.png"
  timeout "$limit" python3 -c "from adaq.cli import main; main()" bench "$@" --json "$OUT/$name.json" \
    --plot "$OUT/$name.png" 2>&1 | tee "$OUT/$name.log" || log "FAILED or timed out: $name"
  if [ -f "$OUT/$name.json" ] && [ ! -f "$OUT/$name.png" ]; then  # cut short: table and plot of what it measured
    python3 -c "import json, sys; from adaq.bench import plot, report; r = json.load(open(sys.argv[1])); \
report.render(r); plot.plot(r, sys.argv[2])" "$OUT/$name.json" "$OUT/$name.png" 2>&1 | tail -n 40
  fi
}

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 \
  | tee -a "$OUT/bench.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/bench.log"

BACKEND=${BACKEND:-cuda}
[ "$MODE" = smoke ] && BACKEND=reference
if [ "$BACKEND" = cuda ]; then
  log "kernels: build or load"
  start=$(date +%s)
  # a failed build falls back to the reference backend explicitly, so no variant tries to build again
  timeout "${BUILD_TIMEOUT:-240}" python3 -c "from adaq.kernels import build; build.load(); print('kernels', build.source_hash())" \
    > "$OUT/build.log" 2>&1 || { BACKEND=reference; log "kernel build FAILED (tail of build.log below): reference backend"; }
  tail -n 5 "$OUT/build.log" | tee -a "$OUT/bench.log"
  log "kernels ready after $(( $(date +%s) - start )) s, backend $BACKEND"
fi

case "$MODE" in
  smoke)
    bench smoke-qwen3-8b 300 --synthetic qwen3-8b --batch 1,16 --output-len 64 --repeats 1 --backend reference
    ;;
  main)
    # the device tool stops a command at 600 s: what the build left of that goes to the bench
    bench "$(basename "${MODEL:-qwen3-8b}" .json)" $(( ${TIME_LIMIT:-590} - SECONDS )) --synthetic "${MODEL:-qwen3-8b}" \
      --batch "${BATCHES:-1,4,16}" --backend "$BACKEND" ${EXTRA_ARGS:-}
    [ "$SECONDS" -gt "${KERNELS_AFTER_MAX:-470}" ] && { log "no time left for bench kernels"; exit 0; }
    log "adaq bench kernels"
    timeout 100 python3 -c "from adaq.cli import main; main()" bench kernels --quick --json "$OUT/kernels.json" 2>&1 \
      | tee "$OUT/kernels.log" || log "FAILED or timed out: kernels"
    ;;
  kernels)
    timeout 300 python3 -c "from adaq.cli import main; main()" bench kernels --json "$OUT/kernels.json" 2>&1 \
      | tee "$OUT/kernels.log" || log "FAILED or timed out: kernels"
    ;;
  models)
    for model in gemma3-4b qwen3-30b-a3b gemma3-27b; do
      bench "$model" 240 --synthetic "$model" --batch 1,16 --baselines bf16 --repeats 2 --backend "$BACKEND"
    done
    ;;
  *) echo "unknown mode $MODE (main, smoke, kernels, models)"; exit 2 ;;
esac
log "done"
