#!/usr/bin/env bash
# Device script, session 6: one call does the steps named in STEPS, in order, while time is left (DEADLINE seconds
# from the start; each bench gets what is left, at most its own limit). Carry .whl (nvidia-cutlass, fla-core, einops).
# Optional trees beside the working tree, built into the same kernel cache (keyed by source hash):
# - wip-NAME: the working tree with wip/NAME.patch applied (code that waits for its GPU tests); wip-A+B: both;
# - pretp: .pretp.tgz, `git archive e26dd9b^1 adaq pyproject.toml` (the engine before tensor parallelism).
# Steps: tests (every GPU test, three pytest processes; TESTS_TREE in TREE beside them when TREE is set), retest
# (TESTS_MAIN, ';' between pytest runs, then TESTS_TREE in TREE),
# bench:NAME (see bench_step; NAME_mid: with the mid-size NVFP4 kernels' thresholds set), sweep[@TREE]. Bench JSON and logs go into $OUT/bench.tgz, rewritten after every bench.
# Bench steps: MODEL (b1,16), MODEL-bf16 (beside the bf16 engine; BF16_ARGS replaces its batch/length arguments), MODEL-prefill2048, qwen3-8b-lmhead-FMT,
# qwen3-next, kernels (adaq bench kernels, the peers), profile-MODEL-bBATCH, pprofile-MODEL-LEN (a prefill), exact-skew (the exact MoE path under a
# hot expert); NAME@TREE runs it in that tree.
# Usage: OUT=$OUT STEPS="tests bench:qwen3.6 bench:qwen3.6@wip-X" TREES="wip-X" TREE=wip-X TESTS_TREE="tests/..." \
#   bash scripts/gpu_session6.sh
set -uo pipefail
OUT=${OUT:-out}
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
ROOT=$(pwd)
mkdir -p "$OUT" /tmp/bench
LOG="$OUT/session6.log"
log() { echo "== $(date -u +%T) +$(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
. scripts/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$LOG"

make_tree() {  # name: a copy of the working tree in /tmp/NAME
  case $1 in
    wip-*) mkdir -p /tmp/$1 && tar -C "$ROOT" --exclude=./.whl --exclude=./.git -cf - . | tar -C /tmp/$1 -xf - \
             && (cd /tmp/$1 && IFS=+ read -ra patches <<< "${1#wip-}" \
                 && for patch in "${patches[@]}"; do git apply "wip/$patch.patch" || exit 1; done) ;;
    pretp) mkdir -p /tmp/pretp && tar -C /tmp/pretp -xzf .pretp.tgz ;;
  esac
}
build_tree() {  # name: its kernels (the FP8 extension is shared when its sources are the same)
  (cd /tmp/$1 && PYTHONPATH=/tmp/$1:${PYTHONPATH#$ROOT} python3 -c "
from adaq.kernels import build, fp8_gemm
build.load(); fp8_gemm.ext(); print('built', build.source_hash())") > /tmp/build_$1.log 2>&1
  echo $? > /tmp/build_$1.rc
}
in_tree() {  # name command...: run a command in that tree (the working tree for "main")
  local name=$1; shift
  if [ "$name" = main ]; then "$@"; else (cd /tmp/$name && PYTHONPATH=/tmp/$name:${PYTHONPATH#$ROOT} "$@"); fi
}

log "build"
for tree in ${TREES:-}; do make_tree $tree; done
build_both
[ "$MAIN_RC" -ne 0 ] && { grep -m 20 -B2 -A6 error /tmp/build_main.log | tee -a "$LOG"; exit 1; }
for tree in ${TREES:-}; do build_tree $tree & done

PT="python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rfE"
tests_step() {
  local budget=${TEST_BUDGET:-330}
  log "gpu tests: three processes (+ TESTS_TREE in ${TREE:-no tree} when set)"
  local big="tests/test_kernels_gpu.py" mid="tests/test_kernels_gpu_kv_nvfp4.py tests/test_gemma4_gpu.py tests/test_gdn_gpu.py"
  timeout $budget $PT $big > /tmp/g1.log 2>&1 &
  timeout $budget $PT $mid > /tmp/g2.log 2>&1 &
  timeout $budget $PT tests $(for f in $big $mid; do echo --ignore=$f; done) > /tmp/g3.log 2>&1 &
  if [ -n "${TREE:-}" ] && [ -n "${TESTS_TREE:-}" ]; then
    wait_built $TREE && in_tree $TREE timeout $(( budget - 20 )) $PT $TESTS_TREE > /tmp/g4.log 2>&1 &
  fi
  wait
  for g in 1 2 3 4; do [ -f /tmp/g$g.log ] && { echo "##### group $g"; cat /tmp/g$g.log; }; done > "$OUT/gpu_tests.log"
  grep -hE "^FAILED|^ERROR|passed|failed" /tmp/g[1-4].log | tail -n 40 | tee -a "$LOG"
}
wait_built() {
  while [ ! -f /tmp/build_$1.rc ]; do sleep 2; done
  [ "$(cat /tmp/build_$1.rc)" = 0 ] || { log "$1 build failed"; tail -n 20 /tmp/build_$1.log | tee -a "$LOG"; return 1; }
}
bench() {  # tree name limit args...
  local tree=$1 name=$2${BENCH_MID:+_mid}${BENCH_TAG:-} limit=$3; shift 3
  local budget=$(( $(left) < limit ? $(left) : limit ))
  [ $budget -lt 40 ] && { log "skip $tree/$name: ${budget}s left"; return; }
  [ "$tree" = main ] || wait_built $tree || return
  log "bench $tree/$name (limit ${budget}s)"
  in_tree $tree env ${BENCH_ENV:-} timeout $budget python3 -m adaq bench "$@" --backend cuda --strict \
    --json "/tmp/bench/${tree}_$name.json" \
    > "/tmp/bench/${tree}_$name.log" 2>&1
  grep -E "│ (nvfp4|bf16)|FALLBACK|rror|failed" "/tmp/bench/${tree}_$name.log" | head -14 | tee -a "$LOG"
  tar -czf "$OUT/bench.tgz" -C /tmp bench
}
bench_step() {  # NAME[_mid][~VAR=VALUE...][@tree]; _mid: prefill path nvfp4, the mid-size kernels from MID_FROM /
  # MOE_MID_FROM rows (16); ~VAR=VALUE: that environment for this bench (its files named with the assignments)
  local what=${1%@*} tree=main
  [[ $1 == *@* ]] && tree=${1#*@}
  BENCH_ENV= BENCH_TAG= BENCH_MID=
  if [[ $what == *~* ]]; then
    BENCH_TAG=_${what#*~}; BENCH_ENV=${what#*~}; BENCH_ENV=${BENCH_ENV//\~/ }; BENCH_TAG=${BENCH_TAG//[~=]/_}
    what=${what%%~*}
  fi
  if [[ $what == *_mid ]]; then
    BENCH_ENV+=" ADAQ_PREFILL_PATH=nvfp4 ADAQ_PREFILL_MID_MIN_TOKENS=${MID_FROM:-16}"
    BENCH_ENV+=" ADAQ_PREFILL_MOE_MID_MIN_TOKENS=${MOE_MID_FROM:-16}"
    what=${what%_mid}; BENCH_MID=1
  fi
  bench_named $what $tree
}
bench_named() {  # what tree
  local what=$1 tree=$2
  case $what in
    qwen3.6|gemma4-26b|qwen3-30b)
      local model=$what; [ $what = qwen3.6 ] && model=qwen3.6-35b-a3b; [ $what = gemma4-26b ] && model=gemma4-26b-a4b
      [ $what = qwen3-30b ] && model=qwen3-30b-a3b
      bench $tree $model 120 --synthetic $model --batch 1,16 --output-len 128 --repeats 2 --baselines ${BASELINES:-none} ;;
    profile-*)  # profile-MODEL-bBATCH: the decode step's profile (scripts/profile_decode_step.py)
      local spec=${what#profile-}; local model=${spec%-b*} batch=${spec##*-b}
      log "profile $model batch $batch ($tree)"
      in_tree $tree timeout $(( $(left) < 100 ? $(left) : 100 )) python3 scripts/profile_decode_step.py \
        --model $model --batch $batch --out /tmp/bench/${tree}_profile_${model}_b$batch \
        > /tmp/bench/${tree}_profile_${model}_b$batch.txt 2>&1
      tail -n 30 /tmp/bench/${tree}_profile_${model}_b$batch.txt | tee -a "$LOG"; tar -czf "$OUT/bench.tgz" -C /tmp bench ;;
    pprofile-*)  # pprofile-MODEL-LEN: one prompt's prefill profile (scripts/profile_prefill_step.py), NVFP4 auto only
      local spec=${what#pprofile-}; local model=${spec%-*} len=${spec##*-}
      log "prefill profile $model $len tokens ($tree)"
      in_tree $tree timeout $(( $(left) < 120 ? $(left) : 120 )) python3 scripts/profile_prefill_step.py \
        --model $model --input-len $len --batch 1 --variants nvfp4 --out /tmp/bench/${tree}_pprofile_${model}_$len \
        > /tmp/bench/${tree}_pprofile_${model}_$len.txt 2>&1
      grep -v Warn /tmp/bench/${tree}_pprofile_${model}_$len.txt | tail -n 30 | tee -a "$LOG"
      tar -czf "$OUT/bench.tgz" -C /tmp bench ;;
    qwen3-next) bench $tree qwen3-next-80b-a3b 300 --synthetic qwen3-next-80b-a3b --batch 1,16 --output-len 128 \
                  --repeats 2 --baselines none ;;
    qwen3-8b) bench $tree qwen3-8b 120 --synthetic qwen3-8b --batch 1,16 --output-len 128 --repeats 3 --baselines none ;;
    qwen3-8b-bf16) bench $tree qwen3-8b-bf16 150 --synthetic qwen3-8b --batch 1,16 --output-len 128 --repeats 3 \
                  --baselines bf16 ;;
    qwen3-8b-lmhead-*) bench $tree $what 90 --synthetic qwen3-8b --batch 1,16 --output-len 128 --repeats 2 \
                  --baselines none --lm-head ${what#qwen3-8b-lmhead-} ;;
    exact-skew) log "exact MoE path under skewed routing ($tree)"  # scripts/exact_moe_skew_bench.py
      in_tree $tree timeout $(( $(left) < 120 ? $(left) : 120 )) python3 scripts/exact_moe_skew_bench.py \
        --json /tmp/bench/${tree}_exact_skew.json > /tmp/bench/${tree}_exact_skew.log 2>&1
      tail -n 5 /tmp/bench/${tree}_exact_skew.log | tee -a "$LOG"; tar -czf "$OUT/bench.tgz" -C /tmp bench ;;
    kernels) log "adaq bench kernels"
      in_tree $tree timeout $(( $(left) < 150 ? $(left) : 150 )) python3 -m adaq bench kernels \
        --json /tmp/bench/${tree}_kernels.json > /tmp/bench/${tree}_kernels.log 2>&1
      tail -n 40 /tmp/bench/${tree}_kernels.log | tee -a "$LOG"; tar -czf "$OUT/bench.tgz" -C /tmp bench ;;
    *-prefill2048|*-prefill2048x) local model=${what%-prefill2048*}
      bench $tree $what 200 --synthetic $model --batch 1 --input-len 2048 --output-len 8 --repeats 2 --baselines none ;;
    *-bf16) local model=${what%-bf16}
      bench $tree $what 240 --synthetic $model ${BF16_ARGS:---batch 1,16 --output-len 128 --repeats 2} --baselines bf16 ;;
    *) bench $tree $what 150 --synthetic $what --batch 1,16 --output-len 128 --repeats 2 --baselines none ;;
  esac
}
retest_step() {  # TESTS_MAIN in the working tree, then TESTS_TREE in TREE; ';' in TESTS_TREE: parallel processes
  local budget=${TEST_BUDGET:-200} file=$OUT/gpu_retest.log
  if [ -n "${TESTS_MAIN:-}" ]; then
    local part; : > /tmp/r1.log
    IFS=';' read -ra parts <<< "$TESTS_MAIN"  # ';' separates pytest runs (one may carry its own -kEXPR)
    for part in "${parts[@]}"; do
      log "retest main: $part"
      timeout $budget $PT $part >> /tmp/r1.log 2>&1
    done
    grep -hE "^FAILED|^ERROR|passed|failed" /tmp/r1.log | tee -a "$LOG"
  fi
  if [ -n "${TREE:-}" ] && [ -n "${TESTS_TREE:-}" ] && wait_built $TREE; then
    local part group=0 tree_parts pids=()
    rm -f /tmp/r2_*.log
    IFS=';' read -ra tree_parts <<< "$TESTS_TREE"
    for part in "${tree_parts[@]}"; do
      group=$(( group + 1 ))
      log "retest $TREE ($group): $part"
      in_tree $TREE timeout $budget $PT $part > /tmp/r2_$group.log 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"  # not the other trees' builds, which may still run in the background
    cat /tmp/r2_*.log > /tmp/r2.log
    grep -hE "^FAILED|^ERROR|passed|failed" /tmp/r2.log | tee -a "$LOG"
  fi
  cat /tmp/r[12].log > "$file" 2>/dev/null
}
sweep_step() {  # [tree]: the prefill sweep, its thresholds written into that tree's file
  local tree=${1:-main}
  local tag=${tree//+/_}  # files under $OUT: plain names
  [ "$tree" = main ] || wait_built $tree || return
  log "prefill sweep ($tree)"
  in_tree $tree timeout $(( $(left) < 200 ? $(left) : 200 )) python3 -m adaq.bench.prefill_sweep \
    --json "$OUT/prefill_sweep_$tag.json" --write-thresholds 2>&1 | tail -n 40 | tee -a "$LOG"
  in_tree $tree cp adaq/backends/prefill_thresholds.json "$OUT/prefill_thresholds_$tag.json"
}

for step in ${STEPS:-tests}; do
  [ $(left) -lt 30 ] && { log "out of time before $step"; break; }
  case $step in
    tests) tests_step ;;
    retest) retest_step ;;
    sweep) sweep_step ;;
    sweep@*) sweep_step ${step#sweep@} ;;
    bench:*) bench_step ${step#bench:} ;;
    *) log "unknown step $step" ;;
  esac
done
tar -czf "$OUT/bench.tgz" -C /tmp bench
cp /tmp/build_*.log "$OUT/" 2>/dev/null; ls /tmp/build_*.log >/dev/null 2>&1 && tar -czf "$OUT/build_logs.tgz" -C /tmp $(cd /tmp && ls build_*.log) && rm -f "$OUT"/build_*.log
log "done"
