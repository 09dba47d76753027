# Sourced by the device scripts (scripts/gpu_*.sh): the environment, CUTLASS's Python package from the carried wheel
# (the device image lacks nvidia-cutlass: carry .whl, see scripts/gpu_prefill.sh), and `build_both`, which builds
# adaq's kernels and the FP8 extension for 8.9+PTX in parallel and sets MAIN_RC / FP8_RC. Needs OUT and log().
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) ADAQ_CACHE=${ADAQ_CACHE:-/tmp/adaq-cache}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="8.9+PTX" COLUMNS=${COLUMNS:-200} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if ! python3 -c "import cutlass_library" 2>/dev/null; then
  if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cutlass-site \
      .whl/nvidia_cutlass-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/cutlass-site
  else
    echo "no nvidia-cutlass: carry .whl (python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl)"
  fi
fi

# fla-core (Gated DeltaNet chunked prefill, optional) and einops from the carried wheels, when they are there.
if ! python3 -c "import fla" 2>/dev/null && ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla-site \
    .whl/fla_core-*.whl .whl/einops-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla-site
fi

build_both() {
  local start=$(date +%s)
  python3 -c "from adaq.kernels import build; build.load(); print('kernels', build.source_hash())" \
    > /tmp/build_main.log 2>&1 &
  local main_pid=$!
  python3 -c "from adaq.kernels import fp8_gemm as p; p.ext(); print('fp8 built', p.source_hash())" \
    > /tmp/build_fp8.log 2>&1 &
  local fp8_pid=$!
  wait $main_pid; MAIN_RC=$?; wait $fp8_pid; FP8_RC=$?
  log "built in $(( $(date +%s) - start )) s: kernels rc $MAIN_RC, fp8 rc $FP8_RC"
  [ $MAIN_RC -ne 0 ] && grep -m 8 -B2 -A4 "error" /tmp/build_main.log
  [ $FP8_RC -ne 0 ] && grep -m 8 -B2 -A4 "error" /tmp/build_fp8.log
  return 0
}
